"""The record formats (SPEC §6), written once: run-directory file names,
metrics.csv columns, run statuses and the sweep table's name.

The runner writes these records, the sweep back ends export them, and
``analysis`` reads them; all three import the names from here. This module
imports only the standard library, so ``analysis`` stays free of torch.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT",
    "CLASSIFIER_COLUMNS",
    "CONFIG",
    "FINISHED",
    "LOCOPROP_COLUMNS",
    "METRICS",
    "METRIC_COLUMNS",
    "RUNNING",
    "SUMMARY",
    "SWEEP_TABLE",
    "metric_columns",
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
FINISHED = ("ok", "diverged", "stopped")
FAILED = "failed"
RUNNING = "running"

# The stem of the table a sweep exports (.csv and .parquet).
SWEEP_TABLE = "sweep_results"


def metric_columns(classifier: bool, locoprop: bool) -> list[str]:
    """The metrics.csv header of a run."""
    columns = [*METRIC_COLUMNS, *(CLASSIFIER_COLUMNS if classifier else ()), STEP_TIME_COLUMN]
    return columns + list(LOCOPROP_COLUMNS if locoprop else ())
