"""The cross-workload report of a suite of comparisons (``locoprop compare --workloads … | --suite``).

Scored as AlgoPerf scores its workloads (Dahl et al. 2023, "Benchmarking
Neural Network Training Algorithms", §4.4):

1. **Target** of a workload: among the first-order baselines
   (:data:`FIRST_ORDER`: sgd, momentum, nesterov, adam, adamw, rmsprop,
   rmsprop-tf, adagrad; not K-FAC, not LocoProp), each one's median
   validation loss at the budget over its finished runs (with an even count,
   the upper middle value, so that more than half of its runs reach it); the
   target is the lowest of these medians, and that baseline sets it.
2. **Time to target** of an optimizer on a workload: per run, the training
   seconds on the budget's clock (:func:`clock_seconds`) of its first
   evaluation at or below the target; the median
   over its runs, a run that never reached the target counting as ∞
   (:data:`analysis.tables.TIME_TO_TARGET_RULE`): "not reached" unless more
   than half of its runs reached it.
3. **Performance ratio** r = t / (fastest t on that workload); ∞ where the
   optimizer did not reach the target or did not run there; 1 for every
   optimizer as fast as the fastest (ties, also at 0 s).
4. **Performance profile** ρ(τ) = the fraction of workloads with r ≤ τ, and
   the **score** (1 / (r_max − 1)) ∫₁^r_max ρ(τ) dτ with r_max = 4: exactly
   the mean over workloads of max(0, r_max − r) / (r_max − 1), so 1 means
   fastest everywhere and 0 means never within r_max× the fastest.
5. **Wins, ties and losses**: each LocoProp variant against the strongest
   baseline of each workload (the non-LocoProp optimizer with the lowest mean
   validation loss at the budget), by the 95% Welch interval of the
   difference of their validation losses (:func:`analysis.headline.pair_table`):
   a win where it lies below 0, a loss above 0, a tie where it holds 0; no
   verdict with fewer than two finished runs a side or runs not at equal time.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import plots
from analysis.headline import pair_table
from analysis.load import load_results, registry_name
from analysis.tables import FIRST_ORDER, TIME_TO_TARGET_RULE, _ok_finals, _upper_median, median_to_target
from analysis.tables import time_to_target as runs_to_target
from analysis.text import is_missing, markdown_table, num
from sweeps.schema import PROTOCOL

__all__ = [
    "R_MAX",
    "SCORING_RULE",
    "clock_seconds",
    "integrated_scores",
    "performance_ratios",
    "profile",
    "suite_targets",
    "time_to_target",
    "verdicts",
    "write_suite_report",
]

R_MAX = 4.0  # AlgoPerf's upper limit of τ: slower than 4× the fastest counts as not competitive
GROUP = ["workload", "data"]
STRONGEST = "strongest baseline"
WIN, TIE, LOSS, NO_VERDICT = "win", "tie", "loss", "no verdict"
VERDICTS = (WIN, TIE, LOSS, NO_VERDICT)
PLURALS = {WIN: "wins", TIE: "ties", LOSS: "losses", NO_VERDICT: "no verdicts"}
NOT_REACHED = "not reached"

SCORING_RULE = (
    "Scoring (AlgoPerf's rule): on each workload the target is the best first-order baseline's median validation "
    f"loss at the budget (first-order baselines: {', '.join(FIRST_ORDER)}); an optimizer's time to target is the "
    "median over its runs of the training seconds to its first evaluation at or below the target, a run that never "
    "reached it counting as ∞ (seconds on the budget's clock: under a time budget the steps taken times the step "
    "cost that priced the budget, which a busy machine does not change; otherwise metrics.csv's wall_time_s); "
    "its performance ratio r is that time over the fastest optimizer's on the workload "
    "(∞ where not reached); the performance profile ρ(τ) is the fraction of workloads with r ≤ τ, and the score is "
    "(1/(r_max − 1)) ∫ ρ(τ) dτ over τ from 1 to r_max = {r_max:g}, i.e. the mean over workloads of "
    "max(0, r_max − r)/(r_max − 1): 1 is fastest everywhere, 0 never within r_max× the fastest."
)


# ------------------------------------------------------------------ scoring
def suite_targets(frame: pd.DataFrame, metric: str = "valid_loss") -> pd.DataFrame:
    """Per (workload, data): the baseline that sets the target and the target (rule 1 of the module docstring).

    Columns: workload, data, baseline, target. A workload where no first-order baseline finished a run has no row.
    """
    finals = _ok_finals(frame, metric)
    finals = finals[finals["optimizer"].map(registry_name).isin(FIRST_ORDER)]
    rows = []
    for (workload, data), group in finals.groupby(GROUP, sort=True):
        medians = {name: _upper_median(list(runs[metric].astype(float))) for name, runs in group.groupby("optimizer")}
        baseline = min(sorted(medians), key=medians.get)  # a tie goes to the name first in alphabetical order
        rows.append({"workload": workload, "data": data, "baseline": baseline, "target": medians[baseline]})
    return pd.DataFrame(rows, columns=["workload", "data", "baseline", "target"])


def clock_seconds(frame: pd.DataFrame) -> pd.Series:
    """Each evaluation's training seconds on the budget's clock: under a time budget, its step times the seconds
    per step that converted the budget into the run's steps (config.json's calibration: the training thread's CPU
    time or wall time, priced side by side), so that a neighbour slowing the machine changes no time to target;
    for runs without a calibration, metrics.csv's ``wall_time_s`` (training time; evaluation excluded)."""
    priced = frame["step"].astype(float) * frame["calibrated_step_s"].astype(float)
    return priced.where(priced.notna(), frame["wall_time_s"].astype(float))


def time_to_target(frame: pd.DataFrame, targets: pd.DataFrame, metric: str = "valid_loss") -> pd.DataFrame:
    """Per (workload, data, optimizer): runs, reached, and the median seconds (:func:`clock_seconds`) to the
    workload's target (rule 2), ∞ where not reached. A workload without a target has no rows."""
    by_workload = {(t.workload, t.data): float(t.target) for t in targets.itertuples()}
    frame = frame[[key in by_workload for key in zip(frame["workload"], frame["data"])]]
    frame = frame.assign(wall_time_s=clock_seconds(frame))  # the column the time-to-target rule reads
    columns = [*GROUP, "optimizer", "runs", "reached", "seconds_to_target"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    medians = median_to_target(runs_to_target(frame, by_workload, metric)).reset_index()
    return medians[columns]


def performance_ratios(times: pd.DataFrame) -> pd.DataFrame:
    """Rows (workload, data), one column per optimizer: r = t / (fastest t) (rule 3); ∞ where t is ∞ or the
    optimizer did not run on the workload, 1 where t equals the fastest (also when that is 0 s)."""
    seconds = times.set_index([*GROUP, "optimizer"])["seconds_to_target"].astype(float).unstack("optimizer")
    seconds = seconds.fillna(math.inf)
    best = seconds.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = seconds.div(best, axis=0)
    ratios[seconds.eq(best, axis=0)] = 1.0
    ratios[np.isinf(seconds)] = math.inf
    return ratios


def profile(ratios: pd.DataFrame, taus: Sequence[float]) -> pd.DataFrame:
    """ρ(τ) per optimizer (columns) at each τ of ``taus`` (rows): the fraction of workloads with r ≤ τ."""
    taus = np.asarray(taus, dtype=float)
    within = ratios.to_numpy(dtype=float)[None, :, :] <= taus[:, None, None]  # (τ, workload, optimizer)
    return pd.DataFrame(within.mean(axis=1), index=pd.Index(taus, name="tau"), columns=ratios.columns)


def integrated_scores(ratios: pd.DataFrame, r_max: float = R_MAX) -> pd.Series:
    """Per optimizer, (1/(r_max − 1)) ∫₁^r_max ρ(τ) dτ (rule 4), computed exactly: ρ is a mean of steps
    1[r_w ≤ τ], each of which integrates to max(0, r_max − r_w) over [1, r_max] (r_w ≥ 1)."""
    if r_max <= 1:
        raise ValueError(f"Invalid r_max: {r_max!r}; expected a number > 1")
    parts = (r_max - ratios.clip(lower=1.0)).clip(lower=0.0) / (r_max - 1.0)
    return parts.mean(axis=0).rename("score")


def verdicts(frame: pd.DataFrame, metric: str = "valid_loss") -> pd.DataFrame:
    """Each LocoProp variant against each workload's strongest baseline (rule 5).

    Columns: workload, data, optimizer, baseline, difference, low, high, verdict (win, tie, loss, no verdict).
    """
    pairs = pair_table(frame, metric)
    columns = [*GROUP, "optimizer", "baseline", "difference", "low", "high", "verdict"]
    if pairs.empty:
        return pd.DataFrame(columns=columns)
    strongest = pairs[pairs["role"].str.contains(STRONGEST, regex=False)].copy()
    strongest["verdict"] = [_verdict(row) for row in strongest.itertuples()]
    return strongest[columns].reset_index(drop=True)


def _verdict(row) -> str:
    unequal = sum(0 if is_missing(v) else int(v) for v in (row.unequal_optimizer, row.unequal_baseline))
    if is_missing(row.low) or is_missing(row.high) or unequal:
        return NO_VERDICT
    if row.high < 0:
        return WIN
    if row.low > 0:
        return LOSS
    return TIE


# ------------------------------------------------------------------ report
def suite_frame(folders: Sequence[pathlib.Path]) -> pd.DataFrame:
    """The final runs of the finished comparisons among ``folders`` (those whose protocol.json lists its runs)."""
    runs = []
    for folder in folders:
        listed = _listed_runs(folder)
        runs += [folder / run for run in listed or []]
    if not runs:
        return pd.DataFrame()
    return load_results(runs)


def _listed_runs(folder: pathlib.Path) -> list[str] | None:
    """The final runs that the folder's protocol.json lists: None before its comparison finished."""
    path = folder / PROTOCOL
    if not path.is_file():
        return None
    try:
        protocol = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); repair or remove it") from None
    listed = protocol.get("runs") if isinstance(protocol, dict) else None
    return listed if isinstance(listed, list) else None


def write_suite_report(
    folders: Sequence[pathlib.Path], out: pathlib.Path, r_max: float = R_MAX, title: str = "Workload suite"
) -> pathlib.Path:
    """Write the cross-workload report (report.md, targets.csv, time_to_target.csv, ratios.csv, scores.csv,
    verdicts.csv, performance_profile.png/pdf) of the comparisons in ``folders``; returns report.md's path.

    A folder whose comparison has not finished (its protocol.json lists no runs) is named as missing.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folders = [pathlib.Path(f) for f in folders]
    unfinished = [f for f in folders if _listed_runs(f) is None]
    frame = suite_frame([f for f in folders if f not in unfinished])
    lines = [f"# {title}", "", SCORING_RULE.format(r_max=r_max), ""]
    if unfinished:
        lines += [f"Not finished, so not scored: {', '.join(f.name for f in unfinished)}.", ""]
    if frame.empty:
        lines += ["No comparison has finished yet: nothing to score.", ""]
        return _write(out, lines)
    metric = "valid_loss"
    targets = suite_targets(frame, metric)
    times = time_to_target(frame, targets, metric)
    ratios = performance_ratios(times) if not times.empty else pd.DataFrame()
    scores = integrated_scores(ratios, r_max) if not ratios.empty else pd.Series(dtype=float, name="score")
    pairs = verdicts(frame, metric)
    targets.to_csv(out / "targets.csv", index=False)
    times.replace(math.inf, math.nan).to_csv(out / "time_to_target.csv", index=False)
    ratios.to_csv(out / "ratios.csv")
    scores.rename_axis("optimizer").reset_index().to_csv(out / "scores.csv", index=False)
    pairs.to_csv(out / "verdicts.csv", index=False)
    keys = sorted(set(zip(frame["workload"], frame["data"])))
    lines += _targets_lines(keys, targets, folders)
    lines += _times_lines(times, ratios)
    lines += _profile_lines(ratios, scores, r_max, out)
    lines += _verdict_lines(keys, pairs)
    return _write(out, lines)


def _write(out: pathlib.Path, lines: list[str]) -> pathlib.Path:
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _label(workload: str, data: str) -> str:
    return f"{workload}/{data}"


def _targets_lines(keys, targets: pd.DataFrame, folders) -> list[str]:
    by_key = {(t.workload, t.data): t for t in targets.itertuples()}
    rows = []
    for key in keys:
        target = by_key.get(key)
        rows.append([_label(*key), target.baseline if target else "–", num(target.target) if target else
                     "no first-order baseline finished: no target"])  # fmt: skip
    links = ", ".join(f"[{f.name}]({f.name}/report/report.md)" for f in folders)
    return ["## Targets", "", markdown_table(["workload", "set by", "target (validation loss)"], rows), "",
            f"Per-workload reports: {links}. " + TIME_TO_TARGET_RULE, ""]  # fmt: skip


def _times_lines(times: pd.DataFrame, ratios: pd.DataFrame) -> list[str]:
    if times.empty:
        return []
    labels = [_label(w, d) for w, d in ratios.index]
    optimizers = list(ratios.columns)
    seconds = times.set_index([*GROUP, "optimizer"])
    rows = []
    for optimizer in optimizers:
        cells = []
        for key in ratios.index:
            entry = seconds.loc[(*key, optimizer)] if (*key, optimizer) in seconds.index else None
            if entry is None:
                cells.append("did not run")
            elif math.isinf(entry["seconds_to_target"]):
                cells.append(f"{NOT_REACHED} ({int(entry['reached'])}/{int(entry['runs'])})")
            else:
                cells.append(f"{entry['seconds_to_target']:.3g} s, r = {ratios.loc[key, optimizer]:.3g}")
        rows.append([optimizer, *cells])
    return ["## Time to target", "", "Median training seconds to the target, and the performance ratio r to the "
            "fastest; 'not reached (k/n)': k of n runs reached it, not more than half.", "",
            markdown_table(["optimizer", *labels], rows), ""]  # fmt: skip


def _profile_lines(ratios: pd.DataFrame, scores: pd.Series, r_max: float, out: pathlib.Path) -> list[str]:
    if ratios.empty:
        return []
    plots.save(_profile_figure(ratios, scores, r_max), out / "performance_profile")
    rows = [[name, f"{scores[name]:.3f}"] for name in scores.sort_values(ascending=False, kind="stable").index]
    return ["## Performance profile and score", "",
            f"![performance profile over {len(ratios)} workload(s)](performance_profile.png)", "",
            markdown_table(["optimizer", f"score (r_max = {r_max:g})"], rows), ""]  # fmt: skip


LINE_STYLES = ("-", "--", ":", "-.")  # profiles often coincide: the styles keep each one visible


def _profile_figure(ratios: pd.DataFrame, scores: pd.Series, r_max: float) -> Figure:
    taus = np.linspace(1.0, r_max, 301)
    rho = profile(ratios, taus)
    figure = Figure(figsize=(6.0, 4.0))
    ax = figure.add_subplot()
    for index, optimizer in enumerate(rho.columns):
        ax.step(
            taus,
            rho[optimizer],
            where="post",
            linestyle=LINE_STYLES[index % len(LINE_STYLES)],
            linewidth=2.5 - 0.3 * (index % len(LINE_STYLES)),
            label=f"{optimizer} (score {scores[optimizer]:.2f})",
        )
    ax.set_xlim(1.0, r_max)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("τ (time to target / fastest time to target)")
    ax.set_ylabel("fraction of workloads")
    ax.set_title(f"Performance profile over {len(ratios)} workload(s)")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    return figure


def _verdict_lines(keys, pairs: pd.DataFrame) -> list[str]:
    lines = ["## LocoProp against the strongest baseline", ""]
    if pairs.empty:
        return [*lines, "No LocoProp variant finished beside a baseline on any workload.", ""]
    by_key = pairs.set_index([*GROUP, "optimizer"])
    rows = []
    for optimizer in sorted(pairs["optimizer"].unique()):
        cells = []
        for key in keys:
            if (*key, optimizer) not in by_key.index:
                cells.append("–")
                continue
            row = by_key.loc[(*key, optimizer)]
            cells.append(f"{row['verdict']} vs {row['baseline']} ({_difference_text(row)})")
        counts = pairs[pairs["optimizer"] == optimizer]["verdict"].value_counts()
        rows.append([optimizer, *cells, ", ".join(_count_text(int(counts.get(v, 0)), v) for v in VERDICTS)])
    return [*lines, "Difference of mean validation losses at the budget (LocoProp − baseline) and its 95% Welch "
            "interval over the seeds: win below 0, loss above 0, tie where the interval holds 0; no verdict with "
            "fewer than two finished runs a side or runs not at equal time.", "",
            markdown_table(["optimizer", *[_label(*k) for k in keys], "in all"], rows), ""]  # fmt: skip


def _count_text(count: int, verdict: str) -> str:
    return f"{count} {verdict if count == 1 else PLURALS[verdict]}"


def _difference_text(row: Any) -> str:
    if is_missing(row["difference"]):
        return "–"
    if is_missing(row["low"]):
        return f"{row['difference']:+.4g}"
    return f"{row['difference']:+.4g}, CI {row['low']:+.4g} to {row['high']:+.4g}"
