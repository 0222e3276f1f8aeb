"""``locoprop compare``: the main job, a comparison a sceptical reviewer can accept.

The protocol (AlgoPerf's rules, DeepOBS's protocol):

1. every run gets the same budget, by default the same seconds of training
   time (the clock pauses during evaluation). The time becomes each
   optimizer's step count from one table of step costs, measured before any
   run with all the optimizers side by side in this process
   (:func:`sweeps.runner.calibration.price_steps`: interleaved rounds, each
   step's cost as its median ratio to a reference Adam step), so that a
   LocoProp step that costs eight Adam steps gets an eighth of the steps and
   a busy machine changes no ratio. With one intra-op thread on CPU (the
   default on two cores) the seconds are the training thread's CPU time, so
   a busy machine changes no step count either (``budget.budget_clock``). The
   table is recorded in protocol.json and reused by every tuning trial,
   every seed and every rerun;
2. with ``tune=N``, every optimizer gets the same tuning budget: an N-trial
   study of its search space (``sweeps/search/spaces``) under that budget,
   with training seed ``tune_seed``, selected on the **validation** loss at
   the budget; without it, the presets of :mod:`sweeps.commands.presets`,
   which this same protocol produced;
3. the selected configuration of every optimizer is re-run over ``seeds``,
   which must differ from the tuning seed; the test loss is read only here;
4. the report (``analysis``) opens with the protocol and a headline table
   at the budget, with 95% intervals over the seeds.

Every run, trial and pricing of a comparison is in ``base.precision``
(``--precision``): protocol.json records it, the report states it, and a
table of step costs measured in another precision is measured again.

Every stage resumes: a study continues until it has N finished trials (an
interrupted trial continues from its run directory), finished runs are
reused, and the report is written again. Layout of ``out``::

    tuning/OPTIMIZER/    the study of each optimizer: optuna.db (Optuna), and the study's folder
                         compare-OPTIMIZER/ with its trials and table (Ray: its experiment too)
    runs/                the final runs, one directory per optimizer and seed
    protocol.json        what was done, for the report, and the step costs (written first); "runs"
                         lists the final runs, which ``locoprop report OUT`` reads (not the tuning trials)
    report/              report.md, tables and figures
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from analysis.report import write_report
from analysis.trials import trial_counts
from baselines.registry import cost_knobs
from sweeps import schema
from sweeps.commands import presets
from sweeps.runner import budget, run_directory
from sweeps.runner.budget import StepCost, knob_key
from sweeps.runner.config import RunConfig, absent, run_dir_name
from sweeps.runner.train import check_builds, check_fits_data, loss_text, train
from sweeps.search.results import best_trial

__all__ = ["PROTOCOL", "Tuning", "check_optimizers", "compare"]

PROTOCOL = schema.PROTOCOL
SELECTION_METRIC = "valid_loss"
STEP_COSTS = schema.STEP_COSTS


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How ``compare`` tunes every optimizer: ``trials`` per optimizer, training seed ``seed``, and the back end."""

    trials: int
    seed: int = 0
    backend: str = "optuna"
    storage: str | None = None  # Optuna: an RDB URL shared by workers (default: SQLite under out/tuning)
    address: str | None = None  # Ray: a cluster address (default: a local Ray)

    def check(self, seeds: Sequence[int]) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"Invalid tune: {self.trials!r}; expected a number of trials ≥ 1")
        if self.backend not in ("optuna", "ray"):
            raise ValueError(f"Invalid backend: {self.backend!r}; expected optuna or ray")
        if self.seed in seeds:
            raise ValueError(
                f"The final seeds {list(seeds)} include the tuning seed {self.seed}: the final runs must use fresh "
                "seeds (pass --seeds without it, or another --tune-seed)"
            )


def compare(
    base: RunConfig,
    optimizers: Sequence[str],
    seeds: Sequence[int],
    out: pathlib.Path,
    *,
    tuning: Tuning | None = None,
    hparams_of: Callable[[str, str], dict] = presets.preset,
    progress: bool | None = None,
    command: str | None = None,
) -> pathlib.Path:
    """Tune (optionally), run every optimizer over every seed, write the report; returns report.md's path.

    Args:
        base: what every run shares (workload, data, budget, batch size, …);
            its optimizer, hparams, seed and out are set per run.
        optimizers: registry names.
        seeds: training seeds of the final runs, one run per optimizer and seed.
        out: the folder of the whole comparison (layout in the module docstring).
        tuning: tune every optimizer first; None uses ``hparams_of``.
        hparams_of: (workload, optimizer) -> hyperparameters over the registry
            defaults, when not tuning (default: the compare presets).
        progress: progress bars (default: when stderr is a terminal).
        command: the command line, recorded in protocol.json.
    """
    out = pathlib.Path(out)
    base.validate()
    for seed in seeds:  # before the header, so that a refusal is the only line
        dataclasses.replace(base, seed=seed).validate()
    if tuning is not None:
        tuning.check(seeds)
    check_optimizers(base, optimizers, hparams_of)
    kind, value = base.budget
    print(
        f"compare: {', '.join(optimizers)} on {base.workload}/{base.data}, {_budget_text(kind, value)} per run, "
        f"batch {base.batch_size}, precision {base.precision}, final seeds {', '.join(map(str, seeds))}"
        + (f"; {tuning.trials} tuning trials each (seed {tuning.seed})" if tuning else "; presets")
        + f" -> {out}",
        flush=True,
    )
    costs = _step_costs(base, {name: hparams_of(base.workload, name) for name in optimizers}, out, tuning)
    out.mkdir(parents=True, exist_ok=True)
    run_directory.write_json(out / PROTOCOL, _protocol(base, seeds, tuning, {}, [], command, costs))
    priced = {name: _priced(base, costs, name) for name in optimizers}
    tuned = {name: _tune(priced[name], name, out, tuning, progress) for name in optimizers} if tuning else {}
    run_dirs = []
    for optimizer in optimizers:
        if tuning is not None and tuned[optimizer]["best"] is None:
            print(f"{optimizer}: no tuning trial finished its budget (all diverged or failed); no final runs")
            continue
        hparams = tuned[optimizer]["best"]["hparams"] if tuning else hparams_of(base.workload, optimizer)
        for seed in seeds:
            run_dirs.append(
                _final_run(priced[optimizer], optimizer, hparams, seed, out / schema.COMPARE_RUNS, progress)
            )
    protocol = _protocol(base, seeds, tuning, tuned, run_dirs, command, costs)
    # The final runs of this comparison, so that `locoprop report OUT` reads these and nothing else in OUT.
    protocol["runs"] = [os.path.relpath(run_dir, out) for run_dir in run_dirs]
    run_directory.write_json(out / PROTOCOL, protocol)
    report = write_report(run_dirs, out / "report", protocol=protocol)
    print()
    print((report.parent / "results.md").read_text())
    print(f"report with the protocol, tables and plots: {report}")
    return report


def check_optimizers(base: RunConfig, optimizers: Sequence[str], hparams_of: Callable[[str, str], dict]) -> None:
    """Refuse (ValueError), before anything runs, an optimizer that the workload's model refuses at its
    ``hparams_of`` (locoprop-s-exact on a convolutional model): otherwise the optimizers before it ran first."""
    for name in optimizers:
        check_builds(dataclasses.replace(base, optimizer=name, hparams=dict(hparams_of(base.workload, name))))


# ------------------------------------------------------------ step costs
def _step_costs(
    base: RunConfig, hparams: dict[str, dict], out: pathlib.Path, tuning: Tuning | None = None
) -> dict[str, Any] | None:
    """The comparison's table of step costs (None without a time budget), as protocol.json records it.

    Reused from protocol.json when it was measured for the same model, batch, device and threads (the
    ``setup``) and the same hyperparameters; an optimizer it lacks is measured beside the reference and
    priced against the table's reference step, so that every cost stays in the one table. Each optimizer is
    priced with ``hparams`` (the presets) and, when tuning, at every value its search space gives the knobs
    that set a step's cost (``baselines.registry.cost_knobs``: LocoProp's K, K-FAC's refresh periods), all in
    the same rounds: a trial or run takes the cost of its own knobs (``variants``), so that at equal time a
    cheaper step buys more steps. The report checks every run's measured cost afterwards.
    """
    if base.time_budget is None:
        return None
    setup = _cost_setup(base)
    stored = _stored_costs(out / PROTOCOL)
    table = stored if stored is not None and stored.get("setup") == setup else None
    known = (table or {}).get("optimizers", {})
    wanted = {name: _knob_values(name, given, tuning) for name, given in hparams.items()}
    missing = {
        name: given
        for name, given in hparams.items()
        if known.get(name, {}).get("hparams") != given or not set(wanted[name]) <= set(_variants(name, known[name]))
    }
    if missing:
        from sweeps.runner.calibration import price_steps

        print(f"pricing steps side by side: {', '.join(_priced_names(missing, wanted))} against "
              f"{budget.REFERENCE_OPTIMIZER}", flush=True)  # fmt: skip
        # One entry per knob value, the preset's under the optimizer's own name.
        labels = {name: {key: name if key == knob_key(cost_knobs(name, given)) else f"{name} ({key})"
                         for key in wanted[name]} for name, given in missing.items()}  # fmt: skip
        entries = {labels[name][key]: {**given, **knobs} for name, given in missing.items()
                   for key, knobs in wanted[name].items()}  # fmt: skip
        names = {label: name for name in missing for label in labels[name].values()}
        measured = price_steps(base, entries, check_fits_data(base), names)
        if table is None:
            reference = next(iter(measured.costs.values())).reference_step_time_s
            table = {"reference": measured.reference, "reference_step_time_s": reference, "setup": setup,
                     "timed_steps": measured.timed_steps, "clock": measured.clock, "optimizers": {}}  # fmt: skip
        for name, given in missing.items():
            variants = {key: {"ratio": measured.costs[label].ratio, "skipped_steps": measured.skipped_steps[label]}
                        for key, label in labels[name].items()}  # fmt: skip
            table["optimizers"][name] = {**variants[knob_key(cost_knobs(name, given))], "hparams": given}
            if len(variants) > 1:
                table["optimizers"][name]["variants"] = variants
    for entry in table["optimizers"].values():  # the step time and count of every optimizer, from its ratio
        for priced in [entry, *entry.get("variants", {}).values()]:
            priced["step_time_s"] = priced["ratio"] * table["reference_step_time_s"]
            priced["steps"] = max(1, math.floor(base.time_budget / priced["step_time_s"]))
    _print_costs(table, list(hparams), measured=bool(missing))
    return table


def _knob_values(name: str, preset: dict, tuning: Tuning | None) -> dict[str, dict]:
    """The cost-knob values ``name`` is priced at: the preset's, and when tuning every combination its search
    space can sample (key ``budget.knob_key`` -> knob values)."""
    own = cost_knobs(name, preset)
    values = {knob_key(own): own}
    if tuning is None or not own:
        return values
    import optuna

    from sweeps.search.search_space import load_space

    space = load_space(name)
    choices = []
    for knob, default in cost_knobs(name, {}).items():
        if knob in space.distributions:
            distribution = space.distributions[knob]
            if not isinstance(distribution, optuna.distributions.CategoricalDistribution):
                raise ValueError(f"{space.source}: cost knob {knob} must be categorical so that each value's step "
                                 "can be priced before the trials")  # fmt: skip
            choices.append(list(distribution.choices))
        else:
            choices.append([space.fixed.get(knob, default)])
    for combination in itertools.product(*choices):
        knobs = dict(zip(own, combination))
        values.setdefault(knob_key(knobs), knobs)
    return values


def _variants(name: str, entry: dict) -> dict:
    """A stored entry's priced variants (one, its own, in a table priced before cost knobs were)."""
    return entry.get("variants") or {knob_key(cost_knobs(name, entry.get("hparams") or {})): entry}


def _priced_names(missing: dict, wanted: dict) -> list[str]:
    return [name if len(wanted[name]) == 1 else f"{name} (at {len(wanted[name])} cost-knob values)" for name in missing]


def _cost_setup(base: RunConfig) -> dict[str, Any]:
    """What a step's cost depends on besides the optimizer: a table measured for another setup (its precision
    included) is not reused."""
    device = base.device if base.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    threads = base.threads or budget.default_threads()
    fields = ("workload", "data", "batch_size", "width_mult", "depth_mult", "valid_fraction")
    setup = {**{name: getattr(base, name) for name in fields}, "device": device, "threads": threads}
    if not absent(schema.PRECISION, base.precision):  # a table of an older locoprop was measured in fp32
        setup[schema.PRECISION] = base.precision
    return setup


def _stored_costs(path: pathlib.Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return run_directory.read_json(path).get(STEP_COSTS)


def _priced(base: RunConfig, costs: dict[str, Any] | None, optimizer: str) -> RunConfig:
    """``base`` with ``optimizer``'s step cost from the table (as it is without a time budget)."""
    if costs is None:
        return base
    entry = costs["optimizers"][optimizer]
    reference = costs["reference_step_time_s"]
    variants = {key: v["ratio"] * reference for key, v in entry["variants"].items()} if "variants" in entry else None
    cost = StepCost(entry["step_time_s"], reference, costs.get("clock", "wall"), variants)
    return dataclasses.replace(base, step_cost=cost)


def _cost_text(name: str, entry: dict[str, Any]) -> str:
    """``locoprop-m 6.1 (160 steps; at local_iters=1 1.6 (600), …)``: the preset's cost, then the other knobs'."""
    others = [f"at {key} {v['ratio']:.3g} ({v['steps']})" for key, v in entry.get("variants", {}).items()
              if v["ratio"] != entry["ratio"]]  # fmt: skip
    return f"{name} {entry['ratio']:.3g} ({entry['steps']} steps{''.join('; ' + o for o in others)})"


def _print_costs(table: dict[str, Any], optimizers: list[str], measured: bool) -> None:
    entries = table["optimizers"]
    listed = ", ".join(_cost_text(name, entries[name]) for name in optimizers)
    clock = "CPU time of the training thread" if table.get("clock") == "cpu" else "wall time"
    print(
        f"step costs in {table['reference']} steps ({1000 * table['reference_step_time_s']:.3g} ms each, {clock}), "
        f"{'measured side by side' if measured else 'from ' + PROTOCOL}, {table['setup']['threads']} thread(s): "
        f"{listed}",
        flush=True,
    )


# ---------------------------------------------------------------- stages
def _tune(base: RunConfig, optimizer: str, out: pathlib.Path, tuning: Tuning, progress: bool | None) -> dict:
    """Run (or continue) the optimizer's study; its trial counts, cost and selected configuration."""
    from sweeps.search.search_space import load_space

    study_out = (out / "tuning" / optimizer).resolve()
    config = dataclasses.replace(base, optimizer=optimizer, hparams={}, seed=tuning.seed, out=str(study_out))
    space = load_space(optimizer)
    study = f"compare-{optimizer}"
    print(f"tuning {optimizer}: {tuning.trials} trials of {space.source}", flush=True)
    if tuning.backend == "ray":
        from sweeps.search.ray_backend import run_ray_sweep

        table = run_ray_sweep(config, space, study_name=study, out=study_out, trials=tuning.trials,
                              address=tuning.address, metric=SELECTION_METRIC, sampler_seed=tuning.seed)  # fmt: skip
    else:
        from sweeps.search.optuna_backend import run_optuna_sweep

        table = run_optuna_sweep(config, space, study_name=study, out=study_out, trials=tuning.trials,
                                 storage=tuning.storage, metric=SELECTION_METRIC, sampler_seed=tuning.seed,
                                 progress=progress)  # fmt: skip
    summary = _study_summary(table)
    summary["best"] = best_trial(table, SELECTION_METRIC)
    best = summary["best"]
    chosen = f"selected {best['hparams']} (validation loss {best[SELECTION_METRIC]:.6g})" if best else "none finished"
    print(f"tuned {optimizer}: {summary['finished']} of {summary['trials']} trials finished; {chosen}", flush=True)
    return summary


def _study_summary(table: pathlib.Path) -> dict[str, Any]:
    """Counts of a study's trials by status, and their training seconds (the tuning cost)."""
    import pandas as pd

    frame = pd.read_csv(table)
    trials = frame.drop_duplicates("trial") if not frame.empty else frame
    statuses = trials["status"].tolist() if not frame.empty else []
    seconds = frame.groupby("trial")["wall_time_s"].max().sum() if not frame.empty else 0.0
    # The same counts as `locoprop report` gives a sweep table (analysis.trials).
    return {**trial_counts(statuses), "train_seconds": float(seconds), "table": str(table)}


def _final_run(base: RunConfig, optimizer: str, hparams: dict, seed: int, out: pathlib.Path, progress) -> pathlib.Path:
    config = dataclasses.replace(base, optimizer=optimizer, hparams=dict(hparams), seed=seed)
    config.out = str(out / run_dir_name(config))
    result = train(config, resume=True, progress=progress)
    s = result.summary
    on_cpu = (s.get("calibration") or {}).get("clock") == "cpu"
    seconds = f"{s['train_seconds']:.1f} s"
    if on_cpu:
        seconds = f"{s['train_cpu_seconds']:.1f} s of CPU time ({seconds} wall)"
    print(
        f"{optimizer} seed {seed}: {s['status']}, {s['steps']} steps in {seconds}, "
        f"valid loss {loss_text(s['final_valid_loss'])}, test loss {loss_text(s['final_test_loss'])}",
        flush=True,
    )
    return result.run_dir


def _protocol(base, seeds, tuning, tuned, run_dirs, command, costs) -> dict[str, Any]:
    """What protocol.json records (read by analysis.report); written before the first run too, with the step
    costs, and again at the end."""
    kind, value = base.budget
    split_sizes = None
    if run_dirs:
        split_sizes = json.loads((run_dirs[0] / run_directory.SUMMARY).read_text()).get("split_sizes")
    protocol = {
        "command": command,
        "workload": base.workload,
        "data": base.data,
        "batch_size": base.batch_size,
        schema.PRECISION: base.precision,
        "budget": {"kind": kind, "value": value},
        "seeds": list(seeds),
        "split_sizes": split_sizes,
        "tuning": None,
        "presets": None,
        STEP_COSTS: costs,
    }
    if tuning is not None:
        protocol["tuning"] = {
            "trials_per_optimizer": tuning.trials,
            "seed": tuning.seed,
            "backend": tuning.backend,
            "metric": SELECTION_METRIC,
            "optimizers": tuned,
        }
    else:
        protocol["presets"] = {"source": presets.__name__, "note": presets.provenance(base.workload)}
    return protocol


def _budget_text(kind: str, value: float) -> str:
    return {"time": f"{value:g} s of training", "steps": f"{value:g} steps", "epochs": f"{value:g} epochs"}[kind]
