"""Load run directories and sweep tables into one tidy DataFrame (SPEC §9).

One row per evaluation of one run, with the columns of :data:`COLUMNS` and
one ``hp_<name>`` column per hyperparameter. Besides the metrics.csv
columns (validation loss, and error rates for classifiers, included), each
row carries its run's labels: optimizer, workload, data, seed, budget
(``budget_kind``: time, steps or epochs, and ``budget``: its value), status,
precision (fp32 or bf16; fp32 for a record made before it was recorded),
and the facts of :data:`RUN_FACTS` from summary.json (split sizes, the step
count the budget became, training seconds). A record that lacks one of them
(an older run, a sweep table) has NaN or None there. A *run* is a run directory
(config.json + metrics.csv + summary.json) or one trial of a sweep table
(CSV or Parquet with the same columns plus ``run_id``), whose rows say in
``sweep`` which table they came from (its path without suffix; None for a
run directory). Analysis reads only these files: it never re-runs code.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from collections.abc import Iterable

import pandas as pd

from sweeps.schema import (
    BUDGET,
    BUDGET_KIND,
    CALIBRATION,
    CLASSIFIER_COLUMNS,
    COMPARE_RUNS,
    CONFIG,
    DEFAULT_PRECISION,
    HPARAM_PREFIX,
    METRIC_COLUMNS,
    METRICS,
    PRECISION,
    PROTOCOL,
    RUN_ID,
    RUN_LABELS,
    RUNNING,
    STATUS,
    STEP_TIME_COLUMN,
    SUMMARY,
    SWEEP_TABLE,
    metrics_defect,
    run_labels,
)

__all__ = [
    "CALIBRATION_FACTS",
    "COLUMNS",
    "RUN_FACTS",
    "SWEEP",
    "CompareFolderRead",
    "RunSkipped",
    "RunsNotFound",
    "final_rows",
    "label_precisions",
    "load_results",
    "read_compare_folders",
    "registry_name",
]

# Per-run facts from summary.json: the sizes of the splits, the step count the
# budget was converted to, and the seconds of training (evaluation excluded):
# wall time, and the CPU time of the training thread.
RUN_FACTS = ("train_size", "valid_size", "test_size", "budget_steps", "train_seconds", "train_cpu_seconds")
# Per-run facts of a time budget's calibration (config.json): the seconds per step it priced, those of the
# reference optimizer's step in the same measurement (absent in runs made before it was measured), and the
# clock of both and of the budget ("wall" or "cpu").
CALIBRATION_FACTS = ("calibrated_step_s", "reference_step_s", "calibration_clock")
# The sweep table a row was read from (its path without suffix), None for a run directory's row.
SWEEP = "sweep"
# Every loaded frame has these columns (None or NaN where a record lacks one).
COLUMNS = [
    RUN_ID, *RUN_LABELS, BUDGET_KIND, BUDGET, STATUS, PRECISION, *METRIC_COLUMNS, *CLASSIFIER_COLUMNS, STEP_TIME_COLUMN,
    *RUN_FACTS, *CALIBRATION_FACTS, SWEEP,
]  # fmt: skip
# Numeric columns: a value that is not a number is a damaged record; a missing column is NaN.
NUMERIC = [*METRIC_COLUMNS, *CLASSIFIER_COLUMNS, STEP_TIME_COLUMN, BUDGET, *RUN_FACTS, *CALIBRATION_FACTS[:2]]
TABLE_SUFFIXES = (".csv", ".parquet")
_SKIP_IT = "leave it out of the inputs, or fix or remove it"  # what to do about an unreadable run file


class RunsNotFound(ValueError):
    """Nothing readable was found; the message names the path and why."""


class RunSkipped(UserWarning):
    """A damaged run in a folder of runs was left out; the message names it and why."""


class CompareFolderRead(UserWarning):
    """A ``locoprop compare`` folder was read as its final runs; the message says which and what was left out."""


def read_compare_folders(paths: Iterable[str | os.PathLike]) -> tuple[list[pathlib.Path], dict | None]:
    """``paths`` with every ``locoprop compare`` folder replaced by its final runs, and the protocol to report.

    A compare folder (one holding protocol.json) also holds the tuning
    trials of its studies, which are not results: it is read as compare
    reads it, as the final runs that its protocol.json lists (every run in
    runs/ for a protocol.json that lists none, as older ones do). The
    protocol returned is that protocol.json when the folder is the only
    input, else None (a :class:`CompareFolderRead` warning says so).
    """
    paths = [pathlib.Path(p) for p in paths]
    expanded, protocols = [], []
    for path in paths:
        if not (path.is_dir() and (path / PROTOCOL).is_file() and not _is_run_dir(path)):
            expanded.append(path)
            continue
        protocol = _read_json(path / PROTOCOL, required=())
        listed = protocol.get("runs")
        runs = [path / run for run in listed] if isinstance(listed, list) else [path / COMPARE_RUNS]
        which = (
            f"its {len(runs)} final runs listed in {PROTOCOL}"
            if isinstance(listed, list)
            else f"every run in {path / COMPARE_RUNS} ({PROTOCOL} lists no runs, as an older locoprop wrote it)"
        )
        mixed = len(paths) > 1
        warnings.warn(
            f"{path} is a locoprop compare folder: read as {which}, without its tuning trials"
            + (f"; its {PROTOCOL} is not used, since other inputs are reported with it" if mixed else ""),
            CompareFolderRead,
            stacklevel=2,
        )
        expanded += runs
        protocols.append(protocol)
    return expanded, protocols[0] if len(paths) == 1 and protocols else None


def load_results(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Every run under ``paths`` (run directories, folders of them, tables)."""
    frames = []
    read: set[pathlib.Path] = set()  # what was read, by _source: a run reached twice counts once
    for path in map(pathlib.Path, paths):
        if not path.exists():
            raise RunsNotFound(f"{path} does not exist")
        if path.is_file():
            if path.suffix not in TABLE_SUFFIXES:
                raise RunsNotFound(f"{path} is not a run directory or a results table (.csv or .parquet)")
            if _source(path) not in read:
                frames.append(_read_table(path))
            read.add(_source(path))
            continue
        found = _find_runs(path)
        if not found:
            raise RunsNotFound(
                f"No run directories (with config.json) or results tables found in {path}; "
                "point to the --out folder of locoprop train, compare or sweep"
            )
        found = [run for run in found if _source(run) not in read]
        read.update(map(_source, found))
        frames += _read_found(found)
    if not frames:
        raise RunsNotFound("No inputs given")
    frame = pd.concat(frames, ignore_index=True)
    hp_columns = sorted(c for c in frame.columns if c.startswith(HPARAM_PREFIX))
    others = [c for c in frame.columns if c not in COLUMNS and c not in hp_columns]
    return frame[COLUMNS + others + hp_columns]


def _source(path: pathlib.Path) -> pathlib.Path:
    """What ``path`` holds, for counting it once: a run directory, or a results table without its suffix (a
    sweep writes the same rows as .csv and .parquet)."""
    path = path.resolve()
    return path.with_suffix("") if path.suffix in TABLE_SUFFIXES else path


def _read_found(found: list[pathlib.Path]) -> list[pd.DataFrame]:
    """The runs and tables found in a folder. A damaged one among readable
    ones is skipped with a :class:`RunSkipped` warning naming it, so that one
    broken run does not hide the others; if none can be read, the first
    reason is the error."""
    frames, skipped = [], []
    for run in found:
        try:
            frames.append(_read_run(run) if run.is_dir() else _read_table(run))
        except RunsNotFound as err:
            skipped.append(err)
    if skipped and not frames:
        raise skipped[0]
    for err in skipped:
        warnings.warn(f"skipped: {err}", RunSkipped, stacklevel=3)
    return frames


def label_precisions(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each optimizer labelled by its precision ("adam (bf16)") when its runs are at more than one
    precision, so that the runs of one optimizer in fp32 and in bf16 are two entries of every table, never pooled
    into one mean; as it is when they share one. :func:`registry_name` reads the name back."""
    if frame[PRECISION].nunique() <= 1:
        return frame
    return frame.assign(optimizer=frame["optimizer"] + " (" + frame[PRECISION] + ")")


def registry_name(optimizer: str) -> str:
    """The registry name of an optimizer label: "adam" of "adam (bf16)" (:func:`label_precisions`)."""
    return optimizer.split(" (", 1)[0]


def final_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The last evaluation of every run."""
    ordered = frame.sort_values(["run_id", "step", "epoch"])
    return ordered.groupby("run_id", sort=False).tail(1).reset_index(drop=True)


def _find_runs(folder: pathlib.Path) -> list[pathlib.Path]:
    """The run directories and sweep tables in ``folder``, and the folders that hold a run's records
    without its config.json (which :func:`_read_run` refuses, so that they are named, not silently left out)."""
    if _is_run_dir(folder):
        return [folder]
    # A sweep folder's table already holds its trials' runs: read the table,
    # not the run directories beneath it, so nothing is counted twice.
    tables = sorted(folder.rglob(f"{SWEEP_TABLE}.csv"))
    sweep_folders = {t.parent for t in tables}
    runs = sorted({p.parent for name in (CONFIG, METRICS, SUMMARY) for p in folder.rglob(name)})
    runs = [r for r in runs if not any(parent in sweep_folders for parent in (r, *r.parents))]
    # Keep the outermost run directory where back ends nest copies inside one.
    runs = [r for r in runs if not any(parent in runs for parent in r.parents)]
    return runs + tables


def _is_run_dir(folder: pathlib.Path) -> bool:
    """Whether ``folder`` holds a run's records (config.json, metrics.csv or summary.json)."""
    return any((folder / name).is_file() for name in (CONFIG, METRICS, SUMMARY))


def _read_run(run_dir: pathlib.Path) -> pd.DataFrame:
    if not (run_dir / CONFIG).exists():
        raise RunsNotFound(f"Run directory {run_dir} has no config.json, so what it ran is unknown; {_SKIP_IT}")
    metrics = run_dir / METRICS
    if not metrics.exists():
        raise RunsNotFound(f"Run directory {run_dir} has no metrics.csv (the run never evaluated)")
    config = _read_json(run_dir / CONFIG, required=RUN_LABELS)
    summary_path = run_dir / SUMMARY
    # A run without summary.json is still going, or was killed hard.
    summary = _read_json(summary_path, required=(STATUS,)) if summary_path.exists() else None
    # A metrics.csv cut short or damaged is never read as if whole (its last row would become a final loss).
    defect = _read_file(metrics, lambda path: metrics_defect(path, summary))
    if defect is not None:
        raise RunsNotFound(f"{metrics}: {defect}; {_SKIP_IT}")
    summary = summary or {STATUS: RUNNING}
    frame = _read_file(metrics, pd.read_csv)
    if frame.empty:
        raise RunsNotFound(f"Run directory {run_dir} has an empty metrics.csv")
    frame[RUN_ID] = str(run_dir)
    frame = frame.assign(**run_labels(config, summary[STATUS]), **_run_facts(summary), **_calibration_facts(config))
    return _with_columns(frame, metrics)


def _run_facts(summary: dict) -> dict:
    """The :data:`RUN_FACTS` of a summary.json (None for those it lacks, as an older run's does)."""
    sizes = summary.get("split_sizes")
    sizes = sizes if isinstance(sizes, dict) else {}
    budget = summary.get("budget")
    budget = budget if isinstance(budget, dict) else {}
    return {
        **{f"{split}_size": sizes.get(split) for split in ("train", "valid", "test")},
        "budget_steps": budget.get("steps"),
        "train_seconds": summary.get("train_seconds"),
        "train_cpu_seconds": summary.get("train_cpu_seconds"),
    }


def _calibration_facts(config: dict) -> dict:
    """The :data:`CALIBRATION_FACTS` of a config.json (None for those it lacks)."""
    calibration = config.get(CALIBRATION)
    calibration = calibration if isinstance(calibration, dict) else {}
    return {
        "calibrated_step_s": calibration.get("step_time_s"),
        "reference_step_s": calibration.get("reference_step_time_s"),
        "calibration_clock": calibration.get("clock", "wall" if calibration else None),
    }


def _read_file(path: pathlib.Path, reader):
    """``reader(path)``, with a parse error turned into RunsNotFound naming the file."""
    try:
        return reader(path)
    except ValueError as err:  # JSON, CSV, Parquet and UTF-8 decoding errors are all ValueErrors
        raise RunsNotFound(f"{path} cannot be read ({type(err).__name__}: {err}); {_SKIP_IT}") from None


def _read_json(path: pathlib.Path, required: tuple[str, ...]) -> dict:
    """A run file's JSON object, which must hold the ``required`` keys."""
    data = _read_file(path, lambda p: json.loads(p.read_text()))
    if not isinstance(data, dict):
        raise RunsNotFound(f"{path} holds a JSON {type(data).__name__}, not an object; {_SKIP_IT}")
    missing = [key for key in required if key not in data]
    if missing:
        raise RunsNotFound(f"{path} lacks the key(s) {', '.join(missing)}; {_SKIP_IT}")
    return data


def _read_table(path: pathlib.Path) -> pd.DataFrame:
    frame = _read_file(path, pd.read_parquet if path.suffix == ".parquet" else pd.read_csv)
    if frame.empty:
        raise RunsNotFound(f"Results table {path} has no rows")
    if RUN_ID not in frame.columns:
        raise RunsNotFound(f"Results table {path} has no {RUN_ID} column; is it a locoprop sweep table?")
    # Named by the table without its suffix: a sweep writes the same rows as .csv and .parquet.
    frame[RUN_ID] = str(path.with_suffix("")) + "#" + frame[RUN_ID].astype(str)
    frame[SWEEP] = str(path.with_suffix(""))
    return _with_columns(frame, path)


def _with_columns(frame: pd.DataFrame, source: pathlib.Path) -> pd.DataFrame:
    required = ["step", "epoch", "train_loss", "test_loss"]  # what the tables and plots need
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise RunsNotFound(f"{source} lacks the column(s) {', '.join(missing)}")
    # Empty cells (a loss not evaluated) are NaN; anything else must be a number.
    present = [c for c in NUMERIC if c in frame.columns]
    numbers = {c: pd.to_numeric(frame[c], errors="coerce") for c in present}
    text = [c for c in present if numbers[c].isna().sum() > frame[c].isna().sum()]
    if text:
        raise RunsNotFound(f"{source}: column(s) {', '.join(text)} hold values that are not numbers; {_SKIP_IT}")
    frame = frame.assign(**numbers)
    # A record of an older locoprop (a sweep table without the column) was made in float32.
    frame[PRECISION] = frame[PRECISION].fillna(DEFAULT_PRECISION) if PRECISION in frame else DEFAULT_PRECISION
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = math.nan if column in NUMERIC else None
    return frame
