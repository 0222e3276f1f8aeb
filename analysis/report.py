"""``locoprop report`` and the report of ``locoprop compare``: tables and plots from run directories and sweep tables.

report.md opens with the protocol (budget, precision, tuning and its cost,
seeds, splits) and the trials of any sweep among the inputs by outcome, then
the headline at the budget with the LocoProp-vs-baseline
sentences, time to several targets, the curves, the details, sensitivity
and the performance profile. Files written to the output folder:

- results.md: the headline table(s) and the pair sentences (what
  ``locoprop compare`` prints); results.csv: the headline table;
  pairs.csv: the pairs with their Welch intervals;
- time_to_target.csv: per optimizer and target, the medians by the
  time-to-target rule; time_to_target_runs.csv: per run and target;
  targets.csv: the targets, with the reason where one is skipped (a target
  the baseline met before training measures nothing);
- summary.csv: the details table; all_runs.csv: the tidy frame;
- sweeps.csv (with sweep tables among the inputs): per study and optimizer,
  its trials by outcome (finished, pruned, diverged, failed);
- figures, PNG and PDF.
"""

from __future__ import annotations

import math
import numbers
import pathlib
from collections.abc import Iterable
from typing import Any

import pandas as pd

from analysis import plots
from analysis.headline import format_headline, headline_table, pair_table
from analysis.load import label_precisions, load_results, read_compare_folders
from analysis.protocol import protocol_section
from analysis.tables import (
    TIME_TO_TARGET_RULE,
    budget_targets,
    format_markdown,
    format_target_table,
    given_targets,
    meaningful_targets,
    selection_metric,
    summary_table,
    target_table,
    time_to_target,
)
from analysis.text import METRIC_NAMES
from analysis.trials import sweep_section

__all__ = ["write_report"]

NO_FINAL_RUNS = "no final runs: no tuning trial finished its budget (every one diverged or failed)"


def write_report(
    inputs: Iterable[str | pathlib.Path],
    out: str | pathlib.Path,
    target_loss: float | None = None,
    protocol: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write report.md, its tables (Markdown, CSV) and figures (PNG, PDF) to ``out``; returns report.md's path.

    ``protocol`` is ``locoprop compare``'s protocol.json; without it the
    protocol section is derived from the runs. A compare folder among the
    ``inputs`` is read as its final runs; given alone, its protocol.json is the
    protocol (:func:`analysis.load.read_compare_folders`), so that its report
    is the one compare wrote. Comparisons and targets use
    the validation loss (the training loss for runs that recorded none).
    ``target_loss`` replaces the targets (by default the best first-order
    baseline's loss at 25%, 50% and 100% of its training time) by one.
    """
    if target_loss is not None and not (isinstance(target_loss, numbers.Real) and math.isfinite(target_loss)):
        raise ValueError(f"Invalid target loss: {target_loss!r}; expected a finite number")
    inputs, found = read_compare_folders(inputs)
    protocol = protocol if protocol is not None else found
    frame = label_precisions(load_results(inputs))  # runs in fp32 and bf16 are never pooled
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = selection_metric(frame)

    headline = headline_table(frame, metric, without_runs=_without_runs(protocol))
    pairs = pair_table(frame, metric)
    headline.to_csv(out / "results.csv", index=False)
    pairs.to_csv(out / "pairs.csv", index=False)
    (out / "results.md").write_text(format_headline(headline, pairs, metric))
    frame.to_csv(out / "all_runs.csv", index=False)

    targets = budget_targets(frame, metric) if target_loss is None else given_targets(frame, target_loss)
    profile_targets = _profile_targets(targets, target_loss)
    details = summary_table(frame, profile_targets, metric)
    details.to_csv(out / "summary.csv", index=False)

    sections = [_title(protocol), "", *protocol_section(frame, protocol), *sweep_section(frame, out)]
    sections += [format_headline(headline, pairs, metric), *_target_section(frame, targets, metric, out)]
    sections += _curves_section(frame, metric, out) + _gamma_section(frame, out)
    sections += ["## Details: final and best losses, step time", "", format_markdown(details), ""]
    sections += _sensitivity_section(frame, metric, out) + _profile_section(frame, profile_targets, metric, out)
    report = out / "report.md"
    report.write_text("\n".join(sections))
    return report


def _title(protocol: dict[str, Any] | None) -> str:
    if protocol and protocol.get("workload"):
        return f"# Comparison: {protocol['workload']} on {protocol.get('data')}"
    return "# Results"


def _without_runs(protocol: dict[str, Any] | None) -> dict[str, str]:
    """Optimizers of a tuned comparison that got no final runs, with the reason, so the headline lists them."""
    studies = ((protocol or {}).get("tuning") or {}).get("optimizers") or {}
    return {name: NO_FINAL_RUNS for name, study in studies.items() if not study.get("best")}


def _profile_targets(targets: pd.DataFrame, target_loss: float | None):
    """The performance profile's target: the given one, else each workload's 100% target (none where it is
    skipped)."""
    if target_loss is not None:
        return float(target_loss)
    full = meaningful_targets(targets)
    full = full[full["fraction"] == 1.0]
    return {(row.workload, row.data): float(row.target) for row in full.itertuples()}


def _target_section(frame: pd.DataFrame, targets: pd.DataFrame, metric: str, out: pathlib.Path) -> list[str]:
    """Time to each target, per workload; the targets and the rule in words."""
    name = METRIC_NAMES.get(metric, metric)
    table = target_table(frame, targets, metric)
    table.to_csv(out / "time_to_target.csv", index=False)
    targets.to_csv(out / "targets.csv", index=False)
    reach = [
        time_to_target(frame, float(t.target), metric).assign(fraction=t.fraction)
        for t in meaningful_targets(targets).itertuples()
    ]
    if reach:
        pd.concat(reach, ignore_index=True).to_csv(out / "time_to_target_runs.csv", index=False)
    lines = ["## Time to target", ""]
    if targets["fraction"].notna().any():
        lines += [
            f"Targets: the {name} that the best first-order baseline reached at 25%, 50% and 100% of its training "
            "time: per run, its last evaluation within that share of the run's training time; the target is the "
            "median over its finished runs (with an even number, the upper middle value, so that more than half "
            "of its runs reach it, as the rule below asks).",
            "",
        ]
    lines += [TIME_TO_TARGET_RULE, ""]
    for (workload, data), _ in frame.groupby(["workload", "data"], sort=True):
        lines += [f"### {workload} on {data}", ""]
        if not ((targets["workload"] == workload) & (targets["data"] == data)).any():
            lines += ["No first-order baseline finished here, so there are no default targets; pass --target-loss.", ""]
            continue
        lines += [format_target_table(table, targets, workload, data), ""]
    return lines


def _curves_section(frame: pd.DataFrame, metric: str, out: pathlib.Path) -> list[str]:
    """Loss against training time (the headline plot), steps and epochs; and training loss against time."""
    name = METRIC_NAMES.get(metric, metric)
    curves = [
        ("wall_time_s", metric, f"{name.capitalize()} against training time (the headline plot)"),
        ("step", metric, f"{name.capitalize()} against optimizer steps"),
        ("epoch", metric, f"{name.capitalize()} against epochs"),
    ]
    if metric != "train_loss":
        curves.append(("wall_time_s", "train_loss", "Training loss against training time"))
    lines = [
        "## Curves",
        "",
        "Median over seeds, shaded from the lowest to the highest seed; diverged runs are left out of the lines "
        "and counted in the legend. Under a time budget the runs take different numbers of steps, so the plots "
        "against steps and epochs compare progress per step, not per second.",
        "",
    ]
    for x, y, title in curves:
        lines += [f"### {title}", ""]
        for (workload, data), figure in plots.loss_curves(frame, x=x, metric=y).items():
            stem = f"{y}_vs_{'time' if x == 'wall_time_s' else x}_{workload}_{data}"
            plots.save(figure, out / stem)
            lines += [f"![{title}: {workload} on {data}]({stem}.png)", ""]
    return lines


def _gamma_section(frame: pd.DataFrame, out: pathlib.Path) -> list[str]:
    """γ over training, for runs that adapted it by hypergradients (nothing otherwise)."""
    figures = plots.adapted_gammas(frame)
    if not figures:
        return []
    lines = [
        "## Activation learning rates adapted by hypergradients",
        "",
        "Each unit's γ against optimizer steps (γ ← γ·exp(−β·h·γ) every step, SPEC §12): the median over seeds, "
        "shaded from the lowest to the highest seed.",
        "",
    ]
    for (workload, data, optimizer), figure in figures.items():
        stem = f"gamma_vs_step_{optimizer}_{workload}_{data}"
        plots.save(figure, out / stem)
        lines += [f"![γ per unit: {optimizer}, {workload} on {data}]({stem}.png)", ""]
    return lines


def _sensitivity_section(frame: pd.DataFrame, metric: str, out: pathlib.Path) -> list[str]:
    figures = plots.sensitivity(frame, metric)
    if not figures:
        return []
    lines = ["## Sensitivity to hyperparameters", ""]
    for optimizer, figure in figures.items():
        plots.save(figure, out / f"sensitivity_{optimizer}")
        lines += [f"![sensitivity of {optimizer}](sensitivity_{optimizer}.png)", ""]
    return lines


def _profile_section(frame: pd.DataFrame, targets, metric: str, out: pathlib.Path) -> list[str]:
    if isinstance(targets, dict) and not targets:
        return []
    plots.save(plots.performance_profile(frame, targets, metric=metric), out / "performance_profile")
    return [
        "## Performance profile",
        "",
        "Fraction of workloads on which an optimizer's median time to the 100% target (or the given one) is within "
        "a factor τ of the fastest optimizer's: the seconds of the time-to-target table. " + TIME_TO_TARGET_RULE,
        "",
        "![performance profile](performance_profile.png)",
        "",
    ]
