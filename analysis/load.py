"""Load run directories and sweep tables into one tidy DataFrame (SPEC §9).

One row per evaluation of one run, with the columns of :data:`COLUMNS` and
one ``hp_<name>`` column per hyperparameter. A *run* is a run directory
(config.json + metrics.csv + summary.json) or one trial of a sweep table
(CSV or Parquet with the same columns plus ``run_id``). Analysis reads only
these files: it never re-runs code.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from collections.abc import Iterable

import pandas as pd

from sweeps.schema import (
    CONFIG,
    HPARAM_PREFIX,
    METRIC_COLUMNS,
    METRICS,
    RUN_ID,
    RUN_LABELS,
    RUNNING,
    STATUS,
    STEP_TIME_COLUMN,
    SUMMARY,
    SWEEP_TABLE,
    run_labels,
)

__all__ = ["COLUMNS", "RunSkipped", "RunsNotFound", "final_rows", "load_results"]

# Every loaded frame has these columns (None where a record lacks one).
COLUMNS = [RUN_ID, *RUN_LABELS, STATUS, *METRIC_COLUMNS, STEP_TIME_COLUMN]
TABLE_SUFFIXES = (".csv", ".parquet")
_SKIP_IT = "leave it out of the inputs, or fix or remove it"  # what to do about an unreadable run file


class RunsNotFound(ValueError):
    """Nothing readable was found; the message names the path and why."""


class RunSkipped(UserWarning):
    """A damaged run in a folder of runs was left out; the message names it and why."""


def load_results(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Every run under ``paths`` (run directories, folders of them, tables)."""
    frames = []
    for path in map(pathlib.Path, paths):
        if not path.exists():
            raise RunsNotFound(f"{path} does not exist")
        if path.is_file():
            if path.suffix not in TABLE_SUFFIXES:
                raise RunsNotFound(f"{path} is not a run directory or a results table (.csv or .parquet)")
            frames.append(_read_table(path))
            continue
        found = _find_runs(path)
        if not found:
            raise RunsNotFound(
                f"No run directories (with config.json) or results tables found in {path}; "
                "point to the --out folder of locoprop train, compare or sweep"
            )
        frames += _read_found(found)
    if not frames:
        raise RunsNotFound("No inputs given")
    frame = pd.concat(frames, ignore_index=True)
    hp_columns = sorted(c for c in frame.columns if c.startswith(HPARAM_PREFIX))
    others = [c for c in frame.columns if c not in COLUMNS and c not in hp_columns]
    return frame[COLUMNS + others + hp_columns]


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


def final_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The last evaluation of every run."""
    ordered = frame.sort_values(["run_id", "step", "epoch"])
    return ordered.groupby("run_id", sort=False).tail(1).reset_index(drop=True)


def _find_runs(folder: pathlib.Path) -> list[pathlib.Path]:
    if (folder / CONFIG).exists():
        return [folder]
    # A sweep folder's table already holds its trials' runs: read the table,
    # not the run directories beneath it, so nothing is counted twice.
    tables = sorted(folder.rglob(f"{SWEEP_TABLE}.csv"))
    sweep_folders = {t.parent for t in tables}
    runs = sorted(p.parent for p in folder.rglob(CONFIG))
    runs = [r for r in runs if not any(parent in sweep_folders for parent in r.parents)]
    # Keep the outermost run directory where back ends nest copies inside one.
    runs = [r for r in runs if not any(parent in runs for parent in r.parents)]
    return runs + tables


def _read_run(run_dir: pathlib.Path) -> pd.DataFrame:
    metrics = run_dir / METRICS
    if not metrics.exists():
        raise RunsNotFound(f"Run directory {run_dir} has no metrics.csv (the run never evaluated)")
    config = _read_json(run_dir / CONFIG, required=RUN_LABELS)
    summary_path = run_dir / SUMMARY
    # A run without summary.json is still going, or was killed hard.
    status = _read_json(summary_path, required=(STATUS,))[STATUS] if summary_path.exists() else RUNNING
    frame = _read_file(metrics, pd.read_csv)
    if frame.empty:
        raise RunsNotFound(f"Run directory {run_dir} has an empty metrics.csv")
    frame[RUN_ID] = str(run_dir)
    frame = frame.assign(**run_labels(config, status))
    return _with_columns(frame, metrics)


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
    frame[RUN_ID] = str(path) + "#" + frame[RUN_ID].astype(str)
    return _with_columns(frame, path)


def _with_columns(frame: pd.DataFrame, source: pathlib.Path) -> pd.DataFrame:
    required = ["step", "epoch", "train_loss", "test_loss"]  # what the tables and plots need
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise RunsNotFound(f"{source} lacks the column(s) {', '.join(missing)}")
    # Empty cells (a loss not evaluated) are NaN; anything else must be a number.
    numbers = {c: pd.to_numeric(frame[c], errors="coerce") for c in required}
    text = [c for c in required if numbers[c].isna().sum() > frame[c].isna().sum()]
    if text:
        raise RunsNotFound(f"{source}: column(s) {', '.join(text)} hold values that are not numbers; {_SKIP_IT}")
    frame = frame.assign(**numbers)
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    return frame
