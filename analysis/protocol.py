"""The protocol section that opens a report (SPEC §9): budget, tuning and its cost, seeds, splits.

From ``locoprop compare``'s protocol.json when given; otherwise derived
from the runs, saying that how their hyperparameters were chosen is
unknown. Either way the section lists the configuration each optimizer's
runs used.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import pandas as pd

from analysis.headline import MIXED, group_budget, run_finals
from analysis.load import registry_name
from analysis.text import budget_text, is_missing, markdown_table, num
from analysis.trials import TRIAL_COUNTS
from sweeps.schema import BUDGET, BUDGET_KIND, HPARAM_PREFIX, PRECISION, STEP_COSTS

__all__ = ["budget_sentence", "precision_line", "protocol_section"]

GROUP = ["workload", "data"]
SPLITS = (("train", "training"), ("valid", "validation"), ("test", "test"))
TUNING_COUNTS = TRIAL_COUNTS  # protocol.json's counts of each study's trials (analysis.trials.trial_counts)


def budget_sentence(kind: str | None, value) -> str:
    """The budget, and what it makes equal, in a sentence or two."""
    if kind == "time":
        return (
            f"{budget_text(kind, value)} per run, the clock paused during evaluation. The time becomes each "
            "optimizer's number of steps through its step cost, measured side by side with a reference Adam step "
            "on the same model (rounds of steps of each in turn; the cost is the median ratio to the reference in "
            "the same round), so that every optimizer gets the same training time, a costlier step gets fewer "
            "steps, and a busy machine changes no ratio. The calibration is recorded in each run's config.json; "
            "runs on one thread on CPU count the CPU time of that thread, which a busy machine does not lengthen."
        )
    if kind in ("steps", "epochs"):
        return (
            f"{budget_text(kind, value)} per run. A step costs different times for different optimizers, so "
            f"this is an equal-{kind} comparison, not an equal-time one."
        )
    if kind == MIXED:
        return "the runs have different budgets, so the tables below compare them at the end of each run."
    return "not recorded with the runs (an older locoprop): the tables compare them at the end of each run."


PRECISION_TEXT = {
    "fp32": "fp32, float32 throughout.",
    "bf16": "bf16: the forward and backward under bfloat16 autocast, the weights, gradients and optimizer state in "
    "float32; locoprop-m and locoprop-s also run their inner iterations' matmuls in bfloat16 (local_dtype), "
    "unless their configuration below sets local_dtype.",
}


def precision_line(frame: pd.DataFrame) -> str:
    """The arithmetic the runs used, as a protocol line; when they used several, which optimizer ran in which, and
    that each optimizer's runs in each precision are an entry of their own (:func:`analysis.load.label_precisions`)."""
    precisions = sorted(set(frame[PRECISION]))
    if len(precisions) == 1:
        return f"- Precision: {PRECISION_TEXT.get(precisions[0], precisions[0])}"
    finals = run_finals(frame)
    used: dict[str, set[str]] = {}
    for optimizer, precision in zip(finals["optimizer"], finals[PRECISION]):
        used.setdefault(registry_name(optimizer), set()).add(precision)
    listed = "; ".join(f"{name}: {', '.join(sorted(p))}" for name, p in sorted(used.items()))
    return (
        f"- Precision: MIXED, the runs are not all in one precision ({listed}). Each optimizer's runs in each "
        "precision are an entry of their own, labelled NAME (PRECISION), never pooled; a comparison across "
        "precisions compares the arithmetic as well as the optimizers. "
        + " ".join(f"{PRECISION_TEXT.get(p, p)}" for p in precisions)
    )


def protocol_section(frame: pd.DataFrame, protocol: dict[str, Any] | None = None) -> list[str]:
    """The report's opening section as Markdown lines."""
    lines = ["## Protocol", ""]
    if protocol is None:
        lines += _derived(frame)
    else:
        lines += _recorded(frame, protocol)
    return [*lines, "", *_configurations(frame), ""]


def _recorded(frame: pd.DataFrame, protocol: dict[str, Any]) -> list[str]:
    """The protocol of ``locoprop compare`` (its protocol.json)."""
    budget = protocol.get("budget") or {}
    tuning = protocol.get("tuning")
    lines = [f"- Command: `{protocol['command']}`"] if protocol.get("command") else []
    task = f"{protocol.get('workload')} on {protocol.get('data')}"
    if protocol.get("batch_size"):
        task += f", batch size {protocol['batch_size']}"
    lines += [f"- Task: {task}.", f"- Budget: {budget_sentence(budget.get('kind'), budget.get('value'))}"]
    lines.append(precision_line(frame))
    sizes = protocol.get("split_sizes")
    lines.append(f"- Splits: {_sizes_text(sizes) if sizes else _derived_sizes(run_finals(frame))}")
    if tuning:
        lines += _tuning_lines(tuning)
    elif protocol.get("presets"):
        presets = protocol["presets"]
        lines.append(
            f"- Hyperparameters: not tuned by this comparison; presets from `{presets.get('source')}` "
            f"({presets.get('note')})."
        )
    else:
        lines.append("- Hyperparameters: how they were chosen is not recorded.")
    lines.append(f"- Final runs: {_seeds_text(protocol.get('seeds') or [], tuning)}")
    if protocol.get(STEP_COSTS):
        lines += ["", *_step_cost_lines(protocol[STEP_COSTS])]
    if tuning:
        lines += ["", "Tuning cost per optimizer (every trial trains under the budget above):", ""]
        lines.append(_tuning_table(tuning))
    return lines


def _step_cost_lines(costs: dict[str, Any]) -> list[str]:
    """The comparison's table of step costs (protocol.json), which gave every tuning trial and run its steps."""
    reference = costs.get("reference")
    setup = costs.get("setup") or {}
    rows = []
    for name, entry in (costs.get("optimizers") or {}).items():
        # with a tuned cost knob (LocoProp's K, …), each of its values priced: a run steps as its own value's row
        priced = {name: entry} | {f"{name} ({key})": v for key, v in entry.get("variants", {}).items()}
        rows += [[label, num(1000 * cost["step_time_s"]), f"{cost['ratio']:.3g}", str(cost.get("steps", "–"))]
                 for label, cost in priced.items()]  # fmt: skip
    return [
        f"Step costs, measured before the runs with every optimizer side by side in one process "
        f"({costs.get('timed_steps')} timed steps each, whole periods for an optimizer that refreshes every P "
        f"steps; {setup.get('threads')} thread(s) on {setup.get('device')}; "
        f"one {reference} step: {num(1000 * costs['reference_step_time_s'])} ms{_clock_text(costs.get('clock'))}). "
        "Every tuning trial and run of an optimizer trains its number of steps:",
        "",
        markdown_table(["optimizer", "step (ms)", f"in {reference} steps", "steps"], rows),
    ]


def _clock_text(clock: str | None) -> str:
    if clock == "cpu":
        return " of CPU time of the one training thread, the clock of the budget, which other processes do not move"
    return ""


def _tuning_lines(tuning: dict[str, Any]) -> list[str]:
    metric = "validation loss" if tuning.get("metric", "valid_loss") == "valid_loss" else tuning["metric"]
    total = sum(float(o.get("train_seconds") or 0.0) for o in (tuning.get("optimizers") or {}).values())
    return [
        f"- Tuning: {tuning.get('trials_per_optimizer')} trials per optimizer ({tuning.get('backend')}, training "
        f"seed {tuning.get('seed')}), each under the budget above; the configuration with the lowest {metric} at "
        "the budget is selected. The test split plays no part in the selection.",
        f"- Tuning cost: {num(total)} s of training in all (table below).",
    ]


def _tuning_table(tuning: dict[str, Any]) -> str:
    """Per optimizer: its trials by outcome, their training seconds, the selected configuration; and the total."""
    studies = tuning.get("optimizers") or {}
    headers = [*TUNING_COUNTS, "training time (s)", "selected configuration", "its validation loss"]
    rows = []
    for name, study in studies.items():
        best = study.get("best")
        chosen = (_hparams_text(best.get("hparams") or {}), num(best.get("valid_loss"))) if best else ("none", "–")
        counts = [str(study.get(key, "–")) for key in TUNING_COUNTS]
        rows.append([name, *counts, num(study.get("train_seconds")), *chosen])
    totals = [str(sum(int(s.get(key) or 0) for s in studies.values())) for key in TUNING_COUNTS]
    seconds = sum(float(s.get("train_seconds") or 0.0) for s in studies.values())
    rows.append(["**total**", *totals, num(seconds), "", ""])
    return markdown_table(["optimizer", *headers], rows)


def _seeds_text(seeds: list, tuning: dict[str, Any] | None) -> str:
    text = f"seeds {', '.join(map(str, seeds))}, one run per optimizer and seed with its configuration (below)"
    if tuning is None:
        return text + "."
    seed = tuning.get("seed")
    if seed in seeds:
        return text + f". WARNING: they include the tuning seed {seed}, so the final runs are not independent of it."
    return text + f"; fresh seeds, not the tuning seed {seed}."


def _derived(frame: pd.DataFrame) -> list[str]:
    """What the runs themselves record, per (workload, data)."""
    finals = run_finals(frame)
    lines = [
        "No protocol.json was given (a plain `locoprop report`): this section is derived from the runs.",
        "",
        "- Tuning: unknown. How the hyperparameters of these runs were chosen, on which split and at what "
        "cost is not recorded with them.",
        precision_line(frame),
    ]
    for (workload, data), runs in finals.groupby(GROUP, sort=True):
        kind, value = group_budget(runs)
        budget = budget_sentence(kind, value)
        if kind == MIXED:
            budget += " Budgets: " + _budgets_by_optimizer(runs)
        lines += [
            f"- {workload} on {data}, budget: {budget}",
            f"  Splits: {_derived_sizes(runs)} Seeds: {_derived_seeds(runs)}",
        ]
    return lines


def _budgets_by_optimizer(runs: pd.DataFrame) -> str:
    """The budgets of each optimizer's runs: "adam: 30 s of training time; locoprop-m: 5 epochs"."""
    parts = []
    for optimizer, group in runs.groupby("optimizer", sort=True):
        kinds = sorted({budget_text(*_budget(kind, value)) for kind, value in zip(group[BUDGET_KIND], group[BUDGET])})
        parts.append(f"{optimizer}: {', '.join(kinds)}")
    return "; ".join(parts) + "."


def _budget(kind, value) -> tuple[str | None, float | None]:
    return (None, None) if is_missing(kind) else (kind, value)


def _sizes_text(sizes: dict) -> str:
    parts = [f"{sizes[key]} {name}" for key, name in SPLITS if sizes.get(key) is not None]
    return ", ".join(parts) + " examples (the validation split is carved from the training set, fixed and seeded)."


def _derived_sizes(runs: pd.DataFrame) -> str:
    """The split sizes the runs recorded; all runs should agree, and the text says when they do not."""
    columns = [f"{key}_size" for key, _ in SPLITS]
    seen = {tuple(None if is_missing(v) else int(v) for v in row) for row in runs[columns].itertuples(index=False)}
    seen.discard((None, None, None))
    if not seen:
        return "not recorded (older runs, or a sweep table)."
    if len(seen) > 1:
        return f"the runs differ: {'; '.join(str(s) for s in sorted(seen, key=str))} (train, valid, test)."
    return _sizes_text(dict(zip(("train", "valid", "test"), seen.pop())))


def _derived_seeds(runs: pd.DataFrame) -> str:
    seeds = {name: sorted(set(group["seed"])) for name, group in runs.groupby("optimizer", sort=True)}
    if len({tuple(s) for s in seeds.values()}) == 1:
        return f"{_join(next(iter(seeds.values())))} for every optimizer."
    return "; ".join(f"{name}: {_join(s)}" for name, s in seeds.items()) + "."


def _join(values: Iterable) -> str:
    return ", ".join(map(str, values))


def _configurations(frame: pd.DataFrame) -> list[str]:
    """The hyperparameters of each optimizer's runs: its configuration, or how many there are."""
    finals = run_finals(frame)
    lines = ["Configurations of the runs:", ""]
    for optimizer, runs in finals.groupby("optimizer", sort=True):
        columns = [c for c in runs.columns if c.startswith(HPARAM_PREFIX) and runs[c].notna().any()]
        configs = {
            _hparams_text({c.removeprefix(HPARAM_PREFIX): row[c] for c in columns}) for _, row in runs.iterrows()
        }
        text = configs.pop() if len(configs) == 1 else f"{len(configs)} configurations (a search)"
        lines.append(f"- {optimizer}: {text}")
    return lines


def _hparams_text(hparams: dict) -> str:
    """lr=0.001, inner=rmsprop-tf; "registry defaults" when empty (missing values, NaN, are left out)."""
    shown = {k: v for k, v in hparams.items() if not is_missing(v)}
    if not shown:
        return "registry defaults"
    return ", ".join(f"{k}={_value_text(v)}" for k, v in shown.items())


def _value_text(value) -> str:
    if isinstance(value, (bool, numbers.Integral)):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.4g}"
    return str(value)
