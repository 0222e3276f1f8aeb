"""Experiments with the optimizers: run them, search their hyperparameters, and the commands.

Three subpackages, each allowed to import only those before it:

- :mod:`sweeps.runner`: data sets, workloads, ``train(config)`` (the one
  training loop) and the run records it writes;
- :mod:`sweeps.search`: search spaces (one YAML file per optimizer), the
  Optuna and Ray Tune back ends and the exported results table;
- :mod:`sweeps.commands`: the ``locoprop`` command line and the jobs it runs
  (``compare``, ``bench``, the compare presets).

Beside them, two modules of the standard library only: :mod:`sweeps.schema`
(record file names, columns and statuses, shared with ``analysis``) and
:mod:`sweeps.extras` (which extra of the distribution installs what).
"""
