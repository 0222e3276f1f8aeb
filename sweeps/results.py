"""The tidy results table both sweep back ends export (SPEC §8).

One row per evaluation of every trial, the columns of ``analysis.load``
plus ``trial`` and ``hp_<name>`` per hyperparameter; written as
``sweep_results.csv`` and ``sweep_results.parquet`` in the sweep's folder,
where ``locoprop report`` finds them.
"""

from __future__ import annotations

import pathlib

import pandas as pd
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

__all__ = ["TABLE_STEM", "export_results", "mask_url"]

TABLE_STEM = "sweep_results"


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        # Not an RDB URL; still hide anything that looks like user:password@.
        head, sep, tail = url.rpartition("@")
        if not sep or "://" not in head:
            return url
        scheme, _, credentials = head.partition("://")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{tail}"


def export_results(trials: list[dict], out: pathlib.Path) -> pathlib.Path:
    """Write the table for ``trials`` (trial, run_dir, status, optimizer,
    workload, data, seed, hparams) and return the CSV path."""
    frames = []
    for trial in trials:
        metrics = pathlib.Path(trial["run_dir"] or "") / "metrics.csv"
        if not trial["run_dir"] or not metrics.exists():
            continue  # failed before its first evaluation: nothing to plot
        frame = pd.read_csv(metrics)
        frame.insert(0, "run_id", trial["trial"])
        frame.insert(1, "trial", trial["trial"])
        for key in ("optimizer", "workload", "data", "seed", "status", "run_dir"):
            frame[key] = trial[key]
        for name, value in trial["hparams"].items():
            frame[f"hp_{name}"] = value
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "trial"])
    csv_path = out / f"{TABLE_STEM}.csv"
    table.to_csv(csv_path, index=False)
    table.to_parquet(out / f"{TABLE_STEM}.parquet", index=False)
    return csv_path
