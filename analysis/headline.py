"""The headline of a comparison (SPEC §9): the losses at the budget, and whether differences exceed the seed noise.

- :func:`headline_table`: per workload, data set and optimizer, the
  validation and test loss at the budget (each run's final evaluation):
  mean over the finished runs and its 95% interval (Student t, n−1 df),
  with the runs, diverged runs, training time used and steps. An optimizer
  whose every run diverged stays in the table, as diverged.
- :func:`pair_table`: each LocoProp optimizer against the best first-order
  baseline, K-FAC and the strongest other baseline: the difference of mean
  validation losses and its 95% interval by Welch's t.
- :func:`format_headline`: both as Markdown, titled by what the budget makes
  equal: only a time budget is an equal-training-time comparison.
- :func:`equal_time_checks`: under a time budget, whether each run really
  trained at equal time (its training time against the budget, and its
  measured step cost against the calibrated one, relative to the other
  runs). The headline names the runs that did not, and a pair with such a run
  on either side gets no verdict on the seed noise.
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.load import final_rows, registry_name
from analysis.stats import Interval, mean_interval, welch_interval
from analysis.tables import best_first_order, selection_metric
from analysis.text import METRIC_NAMES, is_missing, markdown_table, num, signed
from sweeps.schema import BUDGET, BUDGET_KIND, DIVERGED, HPARAM_PREFIX, OK, PRECISION, STATUS

__all__ = [
    "AT_BUDGET",
    "equal_time_checks",
    "format_headline",
    "group_budget",
    "headline_table",
    "pair_sentence",
    "pair_table",
]

# Reported at the budget, with intervals (the training loss shown only for runs without a validation loss).
AT_BUDGET = ("valid_loss", "test_loss", "valid_error", "test_error", "train_loss")
GROUP = ["workload", "data"]
KFAC = "kfac"
TIME_TOLERANCE = 0.1  # a run's training time, or its step cost against the calibrated one, this far off is flagged
MIXED = "mixed"


def is_locoprop(optimizer: str) -> bool:
    return optimizer.startswith("locoprop")


def run_finals(frame: pd.DataFrame) -> pd.DataFrame:
    """The final evaluation of every run, with ``run_seconds``: its training seconds (summary.json's, else
    the final evaluation's wall_time_s), and ``budget_seconds``: the same on the clock of its time budget (the
    training thread's CPU time where its calibration counted that, ``sweeps.runner.budget.budget_clock``)."""
    finals = final_rows(frame)
    seconds = finals["train_seconds"].astype(float).fillna(finals["wall_time_s"].astype(float))
    on_cpu = (finals["calibration_clock"] == "cpu") & finals["train_cpu_seconds"].notna()
    budget_seconds = seconds.where(~on_cpu, finals["train_cpu_seconds"].astype(float))
    return finals.assign(run_seconds=seconds, budget_seconds=budget_seconds)


def group_budget(runs: pd.DataFrame) -> tuple[str | None, float | None]:
    """The budget all ``runs`` share: (kind, value); (None, None) when none was recorded; ("mixed", None)
    when they differ, which makes the comparison one at the end of each run, not at an equal budget."""
    budgets = {
        (None if is_missing(kind) else kind, None if is_missing(value) else float(value))
        for kind, value in zip(runs[BUDGET_KIND], runs[BUDGET])
    }
    if len(budgets) > 1:
        return MIXED, None
    return budgets.pop() if budgets else (None, None)


def equal_time_checks(runs: pd.DataFrame, budget: float) -> pd.DataFrame:
    """Whether each of ``runs`` (final rows of finished runs sharing a time budget of ``budget`` seconds)
    trained at equal time, by two measures, each allowed :data:`TIME_TOLERANCE`:

    - ``time_ratio``: its training seconds (on the clock of the budget) over the budget;
    - ``pace``: its measured seconds per step over the calibrated ones, each
      run's calibrated step counted in steps of the reference optimizer
      measured with it (where every run records that reference; else in
      seconds), divided by the median of the same over ``runs``: 1 when its
      step cost stands to the others' as the calibration said, whatever the
      machine's overall speed. NaN where the run records no calibration.

    Returns ``runs`` with ``time_ratio``, ``pace`` and ``equal_time`` (both
    within the tolerance of 1; a run without a pace is judged on its time).
    """
    seconds = runs["budget_seconds" if "budget_seconds" in runs else "run_seconds"].astype(float)
    measured = seconds / runs["step"].astype(float)
    calibrated = runs["calibrated_step_s"].astype(float)
    reference = runs["reference_step_s"].astype(float)
    if reference.notna().all():
        calibrated = calibrated / reference  # a step in reference steps: comparable across measurements
    implied = measured / calibrated
    pace = implied / implied.median()
    time_ratio = seconds / budget
    off = ((time_ratio - 1).abs() > TIME_TOLERANCE) | ((pace - 1).abs() > TIME_TOLERANCE)
    return runs.assign(time_ratio=time_ratio, pace=pace, equal_time=~off)


def _unequal_time(finals: pd.DataFrame) -> pd.DataFrame:
    """The finished runs of every time-budget group that were not at equal time (:func:`equal_time_checks`)."""
    flagged = []
    # Per precision too: runs in different precisions are priced against different reference steps.
    for _, group in finals.groupby([*GROUP, PRECISION], sort=True):
        kind, value = group_budget(group)
        ok = group[group[STATUS] == OK]
        if kind == "time" and len(ok):
            checked = equal_time_checks(ok, value)
            flagged.append(checked[~checked["equal_time"]])
    return pd.concat(flagged) if flagged else finals.iloc[:0].assign(time_ratio=[], pace=[], equal_time=[])


def _unequal_text(run, budget: float) -> str:
    """One run that was not at equal time, and why: "adam seed 2 (57.5 s of 30 s; steps 1.92× their calibrated
    cost beside the other runs')"."""
    reasons = []
    if abs(run.time_ratio - 1) > TIME_TOLERANCE:
        reasons.append(f"{num(run.budget_seconds)} s of {budget:g} s")
    if not is_missing(run.pace) and abs(run.pace - 1) > TIME_TOLERANCE:
        reasons.append(f"steps {run.pace:.2f}× their calibrated cost beside the other runs'")
    return f"{run.optimizer} seed {run.seed} ({'; '.join(reasons)})"


def headline_table(
    frame: pd.DataFrame, metric: str | None = None, without_runs: dict[str, str] | None = None
) -> pd.DataFrame:
    """One row per (workload, data, optimizer), best mean ``metric`` first; see the module docstring.

    Columns: workload, data, optimizer, budget_kind, budget, runs, ok,
    diverged, unfinished (stopped, failed or still running: left out of
    the means), for each loss/error of :data:`AT_BUDGET` its ``_mean``,
    ``_low``, ``_high`` and ``_n`` (seeds averaged; bounds NaN with one),
    train_seconds (mean over finished runs, on the clock of their budget), clock (that clock: "wall", "cpu",
    mixed or None), steps (mean), note,
    configurations (distinct hyperparameter settings: 1 for seeds of one),
    and under a time budget unequal_time and unequal_runs: how many of its
    finished runs were not at equal time, and which and why
    (:func:`equal_time_checks`).
    ``without_runs`` maps optimizers of a single-workload comparison that
    have no runs to the reason, listed as rows with 0 runs.
    """
    metric = metric or selection_metric(frame)
    finals = run_finals(frame)
    unequal = _unequal_time(finals)
    rows = []
    for key, group in finals.groupby(GROUP, sort=True):
        kind, value = group_budget(group)
        for optimizer, runs in group.groupby("optimizer", sort=True):
            off = unequal[unequal["run_id"].isin(runs["run_id"])]
            rows.append({**dict(zip(GROUP, key)), "optimizer": optimizer, BUDGET_KIND: kind, BUDGET: value,
                         **_headline_cells(runs), "unequal_time": len(off),
                         "unequal_runs": "; ".join(_unequal_text(run, value) for run in off.itertuples())})  # fmt: skip
        if without_runs and len(finals.groupby(GROUP)) == 1:
            rows += [
                {**dict(zip(GROUP, key)), "optimizer": name, BUDGET_KIND: kind, BUDGET: value, "runs": 0, "note": why}
                for name, why in without_runs.items()
                if name not in set(group["optimizer"])
            ]
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    counts = ["runs", "ok", "diverged", "unfinished", "unequal_time"]  # optimizers without runs have none of them
    table[counts] = table[counts].fillna(0).astype(int)
    order = table.assign(_rank=table.get(f"{metric}_mean", pd.Series(math.nan, index=table.index)).fillna(math.inf))
    return order.sort_values([*GROUP, "_rank", "optimizer"]).drop(columns="_rank").reset_index(drop=True)


def _headline_cells(runs: pd.DataFrame) -> dict:
    """One optimizer's headline numbers from its runs' final rows."""
    ok = runs[runs[STATUS] == OK]
    diverged = int((runs[STATUS] == DIVERGED).sum())
    cells = {"runs": len(runs), "ok": len(ok), "diverged": diverged, "unfinished": len(runs) - len(ok) - diverged}
    for column in AT_BUDGET:
        interval = mean_interval(ok[column].astype(float))
        cells.update({f"{column}_mean": interval.estimate, f"{column}_low": interval.low,
                      f"{column}_high": interval.high, f"{column}_n": interval.n})  # fmt: skip
    cells["train_seconds"] = ok["budget_seconds"].mean() if len(ok) else math.nan
    clocks = set(ok["calibration_clock"].dropna())
    cells["clock"] = clocks.pop() if len(clocks) == 1 else (MIXED if clocks else None)
    cells["steps"] = ok["step"].astype(float).mean() if len(ok) else math.nan
    cells["note"] = "every run diverged" if diverged and diverged == len(runs) else ""
    cells["configurations"] = configuration_count(runs)
    return cells


def configuration_count(runs: pd.DataFrame) -> int:
    """How many distinct hyperparameter configurations (``hp_`` columns) the runs have."""
    columns = [c for c in runs.columns if c.startswith(HPARAM_PREFIX)]
    return len(runs[columns].astype(str).drop_duplicates()) if columns else 1


def _baselines(optimizers: dict[str, float], best_first: str | None) -> list[tuple[str, str]]:
    """(baseline, role) pairs: the best first-order baseline, K-FAC if present, and the strongest
    non-LocoProp baseline (lowest mean) if it is neither; one optimizer in two roles is listed once."""
    candidates = []
    if best_first is not None:
        candidates.append((best_first, "best first-order baseline"))
    candidates += [(name, "K-FAC") for name in sorted(optimizers) if registry_name(name) == KFAC]
    finite = {name: mean for name, mean in optimizers.items() if not is_locoprop(name) and math.isfinite(mean)}
    if finite:
        candidates.append((min(sorted(finite), key=finite.get), "strongest baseline"))
    roles: dict[str, list[str]] = {}
    for name, role in candidates:
        roles.setdefault(name, []).append(role)
    return [(name, "; ".join(names)) for name, names in roles.items()]


def pair_table(frame: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Each LocoProp optimizer (name starting "locoprop") against its baselines (:func:`_baselines`).

    Columns: workload, data, optimizer, baseline, role, metric, n_optimizer,
    n_baseline, mean_optimizer, mean_baseline, difference (optimizer −
    baseline), low, high (its 95% interval by Welch's t; NaN with fewer than
    two finished runs on either side), df, diverged_optimizer,
    diverged_baseline, runs_optimizer, runs_baseline, unequal_optimizer,
    unequal_baseline (finished runs not at equal time, :func:`equal_time_checks`).
    """
    metric = metric or selection_metric(frame)
    finals = run_finals(frame)
    best = best_first_order(frame, metric)
    unequal = _unequal_time(finals)
    rows = []
    for key, group in finals.groupby(GROUP, sort=True):
        ok = group[group[STATUS] == OK]
        off = unequal[unequal["run_id"].isin(group["run_id"])]["optimizer"].value_counts()
        values = {name: ok.loc[ok["optimizer"] == name, metric].astype(float) for name in group["optimizer"].unique()}
        means = {name: float(v.mean()) if v.notna().any() else math.nan for name, v in values.items()}
        for optimizer in sorted(filter(is_locoprop, values)):
            for baseline, role in _baselines(means, best.get(tuple(key))):
                difference = welch_interval(values[optimizer], values[baseline])
                row = _pair_row(key, group, optimizer, baseline, role, metric, values, difference)
                rows.append({**row, "unequal_optimizer": int(off.get(optimizer, 0)),
                             "unequal_baseline": int(off.get(baseline, 0))})  # fmt: skip
    return pd.DataFrame(rows)


def _pair_row(key, group, optimizer, baseline, role, metric, values, difference: Interval) -> dict:
    counts = {name: group.loc[group["optimizer"] == name, STATUS] for name in (optimizer, baseline)}
    return {
        **dict(zip(GROUP, key)), "optimizer": optimizer, "baseline": baseline, "role": role, "metric": metric,
        "n_optimizer": int(values[optimizer].notna().sum()), "n_baseline": int(values[baseline].notna().sum()),
        "mean_optimizer": values[optimizer].mean(), "mean_baseline": values[baseline].mean(),
        "difference": difference.estimate, "low": difference.low, "high": difference.high, "df": difference.df,
        "diverged_optimizer": int((counts[optimizer] == DIVERGED).sum()),
        "diverged_baseline": int((counts[baseline] == DIVERGED).sum()),
        "runs_optimizer": len(counts[optimizer]), "runs_baseline": len(counts[baseline]),
    }  # fmt: skip


def pair_sentence(row) -> str:
    """One pair in words, e.g. "locoprop-m vs adam (best first-order baseline): validation loss 61.2 vs 58.4,
    difference +2.8 (95% CI -1.1 to +6.7): within the seed noise."."""
    head = f"{row.optimizer} vs {row.baseline} ({row.role}): "
    name = METRIC_NAMES.get(row.metric, row.metric)
    for side, n, diverged, runs in [
        (row.optimizer, row.n_optimizer, row.diverged_optimizer, row.runs_optimizer),
        (row.baseline, row.n_baseline, row.diverged_baseline, row.runs_baseline),
    ]:
        if n == 0:
            why = f"every run diverged ({diverged} of {runs})" if diverged == runs else "no run finished"
            return head + f"{side}: {why}, so there is no {name} to compare."
    numbers = f"{name} {num(row.mean_optimizer)} vs {num(row.mean_baseline)}, difference {signed(row.difference)}"
    if is_missing(row.low):
        seeds = f"{row.n_optimizer} and {row.n_baseline} finished runs"
        return head + numbers + f": cannot be told from the seed noise with {seeds} (an interval needs 2 a side)."
    interval = f" (95% CI {signed(row.low)} to {signed(row.high)})"
    unequal = [f"{n} of {side}'s" for side, n in ((row.optimizer, _count(row, "unequal_optimizer")),
                                                  (row.baseline, _count(row, "unequal_baseline"))) if n]  # fmt: skip
    if unequal:
        return (
            head
            + numbers
            + interval
            + (f": no verdict on the seed noise, as {' and '.join(unequal)} runs were not at equal time (above).")
        )
    if row.low > 0 or row.high < 0:
        verdict = f"{row.optimizer} {'lower' if row.high < 0 else 'higher'}, beyond the seed noise."
    else:
        verdict = "within the seed noise."
    return head + numbers + interval + ": " + verdict


def _count(row, column: str) -> int:
    value = getattr(row, column, 0)
    return 0 if is_missing(value) else int(value)


def comparison_title(kind: str | None, value) -> str:
    """What the budget makes equal. Only a time budget is an equal-training-time comparison."""
    if kind == "time":
        return f"Headline: equal training time ({value:g} s per run)"
    if kind in ("steps", "epochs"):
        return f"Equal {kind} ({value:g} per run): not an equal-time comparison"
    if kind == MIXED:
        return "At the end of each run: the runs have different budgets, so this is not an equal-budget comparison"
    return "At the end of each run: no budget recorded, so this is not an equal-budget comparison"


def comparison_note(kind: str | None) -> str:
    """What the table's numbers are, and what the budget does and does not make equal."""
    what = (
        "Loss at the budget: each run's final evaluation. Mean over the runs that finished, with the 95% "
        "confidence interval of the mean (Student t, n−1 degrees of freedom; with one run it is unknown). "
        "Diverged runs are counted, not averaged; an optimizer whose every run diverged is listed as diverged."
    )
    if kind == "time":
        return what + " Every run had the same training time (evaluation excluded); the steps differ."
    if kind in ("steps", "epochs"):
        return what + (
            f" Every run had the same number of {kind}, but a step costs different times for different "
            "optimizers (column 'training time used'): this compares equal work counted in "
            f"{kind}, not equal time."
        )
    return what


def format_headline(table: pd.DataFrame, pairs: pd.DataFrame, metric: str, level: int = 2) -> str:
    """The headline table and the pair sentences of every (workload, data) as Markdown, ``level`` the
    heading depth. ``metric`` is the loss the pairs compare (its name is stated when it is not validation)."""
    if table.empty:
        return "(no runs)"
    parts = []
    for (workload, data), rows in table.groupby(GROUP, sort=True):
        kind, value = rows[BUDGET_KIND].iloc[0], rows[BUDGET].iloc[0]
        parts += [f"{'#' * level} {comparison_title(kind, value)} — {workload} on {data}", "",
                  comparison_note(kind), "", _headline_markdown(rows, kind, value), ""]  # fmt: skip
        if metric != "valid_loss":
            parts += [f"These runs recorded no validation loss: comparisons use the {METRIC_NAMES[metric]}.", ""]
        mine = pairs[(pairs["workload"] == workload) & (pairs["data"] == data)] if len(pairs) else pairs
        if len(mine):
            parts += [
                f"Difference of mean {METRIC_NAMES[metric]} (optimizer − baseline) with its 95% confidence interval "
                "by Welch's t (Welch–Satterthwaite degrees of freedom); it exceeds the seed noise when the interval "
                "excludes 0. The best baselines are picked on these same runs, which favours them slightly.",
                "",
                *(f"- {pair_sentence(row)}" for row in mine.itertuples()),
                "",
            ]
    return "\n".join(parts).rstrip() + "\n"


def _headline_markdown(rows: pd.DataFrame, kind, value) -> str:
    extra = [c for c in ("valid_error", "test_error") if rows[f"{c}_n"].fillna(0).gt(0).any()]
    if not rows["valid_loss_n"].fillna(0).gt(0).any():
        extra.append("train_loss")  # older runs: the loss the comparisons fall back to
    headers = ["optimizer", "runs", "diverged", "validation loss, mean (95% CI)", "test loss, mean (95% CI)"]
    headers += [f"{METRIC_NAMES[c]}, mean (95% CI)" for c in extra]
    headers += ["training time used (s, mean)", "steps (mean)"]
    body = []
    for row in rows.itertuples():
        if row.runs == 0:
            body.append([row.optimizer, "0", "–", row.note, *[""] * (len(headers) - 4)])
            continue
        cells = [_interval_cell(row, c) for c in ("valid_loss", "test_loss", *extra)]
        used = num(row.train_seconds)
        if kind == "time" and not is_missing(row.train_seconds):
            used += f" of {value:g}"  # against the budget: calibration converts it into steps, not exactly
        body.append([row.optimizer, str(row.runs), str(row.diverged), *cells, used, num(row.steps)])
    table = markdown_table(headers, body)
    unfinished = rows["unfinished"].sum()
    if unfinished:
        table += f"\n\n{int(unfinished)} run(s) did not finish (stopped, failed or still running) and are left out."
    if kind == "time":
        if (rows.get("clock") == "cpu").any():
            table += (
                "\n\nTraining time here is the CPU time of each run's one training thread (sweeps.runner.budget): "
                "on a quiet machine its wall time, which other processes taking turns on the cores lengthen while "
                "they leave this one alone."
            )
        table += _off_budget_note(rows, value)
    searched = rows[rows["configurations"].fillna(1) > 1]
    if len(searched):
        table += (
            f"\n\nWarning: the runs of {', '.join(searched['optimizer'])} have several hyperparameter configurations "
            "(a search, not seeds of one configuration): their means and intervals mix configurations."
        )
    return table


def _off_budget_note(rows: pd.DataFrame, budget: float) -> str:
    """Name the runs that were not at equal time (:func:`equal_time_checks`): for them the conversion of the
    budget into steps did not hold, and the pair sentences draw no conclusion from them."""
    off = rows[rows["unequal_time"].fillna(0) > 0]
    if off.empty:
        return ""
    return (
        f"\n\nWarning: not at equal time: {'; '.join(off['unequal_runs'])}. Each trained more than "
        f"{TIME_TOLERANCE:.0%} off the {budget:g} s budget, or took steps that cost more than {TIME_TOLERANCE:.0%} "
        "more or less, against the other runs' steps, than the calibration measured (as when the machine's load "
        "changes during a comparison): the conversion of the budget into steps did not hold for them, and the "
        "sentences below draw no conclusion about the seed noise from pairs that include them."
    )


def _interval_cell(row, column: str) -> str:
    """A mean with its interval: "58.4 (55.1 to 61.7)", "58.4 (1 run: interval unknown)", or "diverged"."""
    mean, n = getattr(row, f"{column}_mean"), getattr(row, f"{column}_n")
    if row.ok == 0:
        return f"diverged ({row.diverged} of {row.runs})" if row.diverged == row.runs else "no finished run"
    if n == 0 or is_missing(mean):
        return "–"
    if n == 1:
        return f"{num(mean)} (1 run: interval unknown)"
    return f"{num(mean)} ({num(getattr(row, f'{column}_low'))} to {num(getattr(row, f'{column}_high'))})"
