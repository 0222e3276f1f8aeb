"""Run directories (SPEC §6): config.json, metrics.csv, summary.json, checkpoint.pt.

Files are replaced atomically (write, then rename) so that a crash leaves
either the old or the new version, never half of one; metrics.csv is the
exception (a row is appended per evaluation), which is why the checkpoint
holds the rows too and a resumed run rewrites metrics.csv from it.

JSON files are strict JSON: a float that is not finite (a diverged run's
NaN or infinite loss) is written as null; metrics.csv keeps the exact value
("nan", "inf"). A file that cannot be read raises :class:`DamagedRecord`,
a ValueError whose message names the file and what to do.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import platform
import sys
from typing import Any

import torch

from sweeps.schema import CHECKPOINT, CONFIG, METRIC_COLUMNS, METRICS, SUMMARY  # re-exported for the runner

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_KEYS",
    "CONFIG",
    "METRICS",
    "RUN_AGAIN",
    "START_AFRESH",
    "SUMMARY",
    "DamagedRecord",
    "MetricsWriter",
    "RecordRebuilt",
    "field_differences",
    "finite_or_null",
    "first_line",
    "load_checkpoint",
    "metrics_damage",
    "read_history",
    "read_json",
    "save_checkpoint",
    "versions",
    "write_json",
]

# What sweeps.runner.train puts in a checkpoint; a file without one of them is not one of its checkpoints.
CHECKPOINT_KEYS = (
    "config",
    "calibration",
    "horizon",
    "step",
    "wall_time",
    "initial_train_loss",
    "step_times",
    "metrics",
    "model",
    "optimizer",
    "torch_rng",
    "cuda_rng",
)
# What to do about a damaged record: of a run to resume, of a finished run.
START_AFRESH = "remove it (or run without --resume) to start the run afresh"
RUN_AGAIN = "remove the run directory to run it again"
# The metrics.csv columns every run has (others depend on the workload and optimizer).
REQUIRED_COLUMNS = METRIC_COLUMNS


class DamagedRecord(ValueError):
    """A run-directory file that cannot be read or does not fit the run; the
    message names the file and what to do."""


def field_differences(stored: dict, current: dict, labels: tuple[str, str], normalise=None) -> list[str]:
    """``"key: A <stored label>, B <current label>"`` for every key whose value
    differs, compared after ``normalise`` (a function of the whole dict)."""
    a, b = (normalise(stored), normalise(current)) if normalise else (stored, current)
    return [f"{k}: {stored.get(k)!r} {labels[0]}, {current.get(k)!r} {labels[1]}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]  # fmt: skip


def write_json(path: pathlib.Path, data: dict) -> None:
    """Write strict JSON atomically; non-finite floats become null (see :func:`finite_or_null`)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(finite_or_null(data), indent=2, sort_keys=False, default=_jsonable, allow_nan=False)
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def finite_or_null(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, ±inf) replaced by None, in nested dicts and lists.

    JSON has no NaN or Infinity; null says "no finite value", and the run's
    status says why (a diverged run).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def read_json(path: pathlib.Path) -> dict:
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedRecord(f"{path} is not valid JSON ({err}); repair or remove it") from None
    if not isinstance(data, dict):
        raise DamagedRecord(f"{path} holds a JSON {type(data).__name__}, not an object; repair or remove it")
    return data


def _jsonable(value: Any):
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, pathlib.Path):
        return str(value)
    return repr(value)


def first_line(err: BaseException) -> str:
    """An exception as one line for a message: its type and the first line of its text
    (torch's loading errors run to several lines of advice that does not apply here)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def save_checkpoint(path: pathlib.Path, state: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: pathlib.Path) -> dict:
    """The checkpoint at ``path``, with every key of :data:`CHECKPOINT_KEYS`.

    Raises:
        DamagedRecord: the file cannot be loaded (truncated, overwritten, not
            a checkpoint) or lacks a key.
    """
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises whatever its unpickler meets: EOFError, KeyError, RuntimeError, …
        raise DamagedRecord(f"{path} cannot be read ({first_line(err)}); {START_AFRESH}") from None
    if not isinstance(state, dict):
        raise DamagedRecord(f"{path} holds a {type(state).__name__}, not a locoprop checkpoint; {START_AFRESH}")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise DamagedRecord(
            f"{path} lacks {', '.join(missing)} (damaged, or written by an older locoprop); {START_AFRESH}"
        )
    return state


def read_history(path: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of metrics.csv: integers as int, other numbers as float, empty cells as None.

    Raises:
        DamagedRecord: the file is missing, lacks a required column, or holds
            a cell that is not a number, naming the line.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise DamagedRecord(f"{path} is missing; {RUN_AGAIN}")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DamagedRecord(f"{path} lacks the column(s) {', '.join(missing)}; {RUN_AGAIN}")
        return [_parse_row(row, path, reader.line_num) for row in reader]


def _parse_row(row: dict[str | None, Any], path: pathlib.Path, line: int) -> dict[str, Any]:
    if None in row or None in row.values():  # more, or fewer, cells than the header has
        raise DamagedRecord(f"{path}, line {line}: the row does not fit the header; {RUN_AGAIN}")
    try:
        return {key: _number(text) for key, text in row.items()}
    except ValueError:
        raise DamagedRecord(f"{path}, line {line}: a cell is not a number ({row}); {RUN_AGAIN}") from None


def _number(text: str) -> int | float | None:
    if text == "":
        return None
    # MetricsWriter writes ints as ints and floats by repr ("1.0", "nan"), so each comes back as it went in.
    return int(text) if text.lstrip("-").isdigit() else float(text)


class RecordRebuilt(UserWarning):
    """A damaged record of a run being resumed was rebuilt from its checkpoint; the message names it."""


def metrics_damage(path: pathlib.Path, rows: list[dict[str, Any]]) -> str | None:
    """Why metrics.csv at ``path`` does not begin with ``rows`` (a checkpoint's), or None if it does.

    Rows after them are fine: the evaluation of an epoch whose checkpoint was
    not written yet, which the resumed run redoes.
    """
    try:
        history = read_history(path)
    except DamagedRecord as err:
        return str(err).split("; ")[0].removeprefix(f"{path} ").removeprefix(f"{path}, ")
    if len(history) < len(rows):
        return f"holds {len(history)} of the checkpoint's {len(rows)} evaluations"
    for line, (found, saved) in enumerate(zip(history, rows), start=2):
        differing = [key for key, value in saved.items() if not _same_number(found.get(key), value)]
        if differing:
            return f"line {line} differs from the checkpoint ({', '.join(differing)})"
    return None


def _same_number(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


class MetricsWriter:
    """Writes metrics.csv: the header and ``rows`` (a resumed run's, from its
    checkpoint), then one appended row per evaluation."""

    def __init__(self, path: pathlib.Path, columns: list[str], rows: list[dict[str, Any]] = ()):
        self.path = path
        self.columns = columns
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self._cells(row) for row in rows)
        os.replace(tmp, path)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow(self._cells(row))

    def _cells(self, row: dict[str, Any]) -> dict[str, Any]:
        return {c: _format(row.get(c)) for c in self.columns}


def _format(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # exact round trip
    return value


def versions() -> dict[str, str]:
    import numpy

    import locoprop

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "locoprop": locoprop.__version__,
        "platform": platform.platform(),
    }
