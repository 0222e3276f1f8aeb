"""The record formats (SPEC §6), written once: run-directory file names,
metrics.csv columns, run statuses, and the columns and name of the tidy
results table (a sweep's export, ``analysis.load``'s frame).

The runner writes these records, the sweep back ends export them, and
``analysis`` reads them; all three import the names from here. This module
imports only the standard library, so ``analysis`` stays free of torch.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "CHECKPOINT",
    "CLASSIFIER_COLUMNS",
    "CONFIG",
    "DIVERGED",
    "FAILED",
    "FINISHED",
    "HPARAM_PREFIX",
    "LOCOPROP_COLUMNS",
    "METRICS",
    "METRIC_COLUMNS",
    "OK",
    "RUNNING",
    "RUN_ID",
    "RUN_LABELS",
    "STATUS",
    "STEP_TIME_COLUMN",
    "STOPPED",
    "SUMMARY",
    "SWEEP_TABLE",
    "metric_columns",
    "run_labels",
]

# A run directory.
CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.csv", "summary.json", "checkpoint.pt"

# metrics.csv: one row per evaluation. Every run has these columns, in this order...
METRIC_COLUMNS = ("step", "epoch", "wall_time_s", "train_loss", "test_loss", "lr")
# ...classifiers add their error rates, every run its mean step time, and
# LocoProp the per-step seconds of its phases and its count of skipped steps.
CLASSIFIER_COLUMNS = ("train_error", "test_error")
STEP_TIME_COLUMN = "step_time_s"
LOCOPROP_COLUMNS = ("targets_time_s", "local_solve_time_s", "skipped_steps")

# summary.json "status": a run that is over (a "failed" one can be resumed);
# a run directory without summary.json is still running, or was killed hard.
OK, DIVERGED, STOPPED = "ok", "diverged", "stopped"
FINISHED = (OK, DIVERGED, STOPPED)
FAILED = "failed"
RUNNING = "running"

# The stem of the table a sweep exports (.csv and .parquet).
SWEEP_TABLE = "sweep_results"

# The tidy results table: each metrics.csv row labelled with its run's id,
# these config.json fields, its status and one hp_<name> column per hyperparameter.
RUN_ID = "run_id"
RUN_LABELS = ("optimizer", "workload", "data", "seed")
STATUS = "status"
HPARAM_PREFIX = "hp_"


def metric_columns(classifier: bool, locoprop: bool) -> list[str]:
    """The metrics.csv header of a run."""
    columns = [*METRIC_COLUMNS, *(CLASSIFIER_COLUMNS if classifier else ()), STEP_TIME_COLUMN]
    return columns + list(LOCOPROP_COLUMNS if locoprop else ())


def run_labels(config: dict[str, Any], status: str) -> dict[str, Any]:
    """The label columns of a run's rows in the tidy table, from its config.json and status.

    A hyperparameter that is a dictionary or list becomes its JSON text, so
    that every cell is a scalar (Parquet, groupby).
    """
    labels: dict[str, Any] = {key: config[key] for key in RUN_LABELS}
    labels[STATUS] = status
    for name, value in config.get("hparams", {}).items():
        labels[HPARAM_PREFIX + name] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return labels
