"""The checks every sweep back end makes before it writes anything (SPEC §8).

Each back end's entry point (:func:`~sweeps.search.optuna_backend.run_optuna_sweep`,
:func:`~sweeps.search.ray_backend.run_ray_sweep`) calls :func:`check_sweep`
first, before it opens a storage, starts a cluster or creates a folder, so
that the same bad input gets the same one-line refusal from every back end,
and a new back end gets every check by calling one function. What only one
back end has (Optuna's heartbeats, Ray's resources per trial) it checks in
the function it passes to :func:`check_sweep` (``own_checks``), which runs
it before the data set is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sweeps.runner.train import check_builds, check_fits_data
from sweeps.search.results import check_study_name

if TYPE_CHECKING:
    from sweeps.runner.config import RunConfig

__all__ = ["BACKENDS", "METRICS", "check_sweep"]

# The values of `locoprop sweep --backend` (and of compare's tuning); each names a module
# sweeps.search.NAME_backend whose run_NAME_sweep calls check_sweep.
BACKENDS = ("optuna", "ray")
# The final losses a search may minimise: never the test loss, which only final runs report.
METRICS = ("valid_loss", "train_loss")


def check_sweep(
    base: RunConfig,
    *,
    study_name: str,
    trials: int,
    metric: str,
    sampler_seed: int | None,
    own_checks: Callable[[], object] | None = None,
) -> None:
    """Refuse, with a ValueError naming the bad value, a sweep that no back end can run.

    The rules, checked in this order: ``trials`` ≥ 1; ``study_name`` a plain
    folder name (:func:`~sweeps.search.results.check_study_name`); ``metric``
    one of :data:`METRICS`; then ``own_checks``, the back end's checks of its
    own arguments (Optuna's heartbeats, Ray's resources per trial);
    ``sampler_seed`` None or an integer from 0 to 2³² − 1; and last a
    ``base`` config its data set can run
    (:func:`~sweeps.runner.train.check_fits_data`, which loads the data set,
    so every check of the arguments comes first) and whose model its
    optimizer takes at ``base``'s hyperparameters
    (:func:`~sweeps.runner.train.check_builds`), so that a setup no trial
    can run is refused before the study stores it.
    """
    # Optuna, which the sampler needs, is loaded by a sweep, not by every `locoprop` command that imports this.
    from sweeps.search.search_space import TrialSeededSampler

    if trials < 1:
        raise ValueError(f"Invalid trials: {trials}; expected ≥ 1")
    check_study_name(study_name)  # the study's folder stays inside out
    if metric not in METRICS:
        raise ValueError(
            f"Invalid metric: {metric!r}; expected one of {', '.join(METRICS)} (a search never minimises the "
            "test loss, which only final runs report)"
        )
    if own_checks is not None:
        own_checks()
    TrialSeededSampler(sampler_seed)  # refuses a bad seed, naming it
    data = check_fits_data(base)
    # An optimizer its model refuses (the exact solve on convolutions) failed every trial, leaving FAIL trials.
    check_builds(base, data.shape)
