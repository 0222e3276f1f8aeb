"""The trials of the sweeps among a report's inputs, by outcome (SPEC §8, §9).

A sweep's results table (``sweep_results.csv`` of ``locoprop sweep``, or a
tuning study of ``locoprop compare``) holds every trial that evaluated at
least once, each with its status: "ok" (it ran its whole budget), "pruned"
(stopped early by the pruner: Optuna's median or Hyperband, Ray's ASHA),
"diverged", or "failed" (an error; "interrupted" for one stopped by a
signal and not yet resumed). Only the finished ones enter the report's
tables as finished runs, so the report says how many of each there were:
a study of 20 trials of which 15 were pruned is not a study of 5.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

import pandas as pd

from analysis.load import SWEEP, final_rows
from analysis.text import markdown_table
from sweeps.schema import DIVERGED, OK, STATUS, SWEEP_TABLE

__all__ = ["TRIAL_COUNTS", "TRIAL_OUTCOMES", "sweep_section", "sweep_trials", "trial_counts"]

TRIAL_COUNTS = ("trials", "finished", "pruned", "diverged", "failed")
PRUNED = "pruned"
TRIAL_OUTCOMES = (
    "finished: ran its whole budget (status ok); pruned: stopped early by the pruner (Optuna's median or Hyperband, "
    "Ray's ASHA), its loss from part of the budget; diverged: its loss became NaN or exploded (Optuna records it "
    "as a pruned trial); failed: an error or an interruption not yet resumed. A trial that failed before its first "
    "evaluation has no rows in its table and is not counted."
)


def trial_counts(statuses: Iterable[str]) -> dict[str, int]:
    """:data:`TRIAL_COUNTS` of trials with these statuses, one per trial; "failed" counts every status that is not
    finished, pruned or diverged."""
    statuses = list(statuses)
    counts = {
        "trials": len(statuses),
        "finished": statuses.count(OK),
        "pruned": statuses.count(PRUNED),
        "diverged": statuses.count(DIVERGED),
    }
    return {**counts, "failed": counts["trials"] - counts["finished"] - counts["pruned"] - counts["diverged"]}


def sweep_trials(frame: pd.DataFrame) -> pd.DataFrame:
    """Per sweep table of ``frame`` (:func:`analysis.load.load_results`) and optimizer, workload and data: its
    trials by outcome. Columns: study (the folder of the table, the study's name for ``locoprop sweep``; else the
    table's name), table (its path without suffix), optimizer, workload, data, then :data:`TRIAL_COUNTS`. Empty
    when ``frame`` holds no sweep table."""
    columns = ["study", "table", "optimizer", "workload", "data", *TRIAL_COUNTS]
    finals = final_rows(frame)
    finals = finals[finals[SWEEP].notna()]
    rows = []
    for (table, optimizer, workload, data), trials in finals.groupby([SWEEP, "optimizer", "workload", "data"]):
        rows.append({"study": _study_name(table), "table": table, "optimizer": optimizer, "workload": workload,
                     "data": data, **trial_counts(trials[STATUS])})  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _study_name(table: str) -> str:
    path = pathlib.Path(table)
    return path.parent.name if path.name == SWEEP_TABLE and path.parent.name else path.name


def sweep_section(frame: pd.DataFrame, out: pathlib.Path) -> list[str]:
    """The report's section on the sweeps among its inputs, as Markdown lines, and its table ``sweeps.csv`` in
    ``out``; nothing without a sweep table."""
    table = sweep_trials(frame)
    if table.empty:
        return []
    table.to_csv(out / "sweeps.csv", index=False)
    headers = ["study", "optimizer", "workload", "data", *TRIAL_COUNTS]
    rows = [[str(row[name]) for name in headers] for _, row in table.iterrows()]
    return ["## Sweeps: trials by outcome", "", TRIAL_OUTCOMES, "", markdown_table(headers, rows), ""]
