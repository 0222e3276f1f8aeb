"""What a Ray Tune trial runs, on one worker (:mod:`~sweeps.search.ray_backend`) or on several
(:mod:`~sweeps.search.ray_workers`): its run config, and train() reporting each evaluation.

Standard library and the runner only: both trial kinds import it, so neither imports the other.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable

from sweeps.runner.config import RunConfig
from sweeps.runner.train import BUDGET_PERCENT, train
from sweeps.search.search_space import load_space

__all__ = ["TRAIN_DIR", "train_reporting", "trial_config"]

TRAIN_DIR = "train"  # Ray Train's own records of the trials that run on several workers


def trial_config(params: dict, base: dict, space_file: str, run_dir: pathlib.Path) -> RunConfig:
    """The run config of the trial with sampled ``params``, trained in ``run_dir``."""
    space = load_space(path=space_file)
    return RunConfig.from_dict(
        {**base, "optimizer": space.optimizer, "hparams": space.to_hparams(params), "out": str(run_dir)}
    )


def train_reporting(config: RunConfig, metric: str, send: Callable[[dict], bool]) -> None:
    """train(config), resumed from its run directory, with ``send(metrics)`` at each evaluation and at the end.

    The metrics are the evaluation's row, its ``budget_percent`` (ASHA's time)
    and the run's status; ``metric`` is +inf where the loss is not finite.
    ``send`` returns whether Tune stopped the trial (ASHA): the run then ends
    as "stopped", unless its budget is done. A run that ended early, or that
    was over before this call, reports its last row once more with its status.

    Tune stops the trials of an interrupted experiment (Ctrl-C, SIGTERM) as
    ASHA does, so their runs end as "stopped" too; but Tune never starts a
    trial that its scheduler stopped again, and starts those of an
    interrupted experiment again when it is restored. So a run found
    "stopped" here was stopped by an interruption: it continues from its
    checkpoint (``resume_stopped``).
    """
    sent = stopped = False

    def report(row: dict, status: str) -> bool:
        nonlocal sent
        metrics = {k: v for k, v in row.items() if v is not None}
        value = metrics.get(metric)
        # Schedulers and searchers need a number: a diverged loss counts as +inf.
        metrics[metric] = value if value is not None and math.isfinite(value) else math.inf
        metrics["status"] = status
        sent = True
        return send(metrics)

    def on_evaluation(row: dict) -> bool:
        nonlocal stopped
        stopped = report(row, "running")
        return stopped and row[BUDGET_PERCENT] < 100  # a stop at the end of the budget is no stop

    result = train(config, resume=True, on_evaluation=on_evaluation, progress=False, resume_stopped=True)
    if not stopped and (result.status != "ok" or not sent):
        done = round(100 * result.summary["steps"] / result.summary["budget"]["steps"])
        report({**result.history[-1], BUDGET_PERCENT: done}, result.status)
