"""Comparison tables from the tidy results frame (SPEC §9).

- :func:`time_to_target`: per run, the first evaluation at or below a
  target loss (step and training seconds), NaN where it was never reached.
- :func:`median_to_target`: per workload, data set and optimizer, the
  median steps and seconds to the target by :data:`TIME_TO_TARGET_RULE`;
  the summary table and the performance profile both read it, so that
  they agree.
- :func:`summary_table`: per workload, data set and optimizer: runs,
  diverged runs, final and best train/test loss as mean ± std over the
  runs that finished ("ok"), how many runs reached the target and the
  median steps and seconds to it, median step time and its ratio to
  Adam's on the same workload.
- :func:`performance_ratios`: the ratios r = t / (best t) of a
  performance profile, from the same medians.
- :func:`default_target`: the mean final training loss of the best
  first-order baseline, per workload and data set.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.load import final_rows
from sweeps.schema import DIVERGED, OK, STATUS

__all__ = [
    "FIRST_ORDER",
    "TIME_TO_TARGET_RULE",
    "default_target",
    "format_markdown",
    "median_to_target",
    "performance_ratios",
    "summary_table",
    "time_to_target",
]

FIRST_ORDER = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "rmsprop-tf", "adagrad")
GROUP = ["workload", "data"]
ENTRY = ["workload", "data", "optimizer"]
TO_TARGET = ["steps_to_target", "seconds_to_target"]

TIME_TO_TARGET_RULE = (
    "Steps and seconds to target are medians over all runs of an optimizer on a workload, a run that never "
    "reached the target counting as infinitely slow: they are given only when more than half of the runs reached "
    "it (column 'reached'), and are 'not reached' otherwise. The performance profile uses these same medians."
)


def default_target(frame: pd.DataFrame, metric: str = "train_loss") -> dict[tuple[str, str], float]:
    """Target per (workload, data): the best first-order baseline's mean final loss."""
    finals = final_rows(frame)
    finals = finals[(finals[STATUS] == OK) & finals["optimizer"].isin(FIRST_ORDER)]
    targets = {}
    for key, group in finals.groupby(GROUP):
        means = group.groupby("optimizer")[metric].mean()
        targets[tuple(key)] = float(means.min())
    return targets


def time_to_target(
    frame: pd.DataFrame, targets: dict[tuple[str, str], float] | float, metric: str = "train_loss"
) -> pd.DataFrame:
    """One row per run: run_id, optimizer, workload, data, target, steps_to_target, seconds_to_target."""
    rows = []
    for run_id, run in frame.sort_values(["run_id", "step"]).groupby("run_id", sort=False):
        first = run.iloc[0]
        key = (first["workload"], first["data"])
        target = targets if isinstance(targets, (int, float)) else targets.get(key, math.nan)
        hit = run[run[metric] <= target]
        rows.append(
            {
                "run_id": run_id,
                "optimizer": first["optimizer"],
                "workload": key[0],
                "data": key[1],
                "target": target,
                "steps_to_target": float(hit["step"].iloc[0]) if len(hit) else math.nan,
                "seconds_to_target": float(hit["wall_time_s"].iloc[0]) if len(hit) else math.nan,
            }
        )
    return pd.DataFrame(rows)


def summary_table(frame: pd.DataFrame, targets: dict[tuple[str, str], float] | float | None = None) -> pd.DataFrame:
    """The comparison table; see the module docstring for its columns."""
    if targets is None:
        targets = default_target(frame)
    finals = final_rows(frame)
    reach = time_to_target(frame, targets)
    medians = median_to_target(reach).replace(math.inf, math.nan)  # NaN: "not reached"
    step_times = frame.groupby("run_id")["step_time_s"].median()
    finals = finals.assign(
        target=finals["run_id"].map(reach.set_index("run_id")["target"]),
        run_step_time=finals["run_id"].map(step_times),
    )
    best = frame.groupby("run_id")[["train_loss", "test_loss"]].min()
    finals = finals.assign(
        best_train=finals["run_id"].map(best["train_loss"]), best_test=finals["run_id"].map(best["test_loss"])
    )
    rows = []
    for (workload, data, optimizer), runs in finals.groupby(ENTRY, sort=True):
        ok = runs[runs[STATUS] == OK]
        to_target = medians.loc[(workload, data, optimizer)]
        rows.append(
            {
                "workload": workload,
                "data": data,
                "optimizer": optimizer,
                "runs": len(runs),
                "diverged": int((runs[STATUS] == DIVERGED).sum()),
                "final_train_loss_mean": ok["train_loss"].mean(),
                "final_train_loss_std": _std(ok["train_loss"]),
                "final_test_loss_mean": ok["test_loss"].mean(),
                "final_test_loss_std": _std(ok["test_loss"]),
                "best_train_loss_mean": ok["best_train"].mean(),
                "best_test_loss_mean": ok["best_test"].mean(),
                "target_loss": runs["target"].iloc[0],
                "reached_target": f"{int(to_target['reached'])}/{len(runs)}",
                "steps_to_target": to_target["steps_to_target"],
                "seconds_to_target": to_target["seconds_to_target"],
                "step_time_s": runs["run_step_time"].median(),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    adam = table[table["optimizer"] == "adam"].set_index(["workload", "data"])["step_time_s"]
    table["step_time_ratio_to_adam"] = [
        row.step_time_s / adam.get((row.workload, row.data), np.nan) for row in table.itertuples()
    ]
    return table


def median_to_target(reach: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, data, optimizer): runs, reached, and the median steps and seconds to the target.

    ``reach`` is :func:`time_to_target`'s table. The rule
    (:data:`TIME_TO_TARGET_RULE`): the median over all runs, a run that
    never reached the target counting as ∞, so the median is finite only
    when more than half of the runs reached the target; ∞ otherwise. An
    optimizer that reaches the target in a minority of its seeds is thus not
    drawn as competitive, and the table says how many runs did.
    """
    grouped = reach.assign(**{c: reach[c].fillna(math.inf) for c in TO_TARGET}).groupby(ENTRY, sort=True)
    medians = grouped[TO_TARGET].median()
    medians["runs"] = grouped.size()
    medians["reached"] = reach.groupby(ENTRY, sort=True)["seconds_to_target"].count()
    return medians


def performance_ratios(frame: pd.DataFrame, targets: dict[tuple[str, str], float] | float) -> pd.DataFrame:
    """Performance-profile ratios: rows (workload, data), one column per optimizer.

    r(w, o) = t(w, o) / min_o' t(w, o'), with t the median seconds to target
    of :func:`median_to_target` (the summary table's number); r = ∞ where t
    is ∞ (the median run did not reach the target) or where the optimizer
    did not run on that workload.
    """
    seconds = median_to_target(time_to_target(frame, targets))["seconds_to_target"].unstack("optimizer")
    seconds = seconds.fillna(math.inf)
    best = seconds.min(axis=1)
    ratios = seconds.div(best, axis=0)
    ratios[seconds.eq(best, axis=0)] = 1.0  # also when the best time is 0 (reached before the first step)
    ratios[np.isinf(seconds)] = math.inf
    return ratios


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) == 1 else math.nan)


def format_markdown(table: pd.DataFrame) -> str:
    """The summary table as Markdown, mean ± std in one cell, 'not reached' spelled out."""
    if table.empty:
        return "(no runs)"
    headers = [
        "workload", "data", "optimizer", "runs", "diverged", "final train loss", "final test loss",
        "best test loss", "target", "reached", "steps to target", "seconds to target", "step time (s)",
        "step / Adam",
    ]  # fmt: skip
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in table.itertuples():
        cells = [
            row.workload,
            row.data,
            row.optimizer,
            str(row.runs),
            str(row.diverged),
            _pm(row.final_train_loss_mean, row.final_train_loss_std),
            _pm(row.final_test_loss_mean, row.final_test_loss_std),
            _num(row.best_test_loss_mean),
            _num(row.target_loss),
            row.reached_target,
            _num(row.steps_to_target, "not reached"),
            _num(row.seconds_to_target, "not reached"),
            _num(row.step_time_s),
            _num(row.step_time_ratio_to_adam),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{value:.4g}"


def _pm(mean, std) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.4g} ± {std:.2g}"
