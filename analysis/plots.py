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
from analysis.tables import performance_ratios, selection_metric
from analysis.text import METRIC_NAMES
from sweeps.schema import ADAPTED_GAMMA_PREFIX, BUDGET, BUDGET_KIND, DIVERGED, STATUS

__all__ = ["adapted_gammas", "loss_curves", "median_curve", "performance_profile", "save", "sensitivity"]

X_LABELS = {"epoch": "epoch", "wall_time_s": "training time (s)", "step": "optimizer step"}
METRIC_LABELS = METRIC_NAMES


def save(figure: Figure, stem: pathlib.Path) -> list[pathlib.Path]:
    """Write ``stem``.png and ``stem``.pdf."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def _spans_decades(values: np.ndarray) -> bool:
    values = values[np.isfinite(values)]
    return len(values) > 0 and values.min() > 0 and values.max() / values.min() > 10


def median_curve(runs: pd.DataFrame, x: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(xs, median, min, max) of ``metric`` against ``x`` over the runs (seeds).

    Seeds evaluate at different x (a time budget gives each run its own
    steps and times), so each run's curve is interpolated linearly onto the
    union of all runs' x. Past its last evaluation a run keeps its final
    value (its result at the budget), so that a seed ending a fraction of a
    second early does not make the median jump at the end.
    """
    curves = []
    for _, run in runs.groupby("run_id", sort=True):
        run = run[[x, metric]].astype(float).dropna().sort_values(x)
        if len(run):
            curves.append((run[x].to_numpy(), run[metric].to_numpy()))
    grid = np.unique(np.concatenate([xs for xs, _ in curves]))
    values = np.array([np.interp(grid, xs, ys) for xs, ys in curves])  # constant beyond either end
    return grid, np.median(values, axis=0), values.min(axis=0), values.max(axis=0)


def loss_curves(frame: pd.DataFrame, x: str = "epoch", metric: str = "train_loss") -> dict[tuple[str, str], Figure]:
    """Loss against ``x`` ("epoch", "step" or "wall_time_s"), one figure per (workload, data).

    One line per optimizer: the median over its runs (seeds, by
    :func:`median_curve`), with the min–max spread shaded. Diverged runs
    are left out of the line and counted in the legend. Against training
    time, a dashed line marks a time budget the runs share. The y axis is
    logarithmic when the plotted losses span more than a decade.
    """
    figures = {}
    for (workload, data), group in frame.groupby(["workload", "data"], sort=True):
        figure = Figure(figsize=(6.0, 4.0))
        ax = figure.add_subplot()
        plotted = []
        for optimizer, runs in group.groupby("optimizer", sort=True):
            diverged = runs.loc[runs[STATUS] == DIVERGED, "run_id"].nunique()
            usable = runs[(runs[STATUS] != DIVERGED) & runs[metric].notna()]
            label = optimizer + (f" ({diverged} diverged)" if diverged else "")
            if usable.empty:
                ax.plot([], [], label=label)
                continue
            xs, median, low, high = median_curve(usable, x, metric)
            (line,) = ax.plot(xs, median, label=label, linewidth=1.6)
            if usable["run_id"].nunique() > 1:
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
            plotted.append(median)
        budgets = set(zip(group[BUDGET_KIND], group[BUDGET]))
        if x == "wall_time_s" and len(budgets) == 1 and (budget := budgets.pop())[0] == "time":
            ax.axvline(budget[1], color="grey", linestyle="--", linewidth=0.8, label="time budget")
        if plotted and _spans_decades(np.concatenate(plotted)):
            ax.set_yscale("log")
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(f"{workload} on {data}")
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize="small")
        figures[(workload, data)] = figure
    return figures


def adapted_gammas(frame: pd.DataFrame) -> dict[tuple[str, str, str], Figure]:
    """γ of each unit against optimizer steps, for the runs whose optimizer adapted it (hypergradients,
    metrics columns ``gamma/UNIT``): one figure per (workload, data, optimizer), one line per unit (the
    median over its runs, shaded from the lowest to the highest), on a logarithmic axis (γ moves by factors)."""
    columns = [c for c in frame.columns if c.startswith(ADAPTED_GAMMA_PREFIX)]
    figures = {}
    if not columns:
        return figures
    adapted = frame[frame[columns].notna().any(axis=1)]
    for (workload, data, optimizer), runs in adapted.groupby(["workload", "data", "optimizer"], sort=True):
        figure = Figure(figsize=(6.0, 4.0))
        ax = figure.add_subplot()
        for column in columns:
            usable = runs[runs[column].notna()]
            if usable.empty:
                continue
            xs, median, low, high = median_curve(usable, "step", column)
            (line,) = ax.plot(xs, median, label=column.removeprefix(ADAPTED_GAMMA_PREFIX), linewidth=1.4)
            if usable["run_id"].nunique() > 1:
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
        ax.set_yscale("log")
        ax.set_xlabel(X_LABELS["step"])
        ax.set_ylabel("activation learning rate γ")
        ax.set_title(f"{optimizer}: γ per unit, {workload} on {data}")
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize="small", title="unit", ncol=2)
        figures[(workload, data, optimizer)] = figure
    return figures


def sensitivity(frame: pd.DataFrame, metric: str | None = None) -> dict[str, Figure]:
    """Final loss against each hyperparameter that varies, one figure per optimizer.

    Each searched hyperparameter (an ``hp_`` column with several numeric
    values) gets a panel of the final ``metric`` of every run; diverged runs
    are drawn as crosses at the top of the panel. ``metric`` defaults to
    the validation loss (:func:`analysis.tables.selection_metric`).
    """
    metric = metric or selection_metric(frame)
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
    frame: pd.DataFrame, targets: dict[tuple[str, str], float] | float, tau_max: float = 10.0, metric: str | None = None
) -> Figure:
    """Dolan–Moré performance profile of time-to-target across workloads.

    For optimizer o and workload w, r = t(o, w) / min_o' t(o', w), with t
    the median training seconds to reach the target over o's runs, by the
    summary table's rule (:data:`analysis.tables.TIME_TO_TARGET_RULE`: a
    run that never reached it counts as ∞); the curve is ρ_o(τ) = fraction
    of workloads with r ≤ τ, for τ ∈ [1, τ_max].
    """
    ratios = performance_ratios(frame, targets, metric)
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
