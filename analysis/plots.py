"""Figures for a paper (SPEC §9), built from the tidy frame only.

Every function returns matplotlib ``Figure`` objects (no pyplot state, so
they work in scripts, notebooks and tests alike); :func:`save` writes PNG
and PDF.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.load import final_rows
from analysis.tables import performance_ratios
from sweeps.schema import DIVERGED, STATUS

__all__ = ["loss_curves", "performance_profile", "save", "sensitivity"]

X_LABELS = {"epoch": "epoch", "wall_time_s": "training time (s)", "step": "step"}
METRIC_LABELS = {"train_loss": "training loss", "test_loss": "test loss"}


def save(figure: Figure, stem: pathlib.Path) -> list[pathlib.Path]:
    """Write ``stem``.png and ``stem``.pdf."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def _spans_decades(values: np.ndarray) -> bool:
    values = values[np.isfinite(values)]
    return len(values) > 0 and values.min() > 0 and values.max() / values.min() > 10


def loss_curves(frame: pd.DataFrame, x: str = "epoch", metric: str = "train_loss") -> dict[tuple[str, str], Figure]:
    """Loss against ``x`` ("epoch" or "wall_time_s"), one figure per (workload, data).

    One line per optimizer: the median over its runs (seeds), with the
    min–max spread shaded. Diverged runs are left out of the line and
    counted in the legend. The y axis is logarithmic when the plotted
    losses span more than a decade.
    """
    figures = {}
    for (workload, data), group in frame.groupby(["workload", "data"], sort=True):
        figure = Figure(figsize=(6.0, 4.0))
        ax = figure.add_subplot()
        plotted = []
        for optimizer, runs in group.groupby("optimizer", sort=True):
            diverged = runs.loc[runs[STATUS] == DIVERGED, "run_id"].nunique()
            usable = runs[runs[STATUS] != DIVERGED]
            label = optimizer + (f" ({diverged} diverged)" if diverged else "")
            if usable.empty:
                ax.plot([], [], label=label)
                continue
            values = usable.pivot_table(index="epoch", columns="run_id", values=metric)
            xs = values.index.to_numpy(dtype=float)
            if x != "epoch":  # seeds differ in time per epoch: use the median
                xs = usable.pivot_table(index="epoch", columns="run_id", values=x).median(axis=1).to_numpy()
            median = values.median(axis=1).to_numpy()
            (line,) = ax.plot(xs, median, label=label, linewidth=1.6)
            if values.shape[1] > 1:
                ax.fill_between(xs, values.min(axis=1), values.max(axis=1), color=line.get_color(), alpha=0.2)
            plotted.append(median)
        if plotted and _spans_decades(np.concatenate(plotted)):
            ax.set_yscale("log")
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(f"{workload} on {data}")
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize="small")
        figures[(workload, data)] = figure
    return figures


def sensitivity(frame: pd.DataFrame, metric: str = "train_loss") -> dict[str, Figure]:
    """Final loss against each hyperparameter that varies, one figure per optimizer.

    Each searched hyperparameter (an ``hp_`` column with several numeric
    values) gets a panel of the final ``metric`` of every run; diverged runs
    are drawn as crosses at the top of the panel.
    """
    finals = final_rows(frame)
    figures = {}
    for optimizer, runs in finals.groupby("optimizer", sort=True):
        varied = [
            c
            for c in runs.columns
            if c.startswith("hp_") and pd.api.types.is_numeric_dtype(runs[c]) and runs[c].nunique(dropna=True) > 1
        ]
        if not varied:
            continue
        figure = Figure(figsize=(3.2 * len(varied), 3.0))
        axes = figure.subplots(1, len(varied), squeeze=False)[0]
        ok = runs[(runs[STATUS] != DIVERGED) & np.isfinite(runs[metric].astype(float))]
        bad = runs.drop(ok.index)
        for ax, column in zip(axes, varied):
            ax.scatter(ok[column], ok[metric], s=18, label="final")
            if len(bad):
                top = ok[metric].max() if len(ok) else 1.0
                ax.scatter(bad[column], [top] * len(bad), marker="x", color="red", label="diverged")
            if _spans_decades(runs[column].to_numpy(dtype=float)):
                ax.set_xscale("log")
            ax.set_xlabel(column.removeprefix("hp_"))
            ax.set_ylabel(f"final {METRIC_LABELS.get(metric, metric)}")
            ax.grid(True, alpha=0.3)
        figure.suptitle(f"{optimizer}: sensitivity")
        figure.tight_layout()
        figures[optimizer] = figure
    return figures


def performance_profile(
    frame: pd.DataFrame, targets: dict[tuple[str, str], float] | float, tau_max: float = 10.0
) -> Figure:
    """Dolan–Moré performance profile of time-to-target across workloads.

    For optimizer o and workload w, r = t(o, w) / min_o' t(o', w), with t
    the median training seconds to reach the target over o's runs, by the
    summary table's rule (:data:`analysis.tables.TIME_TO_TARGET_RULE`: a
    run that never reached it counts as ∞); the curve is ρ_o(τ) = fraction
    of workloads with r ≤ τ, for τ ∈ [1, τ_max].
    """
    ratios = performance_ratios(frame, targets)
    taus = np.logspace(0, math.log10(tau_max), 200)
    figure = Figure(figsize=(6.0, 4.0))
    ax = figure.add_subplot()
    for optimizer in ratios.columns:
        r = ratios[optimizer].to_numpy()
        ax.step(taus, [(r <= tau).mean() for tau in taus], where="post", label=optimizer)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("τ (time to target / best time to target)")
    ax.set_ylabel("fraction of workloads")
    ax.set_title(f"Performance profile over {len(ratios)} workload(s)")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    return figure
