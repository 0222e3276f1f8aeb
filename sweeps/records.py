"""Run directories (SPEC §6): config.json, metrics.csv, summary.json, checkpoint.pt.

Files are replaced atomically (write, then rename) so that a crash leaves
either the old or the new version, never half of one.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import platform
import sys
from typing import Any

import torch

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "METRICS",
    "SUMMARY",
    "MetricsWriter",
    "read_json",
    "read_metrics",
    "versions",
    "write_json",
]

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.csv", "summary.json", "checkpoint.pt"


def write_json(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def read_json(path: pathlib.Path) -> dict:
    return json.loads(pathlib.Path(path).read_text())


def _jsonable(value: Any):
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, pathlib.Path):
        return str(value)
    return repr(value)


def save_checkpoint(path: pathlib.Path, state: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: pathlib.Path) -> dict:
    # weights_only: a checkpoint is data (tensors, numbers, strings), never code.
    return torch.load(path, map_location="cpu", weights_only=True)


def read_metrics(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class MetricsWriter:
    """Appends evaluation rows to metrics.csv with a fixed header."""

    def __init__(self, path: pathlib.Path, columns: list[str], keep_until_epoch: int | None = None):
        self.path = path
        self.columns = columns
        rows = []
        if keep_until_epoch is not None and path.exists():
            # Resuming: rows written after the checkpoint are redone.
            rows = [r for r in read_metrics(path) if int(r["epoch"]) <= keep_until_epoch]
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows({c: r.get(c, "") for c in columns} for r in rows)
        os.replace(tmp, path)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.columns).writerow({c: _format(row.get(c)) for c in self.columns})


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
