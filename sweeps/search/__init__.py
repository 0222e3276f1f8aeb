"""Hyperparameter search (SPEC §8): search spaces, the Optuna and Ray Tune back ends, the results table.

- :mod:`~sweeps.search.search_space`: one YAML space per optimizer (``spaces/``),
  the only record of what a sweep searches, read by both back ends;
- :mod:`~sweeps.search.optuna_backend`: resumable Optuna studies (SQLite,
  any RDB URL, journal files);
- :mod:`~sweeps.search.ray_backend`: Ray Tune with Optuna's sampler;
- :mod:`~sweeps.search.results`: the study setup and its folder's name, secrets
  in storage URLs, and the tidy table both back ends export;
- :mod:`~sweeps.search.checks`: the checks every back end makes first, so that
  a bad input gets the same refusal from each;
- :mod:`~sweeps.search.workers`: which running trials of a journal study
  still have a live worker (the locks workers hold).

Imports :mod:`sweeps.runner` (each trial is a run), never :mod:`sweeps.commands`.
"""
