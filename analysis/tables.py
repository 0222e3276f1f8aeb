"""Time-to-target and detail tables from the tidy results frame (SPEC §9).

- :func:`selection_metric`: the loss that targets and comparisons use:
  validation loss, or training loss for runs that recorded none.
- :func:`best_first_order`: per workload and data set, the first-order
  baseline with the lowest mean final loss over its finished runs.
- :func:`budget_targets`: the targets, that baseline's loss at 25%, 50% and
  100% of its training time; :func:`default_target` is the 100% one. A
  target most of the baseline's runs met before training (step 0: a run too
  short, or evaluated too rarely, to have improved by then) is kept with the
  reason in ``skipped`` and left out of the time-to-target tables
  (:func:`meaningful_targets`).
- :func:`time_to_target`: per run, the first evaluation at or below a
  target loss (step and training seconds), NaN where it was never reached.
- :func:`median_to_target`: per workload, data set and optimizer, the
  median steps and seconds to the target by :data:`TIME_TO_TARGET_RULE`;
  :func:`target_table`, :func:`summary_table` and the performance profile
  all read it, so that they agree.
- :func:`summary_table`: the details per workload, data set and optimizer:
  runs, diverged runs, final and best train/valid/test loss as mean ± std
  over the runs that finished ("ok"), time to one target, median step time
  and its ratio to Adam's on the same workload.
- :func:`performance_ratios`: the ratios r = t / (best t) of a
  performance profile, from the same medians.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.load import final_rows, registry_name
from analysis.text import markdown_table, num
from sweeps.schema import DIVERGED, OK, STATUS

__all__ = [
    "FIRST_ORDER",
    "TARGET_FRACTIONS",
    "TIME_TO_TARGET_RULE",
    "best_first_order",
    "budget_targets",
    "default_target",
    "format_markdown",
    "format_target_table",
    "given_targets",
    "meaningful_targets",
    "median_to_target",
    "performance_ratios",
    "selection_metric",
    "summary_table",
    "target_table",
    "time_to_target",
]

FIRST_ORDER = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "rmsprop-tf", "adagrad")
GROUP = ["workload", "data"]
ENTRY = ["workload", "data", "optimizer"]
TO_TARGET = ["steps_to_target", "seconds_to_target"]
TARGET_FRACTIONS = (0.25, 0.5, 1.0)
TARGET_COLUMNS = ["workload", "data", "baseline", "fraction", "seconds", "target", "skipped"]

TIME_TO_TARGET_RULE = (
    "Steps and seconds to target are medians over all runs of an optimizer on a workload, a run that never "
    "reached the target counting as infinitely slow: they are given only when more than half of the runs reached "
    "it (column 'reached'), and are 'not reached' otherwise. The performance profile uses these same medians."
)

Targets = dict[tuple[str, str], float] | float


def selection_metric(frame: pd.DataFrame) -> str:
    """The loss to compare: "valid_loss" when any run recorded one, else "train_loss" (older runs)."""
    if "valid_loss" in frame.columns and pd.to_numeric(frame["valid_loss"], errors="coerce").notna().any():
        return "valid_loss"
    return "train_loss"


def _ok_finals(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The final evaluation of every finished ("ok") run with a finite ``metric``."""
    finals = final_rows(frame)
    return finals[(finals[STATUS] == OK) & np.isfinite(finals[metric].astype(float))]


def best_first_order(frame: pd.DataFrame, metric: str | None = None) -> dict[tuple[str, str], str]:
    """Per (workload, data): the first-order baseline (:data:`FIRST_ORDER`) with the lowest mean final
    ``metric`` over its finished runs; a tie goes to the name first in alphabetical order."""
    metric = metric or selection_metric(frame)
    finals = _ok_finals(frame, metric)
    finals = finals[finals["optimizer"].map(registry_name).isin(FIRST_ORDER)]
    best = {}
    for key, group in finals.groupby(GROUP, sort=True):
        means = group.groupby("optimizer", sort=True)[metric].mean()
        best[tuple(key)] = str(means.idxmin())
    return best


def budget_targets(
    frame: pd.DataFrame, metric: str | None = None, fractions: tuple[float, ...] = TARGET_FRACTIONS
) -> pd.DataFrame:
    """The targets of the time-to-target table: per (workload, data) and fraction f, the loss that the best
    first-order baseline (:func:`best_first_order`) reached at f of its training time.

    Each of its finished runs gives its loss at its last evaluation within the
    first f of its own training time (at f = 1: its final evaluation). The
    target is the median over these runs; with an even number of runs, the
    upper of the two middle values: the loss that more than half of the
    baseline's runs reached by then, the majority the time-to-target rule
    asks for, so the baseline reaches each of its own targets in time.
    Columns: workload, data, baseline, fraction, seconds (f × the
    baseline's median training time), target, and skipped: None, or why the
    target measures nothing: more than half of the baseline's runs met it
    before training, at their step-0 evaluation (on a run too short, or
    evaluated too rarely, the last evaluation within f of it is step 0's,
    and the target is the loss of the initial weights, which every run
    "reaches" at 0 s).
    """
    metric = metric or selection_metric(frame)
    rows = []
    for (workload, data), baseline in best_first_order(frame, metric).items():
        runs = frame[(frame["workload"] == workload) & (frame["data"] == data) & (frame["optimizer"] == baseline)]
        runs = [run for _, run in runs[runs[STATUS] == OK].groupby("run_id", sort=True)]
        ends = [float(run["wall_time_s"].max()) for run in runs]
        starts = [_loss_before_training(run, metric) for run in runs]
        for fraction in fractions:
            target = _upper_median([_loss_at_fraction(run, metric, fraction) for run in runs])
            rows.append(
                {"workload": workload, "data": data, "baseline": baseline, "fraction": fraction,
                 "seconds": fraction * float(np.median(ends)), "target": target,
                 "skipped": _met_before_training(baseline, fraction, target, starts)}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=TARGET_COLUMNS)


def _loss_before_training(run: pd.DataFrame, metric: str) -> float:
    """The run's ``metric`` at its step-0 evaluation, the initial weights'; NaN for a run that has none."""
    first = run.dropna(subset=[metric]).sort_values("step").head(1)
    return float(first[metric].iloc[0]) if len(first) and first["step"].iloc[0] == 0 else math.nan


def _met_before_training(baseline: str, fraction: float, target: float, starts: list[float]) -> str | None:
    """Why ``target`` measures nothing, or None: more than half of the baseline's runs met it at step 0 (their
    losses before training, ``starts``), so by :data:`TIME_TO_TARGET_RULE` its time to target is 0 s, as it is for
    any optimizer started from the same weights."""
    met = sum(math.isfinite(start) and start <= target for start in starts)
    if not math.isfinite(target) or met <= len(starts) / 2:
        return None
    return (
        f"not meaningful: {met} of {baseline}'s {len(starts)} runs were at or below it before training (step 0), "
        f"not having improved on that by {fraction:.0%} of their training time (a run too short, or evaluated too "
        "rarely), so every run reaches it at 0 s; evaluate more often (--eval-every), train longer, or pass "
        "--target-loss"
    )


def meaningful_targets(targets: pd.DataFrame) -> pd.DataFrame:
    """The targets of ``targets`` that are not skipped (:func:`budget_targets`'s ``skipped``)."""
    if "skipped" not in targets.columns:
        return targets
    return targets[targets["skipped"].isna()]


def _loss_at_fraction(run: pd.DataFrame, metric: str, fraction: float) -> float:
    """The run's ``metric`` at its last evaluation within the first ``fraction`` of its training time."""
    run = run.dropna(subset=[metric, "wall_time_s"]).sort_values("step")
    seen = run[run["wall_time_s"] <= fraction * run["wall_time_s"].max()]
    return float(seen[metric].iloc[-1]) if len(seen) else math.nan


def _upper_median(values: list[float]) -> float:
    """The ⌊n/2⌋+1-th smallest finite value: the median for odd n, the upper middle value for even n."""
    finite = sorted(v for v in values if math.isfinite(v))
    return finite[len(finite) // 2] if finite else math.nan


def given_targets(frame: pd.DataFrame, target: float) -> pd.DataFrame:
    """One given target (``--target-loss``) for every (workload, data): :func:`budget_targets`'s columns."""
    keys = frame[GROUP].drop_duplicates().sort_values(GROUP)
    keys = keys.assign(baseline=None, fraction=math.nan, seconds=math.nan, target=float(target), skipped=None)
    return keys.reset_index(drop=True)


def default_target(frame: pd.DataFrame, metric: str | None = None) -> dict[tuple[str, str], float]:
    """Target per (workload, data): the best first-order baseline's final loss (the 100% target of
    :func:`budget_targets`: the median over its runs, the upper middle value for an even count); none for a
    workload where that target is skipped."""
    targets = meaningful_targets(budget_targets(frame, metric, fractions=(1.0,)))
    return {(row.workload, row.data): float(row.target) for row in targets.itertuples()}


def time_to_target(frame: pd.DataFrame, targets: Targets, metric: str | None = None) -> pd.DataFrame:
    """One row per run: run_id, optimizer, workload, data, target, steps_to_target, seconds_to_target.

    The first evaluation whose ``metric`` is at or below the target; NaN
    where no evaluation reached it (a target of NaN is never reached).
    """
    metric = metric or selection_metric(frame)
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


def target_table(frame: pd.DataFrame, targets: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Time to each target of ``targets`` (:func:`budget_targets` or :func:`given_targets`).

    One row per (workload, data, optimizer, target): the target's fraction
    and loss, runs, reached, and the median steps and seconds by
    :func:`median_to_target` (NaN: not reached). A workload without targets
    (no first-order baseline finished) has no rows, nor has a skipped target.
    """
    metric = metric or selection_metric(frame)
    parts = []
    for target in meaningful_targets(targets).itertuples():
        runs = frame[(frame["workload"] == target.workload) & (frame["data"] == target.data)]
        medians = median_to_target(time_to_target(runs, float(target.target), metric)).reset_index()
        parts.append(medians.assign(fraction=target.fraction, target=target.target, baseline=target.baseline))
    if not parts:
        return pd.DataFrame(columns=[*ENTRY, "fraction", "target", "baseline", "runs", "reached", *TO_TARGET])
    table = pd.concat(parts, ignore_index=True)
    table[TO_TARGET] = table[TO_TARGET].replace(math.inf, math.nan)
    return table[[*ENTRY, "fraction", "target", "baseline", "runs", "reached", *TO_TARGET]]


def summary_table(frame: pd.DataFrame, targets: Targets | None = None, metric: str | None = None) -> pd.DataFrame:
    """The details table; see the module docstring for its columns. ``targets`` default to :func:`default_target`."""
    metric = metric or selection_metric(frame)
    if targets is None:
        targets = default_target(frame, metric)
    reach = time_to_target(frame, targets, metric)
    medians = median_to_target(reach).replace(math.inf, math.nan)  # NaN: "not reached"
    finals = final_rows(frame)
    best = frame.groupby("run_id")[["train_loss", "valid_loss", "test_loss"]].min()
    finals = finals.assign(
        target=finals["run_id"].map(reach.set_index("run_id")["target"]),
        run_step_time=finals["run_id"].map(frame.groupby("run_id")["step_time_s"].median()),
        **{f"best_{split}": finals["run_id"].map(best[f"{split}_loss"]) for split in ("train", "valid", "test")},
    )
    rows = [
        _summary_row(key, runs, medians.loc[key]) for key, runs in finals.groupby(ENTRY, sort=True)
    ]  # fmt: skip
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # Each row against the Adam of its own precision: "adam (bf16)" is the reference of "locoprop-m (bf16)"
    # when runs of both precisions are reported together (analysis.load.label_precisions).
    adam = table.set_index(["workload", "data", "optimizer"])["step_time_s"]
    table["step_time_ratio_to_adam"] = [
        row.step_time_s / adam.get((row.workload, row.data, _adam_label(row.optimizer)), np.nan)
        for row in table.itertuples()
    ]
    return table


def _adam_label(optimizer: str) -> str:
    """The label of the Adam runs measured like ``optimizer``: "adam (bf16)" for "kfac (bf16)", else "adam"."""
    return "adam" + optimizer[len(registry_name(optimizer)) :]


def _summary_row(key: tuple, runs: pd.DataFrame, to_target: pd.Series) -> dict:
    """One optimizer's row of :func:`summary_table`: its final rows, its medians to the target."""
    ok = runs[runs[STATUS] == OK]
    row = dict(zip(ENTRY, key), runs=len(runs), diverged=int((runs[STATUS] == DIVERGED).sum()))
    for split in ("train", "valid", "test"):
        row[f"final_{split}_loss_mean"] = ok[f"{split}_loss"].astype(float).mean()
        row[f"final_{split}_loss_std"] = _std(ok[f"{split}_loss"].astype(float).dropna())
        row[f"best_{split}_loss_mean"] = ok[f"best_{split}"].astype(float).mean()
    row.update(
        target_loss=runs["target"].iloc[0],
        reached_target=f"{int(to_target['reached'])}/{len(runs)}",
        steps_to_target=to_target["steps_to_target"],
        seconds_to_target=to_target["seconds_to_target"],
        step_time_s=runs["run_step_time"].median(),
    )
    return row


def performance_ratios(frame: pd.DataFrame, targets: Targets, metric: str | None = None) -> pd.DataFrame:
    """Performance-profile ratios: rows (workload, data), one column per optimizer.

    r(w, o) = t(w, o) / min_o' t(w, o'), with t the median seconds to target
    of :func:`median_to_target` (the tables' number); r = ∞ where t is ∞
    (the median run did not reach the target) or where the optimizer did
    not run on that workload.
    """
    seconds = median_to_target(time_to_target(frame, targets, metric))["seconds_to_target"].unstack("optimizer")
    seconds = seconds.fillna(math.inf)
    best = seconds.min(axis=1)
    ratios = seconds.div(best, axis=0)
    ratios[seconds.eq(best, axis=0)] = 1.0  # also when the best time is 0 (reached before the first step)
    ratios[np.isinf(seconds)] = math.inf
    return ratios


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) == 1 else math.nan)


def format_markdown(table: pd.DataFrame) -> str:
    """The details table as Markdown: final losses as mean ± std over finished runs, step time."""
    if table.empty:
        return "(no runs)"
    headers = [
        "workload", "data", "optimizer", "runs", "diverged", "final train loss", "final valid loss",
        "final test loss", "best valid loss", "step time (s)", "step / Adam",
    ]  # fmt: skip
    return markdown_table(headers, [_detail_cells(row) for row in table.itertuples()])


def _detail_cells(row) -> list[str]:
    return [
        row.workload, row.data, row.optimizer, str(row.runs), str(row.diverged),
        _pm(row.final_train_loss_mean, row.final_train_loss_std),
        _pm(row.final_valid_loss_mean, row.final_valid_loss_std),
        _pm(row.final_test_loss_mean, row.final_test_loss_std),
        num(row.best_valid_loss_mean), num(row.step_time_s), num(row.step_time_ratio_to_adam),
    ]  # fmt: skip


def _pm(mean, std) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.4g} ± {std:.2g}"


def format_target_table(table: pd.DataFrame, targets: pd.DataFrame, workload: str, data: str) -> str:
    """Time to each target on one (workload, data) as Markdown: one column per target that is not skipped, one
    row per optimizer; a cell is "median seconds, median steps (reached/runs)" or "not reached (reached/runs)".
    Each skipped target follows the table, in a line with its reason; without any other, only these lines."""
    mine = table[(table["workload"] == workload) & (table["data"] == data)]
    targets = targets[(targets["workload"] == workload) & (targets["data"] == data)]
    columns = meaningful_targets(targets)
    skipped = [
        f"- {_target_header(target)}: skipped, {target.skipped}"
        for target in targets.itertuples()
        if isinstance(getattr(target, "skipped", None), str)
    ]
    if columns.empty:
        return "\n".join(skipped)
    headers = ["optimizer", *(_target_header(t) for t in columns.itertuples())]
    rows = []
    for optimizer, cells in mine.groupby("optimizer", sort=True):
        row = [optimizer]
        for target in columns.itertuples():
            cell = cells[(cells["target"] == target.target) & _same_fraction(cells["fraction"], target.fraction)]
            row.append(_reach_cell(cell.iloc[0]) if len(cell) else "–")
        rows.append(row)
    return "\n\n".join([markdown_table(headers, rows), *(["\n".join(skipped)] if skipped else [])])


def _same_fraction(fractions: pd.Series, fraction: float) -> pd.Series:
    return fractions.isna() if math.isnan(fraction) else fractions == fraction


def _target_header(target) -> str:
    if math.isnan(target.fraction):
        return f"target {num(target.target)} (given)"
    return f"target {num(target.target)} ({target.fraction:.0%} of {target.baseline}'s time, {num(target.seconds)} s)"


def _reach_cell(row: pd.Series) -> str:
    reached = f"({int(row['reached'])}/{int(row['runs'])})"
    if math.isnan(row["seconds_to_target"]):
        return f"not reached {reached}"
    return f"{num(row['seconds_to_target'])} s, {num(row['steps_to_target'])} steps {reached}"
