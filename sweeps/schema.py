"""The record formats (SPEC §6), written once: run-directory file names,
metrics.csv columns, run statuses, and the columns and name of the tidy
results table (a sweep's export, ``analysis.load``'s frame).

The runner writes these records, the sweep back ends export them, and
``analysis`` reads them; all three import the names from here. This module
imports only the standard library, so ``analysis`` stays free of torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib
from typing import Any

__all__ = [
    "ADAPTED_GAMMA_PREFIX",
    "BUDGET",
    "BUDGET_FIELDS",
    "BUDGET_KIND",
    "CALIBRATION",
    "CHECKPOINT",
    "CLASSIFIER_COLUMNS",
    "COMPARE_RUNS",
    "CONFIG",
    "DEFAULT_PRECISION",
    "DIVERGED",
    "FAILED",
    "FINISHED",
    "HPARAM_PREFIX",
    "INTERRUPTED",
    "LOSS_SPLITS",
    "METRICS",
    "METRIC_COLUMNS",
    "OK",
    "PERPLEXITY_COLUMNS",
    "PRECISION",
    "PRECISIONS",
    "PROTOCOL",
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
    "metrics_defect",
    "phase_column",
    "run_labels",
]

# A run directory.
CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.csv", "summary.json", "checkpoint.pt"
# The splits whose losses metrics.csv records (SPLIT_loss) and summary.json repeats for the last row (final_SPLIT_loss).
LOSS_SPLITS = ("train", "valid", "test")

# metrics.csv: one row per evaluation. Every run has these columns, in this order...
METRIC_COLUMNS = ("step", "epoch", "wall_time_s", "train_loss", "valid_loss", "test_loss", "lr")
# ...classifiers add their error rates; every run its mean seconds per step,
# per phase of a step (forward_backward, then the optimizer's own phases,
# such as LocoProp's targets and local_solve: PHASE_time_s) and its count of
# steps skipped for non-finite values.
CLASSIFIER_COLUMNS = ("train_error", "valid_error", "test_error")
# ...and language models (token sequences) their perplexity, exp of the mean next-token loss, too.
PERPLEXITY_COLUMNS = ("train_perplexity", "valid_perplexity", "test_perplexity")
STEP_TIME_COLUMN = "step_time_s"
SKIPPED_COLUMN = "skipped_steps"

# summary.json "status": a run that is over, or one that can be resumed: "failed"
# (an error, recorded under "error") or "interrupted" (Ctrl-C or a scheduler's
# SIGTERM, recorded under "signal"; checkpointed at its last step). A run
# directory without summary.json is still running, or was killed hard.
OK, DIVERGED, STOPPED = "ok", "diverged", "stopped"
FINISHED = (OK, DIVERGED, STOPPED)
FAILED, INTERRUPTED = "failed", "interrupted"
RUNNING = "running"

# metrics.csv: the column of a unit's activation learning rate γ when the optimizer adapts it (hypergradients).
ADAPTED_GAMMA_PREFIX = "gamma/"

# The stem of the table a sweep exports (.csv and .parquet).
SWEEP_TABLE = "sweep_results"

# A `locoprop compare` folder: protocol.json (what was done; its "runs" lists the
# final run directories, relative to the folder) and the final runs in runs/.
PROTOCOL, COMPARE_RUNS = "protocol.json", "runs"

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
# config.json "precision" (and a column of the tidy table, and protocol.json's): "fp32", float32 throughout, or
# "bf16", the forward and backward under bfloat16 autocast with float32 weights and optimizer state. A record made
# before the field existed lacks it and was float32.
PRECISION = "precision"
PRECISIONS = ("fp32", "bf16")
DEFAULT_PRECISION = "fp32"
BUDGET_KIND, BUDGET = "budget_kind", "budget"
STATUS = "status"
HPARAM_PREFIX = "hp_"


def phase_column(phase: str) -> str:
    """The metrics.csv column of a step phase's mean seconds."""
    return f"{phase}_time_s"


def metric_columns(
    classifier: bool, phases: tuple[str, ...], adapted: tuple[str, ...] = (), *, perplexity: bool = False
) -> list[str]:
    """The metrics.csv header of a run whose steps are timed in ``phases`` and whose optimizer adapts the
    hyperparameters ``adapted`` itself (LocoProp's γ per unit: ``gamma/UNIT``, :data:`ADAPTED_GAMMA_PREFIX`);
    a language model's (``perplexity``) has the perplexity of each split too."""
    columns = [*METRIC_COLUMNS, *(CLASSIFIER_COLUMNS if classifier else ())]
    columns += [*(PERPLEXITY_COLUMNS if perplexity else ()), STEP_TIME_COLUMN]
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
    """The label columns of a run's rows in the tidy table, from its config.json and status, and its
    precision (:data:`DEFAULT_PRECISION` for a config.json written before precision was recorded).

    A hyperparameter that is a dictionary or list becomes its JSON text, so
    that every cell is a scalar (Parquet, groupby).
    """
    labels: dict[str, Any] = {key: config[key] for key in RUN_LABELS}
    labels[BUDGET_KIND], labels[BUDGET] = budget_of(config)
    labels[STATUS] = status
    labels[PRECISION] = config.get(PRECISION, DEFAULT_PRECISION)
    for name, value in config.get("hparams", {}).items():
        labels[HPARAM_PREFIX + name] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return labels


def metrics_defect(path: pathlib.Path, summary: dict[str, Any] | None = None) -> str | None:
    """Why the metrics.csv at ``path`` cannot be trusted, or None if it can.

    The runner appends one row per evaluation, so a crash, a full disk or a
    copy cut short can leave a file that ends inside a row: its last cells
    missing, or its last number cut to its first digits. Such a file is
    refused (never read as if whole) when:

    - it does not end with a line end (its last row was cut short);
    - a row has more or fewer cells than the header;
    - a cell is neither empty nor a number, or a step is not an integer;
    - ``summary`` (its summary.json, written when the run ended) disagrees
      with the last row: a ``final_SPLIT_loss`` differs from that row's
      ``SPLIT_loss`` (null there stands for a loss that is not finite), or
      the row's step is past the run's last ``steps``.

    Raises:
        OSError, UnicodeDecodeError: the file cannot be read as text.
    """
    text = pathlib.Path(path).read_bytes().decode("utf-8")
    if text and not text.endswith("\n"):
        return "its last row is cut short (the file does not end with a line end): it was truncated"
    rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    if not rows:
        return "it is empty"
    header, body = rows[0], rows[1:]
    parsed = []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            return f"line {line} has {len(row)} cells where the header has {len(header)}"
        cells = {}
        for name, text in zip(header, row):
            try:
                cells[name] = _cell(text)
            except ValueError:
                return f"line {line}: column {name} holds {text!r}, not a number"
        parsed.append(cells)
        if not isinstance(parsed[-1].get("step", 0), (int, type(None))):
            return f"line {line}: its step {parsed[-1]['step']!r} is not an integer"
    if summary is not None and parsed:
        return _summary_disagreement(parsed[-1], summary)
    return None


def _cell(text: str) -> int | float | None:
    """A metrics.csv cell: empty (not evaluated), an integer or a float (``nan`` and ``inf`` included)."""
    if text == "":
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _summary_disagreement(last: dict[str, Any], summary: dict[str, Any]) -> str | None:
    """Where summary.json contradicts the last row of metrics.csv (None where they agree).

    summary.json holds the losses of the last evaluation, written as the run
    ended, atomically; a metrics.csv whose last row says otherwise lost rows or
    cells. Keys an older summary.json lacks are not compared.
    """
    for split in LOSS_SPLITS:
        key = f"final_{split}_loss"
        if key not in summary or f"{split}_loss" not in last:
            continue
        in_summary, in_row = summary[key], last[f"{split}_loss"]
        row_finite = in_row is not None and math.isfinite(in_row)
        same = (in_summary is None and not row_finite) or (
            isinstance(in_summary, (int, float)) and row_finite and math.isclose(in_summary, in_row, rel_tol=1e-12)
        )
        if not same:
            return (
                f"its last row (step {last.get('step')}) has {split}_loss {in_row!r} where summary.json has {key} "
                f"{in_summary!r}: rows or cells are missing"
            )
    steps, step = summary.get("steps"), last.get("step")
    if isinstance(steps, int) and isinstance(step, int) and step > steps:
        return f"its last row is at step {step}, past the run's last step {steps} in summary.json"
    return None
