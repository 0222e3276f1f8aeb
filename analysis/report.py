"""``locoprop report``: tables and plots from run directories and sweep tables."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

from analysis import plots
from analysis.load import load_results
from analysis.tables import TIME_TO_TARGET_RULE, default_target, format_markdown, summary_table, time_to_target

__all__ = ["write_report"]


def write_report(
    inputs: Iterable[str | pathlib.Path], out: str | pathlib.Path, target_loss: float | None = None
) -> pathlib.Path:
    """Write results tables (Markdown, CSV), figures (PNG, PDF) and ``report.md`` to ``out``.

    Returns the path of report.md. ``target_loss`` defaults, per workload,
    to the mean final training loss of the best first-order baseline.
    """
    frame = load_results(inputs)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = target_loss if target_loss is not None else default_target(frame)

    table = summary_table(frame, targets)
    table.to_csv(out / "results.csv", index=False)
    markdown = format_markdown(table)
    (out / "results.md").write_text(markdown + "\n")
    time_to_target(frame, targets).to_csv(out / "time_to_target.csv", index=False)
    frame.to_csv(out / "all_runs.csv", index=False)

    sections = ["# Results", "", _target_note(targets), "", markdown, "", TIME_TO_TARGET_RULE, ""]
    for x, metric, title in [
        ("epoch", "train_loss", "Training loss per epoch"),
        ("wall_time_s", "train_loss", "Training loss against training time"),
        ("epoch", "test_loss", "Test loss per epoch"),
    ]:
        sections += [f"## {title}", ""]
        for (workload, data), figure in plots.loss_curves(frame, x=x, metric=metric).items():
            stem = f"{metric}_vs_{'time' if x == 'wall_time_s' else x}_{workload}_{data}"
            plots.save(figure, out / stem)
            sections += [f"![{title}: {workload} on {data}]({stem}.png)", ""]
    sensitivity = plots.sensitivity(frame)
    if sensitivity:
        sections += ["## Sensitivity to hyperparameters", ""]
        for optimizer, figure in sensitivity.items():
            plots.save(figure, out / f"sensitivity_{optimizer}")
            sections += [f"![sensitivity of {optimizer}](sensitivity_{optimizer}.png)", ""]
    if not (isinstance(targets, dict) and not targets):
        plots.save(plots.performance_profile(frame, targets), out / "performance_profile")
        sections += [
            "## Performance profile",
            "",
            "Fraction of workloads on which an optimizer's median time to target is within a factor τ of the "
            "fastest optimizer's (the table's seconds to target; 'not reached' counts as never).",
            "",
            "![performance profile](performance_profile.png)",
            "",
        ]
    report = out / "report.md"
    report.write_text("\n".join(sections))
    return report


def _target_note(targets) -> str:
    if isinstance(targets, (int, float)):
        return f"Target training loss: {targets:.4g} (given)."
    if not targets:
        return "No first-order baseline finished, so there is no default target loss; pass --target-loss."
    parts = [f"{w}/{d}: {t:.4g}" for (w, d), t in sorted(targets.items())]
    return "Target training loss (mean final loss of the best first-order baseline): " + "; ".join(parts) + "."
