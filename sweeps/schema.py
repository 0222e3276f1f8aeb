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
    "ADAPTED_GAMMA_PREFIX",
    "BUDGET",
    "BUDGET_FIELDS",
    "BUDGET_KIND",
    "CALIBRATION",
    "CHECKPOINT",
    "CLASSIFIER_COLUMNS",
    "CONFIG",
    "DIVERGED",
    "FAILED",
    "FINISHED",
    "HPARAM_PREFIX",
    "METRICS",
    "METRIC_COLUMNS",
    "OK",
    "RUNNING",
    "RUN_ID",
    "RUN_LABELS",
    "SKIPPED_COLUMN",
    "STATUS",
    "STEP_COSTS",
    "STEP_TIME_COLUMN",
    "STOPPED",
    "SUMMARY",
    "SWEEP_TABLE",
    "budget_of",
    "metric_columns",
    "phase_column",
    "run_labels",
]

# A run directory.
CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.csv", "summary.json", "checkpoint.pt"

# metrics.csv: one row per evaluation. Every run has these columns, in this order...
METRIC_COLUMNS = ("step", "epoch", "wall_time_s", "train_loss", "valid_loss", "test_loss", "lr")
# ...classifiers add their error rates; every run its mean seconds per step,
# per phase of a step (forward_backward, then the optimizer's own phases,
# such as LocoProp's targets and local_solve: PHASE_time_s) and its count of
# steps skipped for non-finite values.
CLASSIFIER_COLUMNS = ("train_error", "valid_error", "test_error")
STEP_TIME_COLUMN = "step_time_s"
SKIPPED_COLUMN = "skipped_steps"

# summary.json "status": a run that is over (a "failed" one can be resumed);
# a run directory without summary.json is still running, or was killed hard.
OK, DIVERGED, STOPPED = "ok", "diverged", "stopped"
FINISHED = (OK, DIVERGED, STOPPED)
FAILED = "failed"
RUNNING = "running"

# metrics.csv: the column of a unit's activation learning rate γ when the optimizer adapts it (hypergradients).
ADAPTED_GAMMA_PREFIX = "gamma/"

# The stem of the table a sweep exports (.csv and .parquet).
SWEEP_TABLE = "sweep_results"

# A run's budget (config.json): exactly one of these fields is set. "time" is
# training seconds, converted once into a step count recorded in config.json
# under CALIBRATION ({"step_time_s": seconds, "steps": count}).
BUDGET_FIELDS = {"epochs": "epochs", "steps": "steps", "time_budget": "time"}
CALIBRATION = "calibration"
# protocol.json of a comparison: the step cost of every optimizer, measured side by side, which converts a time
# budget into each optimizer's step count: {"reference", "reference_step_time_s", "clock" ("wall" or "cpu": what
# the seconds count), "setup", "timed_steps", "optimizers": {name: {"ratio" (to the reference), "step_time_s",
# "steps", "hparams", "skipped_steps"}}}.
STEP_COSTS = "step_costs"

# The tidy results table: each metrics.csv row labelled with its run's id,
# these config.json fields, its budget (BUDGET_KIND: epochs, steps or time,
# BUDGET: its value), its status and one hp_<name> column per hyperparameter.
RUN_ID = "run_id"
RUN_LABELS = ("optimizer", "workload", "data", "seed")
BUDGET_KIND, BUDGET = "budget_kind", "budget"
STATUS = "status"
HPARAM_PREFIX = "hp_"


def phase_column(phase: str) -> str:
    """The metrics.csv column of a step phase's mean seconds."""
    return f"{phase}_time_s"


def metric_columns(classifier: bool, phases: tuple[str, ...], adapted: tuple[str, ...] = ()) -> list[str]:
    """The metrics.csv header of a run whose steps are timed in ``phases`` and whose optimizer adapts the
    hyperparameters ``adapted`` itself (LocoProp's γ per unit: ``gamma/UNIT``, :data:`ADAPTED_GAMMA_PREFIX`)."""
    columns = [*METRIC_COLUMNS, *(CLASSIFIER_COLUMNS if classifier else ()), STEP_TIME_COLUMN]
    return columns + [phase_column(phase) for phase in phases] + [SKIPPED_COLUMN, *adapted]


def budget_of(config: dict[str, Any]) -> tuple[str | None, float | None]:
    """(kind, value) of a run's budget from its config.json: ("time", 30.0), ("steps", 500), ("epochs", 20).

    (None, None) for a config that sets none of them (written by hand, or by an older locoprop).
    """
    for field, kind in BUDGET_FIELDS.items():
        if config.get(field) is not None:
            return kind, config[field]
    return None, None


def run_labels(config: dict[str, Any], status: str) -> dict[str, Any]:
    """The label columns of a run's rows in the tidy table, from its config.json and status.

    A hyperparameter that is a dictionary or list becomes its JSON text, so
    that every cell is a scalar (Parquet, groupby).
    """
    labels: dict[str, Any] = {key: config[key] for key in RUN_LABELS}
    labels[BUDGET_KIND], labels[BUDGET] = budget_of(config)
    labels[STATUS] = status
    for name, value in config.get("hparams", {}).items():
        labels[HPARAM_PREFIX + name] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return labels
