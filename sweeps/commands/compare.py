"""``locoprop compare``: the main job, a comparison a sceptical reviewer can accept.

The protocol (AlgoPerf's rules, DeepOBS's protocol):

1. every run gets the same budget, by default the same seconds of training
   time (the clock pauses during evaluation; each run converts the time into
   its own step count, so a LocoProp step that costs eight Adam steps gets
   an eighth of the steps);
2. with ``tune=N``, every optimizer gets the same tuning budget: an N-trial
   study of its search space (``sweeps/search/spaces``) under that budget,
   with training seed ``tune_seed``, selected on the **validation** loss at
   the budget; without it, the presets of :mod:`sweeps.commands.presets`,
   which this same protocol produced;
3. the selected configuration of every optimizer is re-run over ``seeds``,
   which must differ from the tuning seed; the test loss is read only here;
4. the report (``analysis``) opens with the protocol and a headline table
   at the budget, with 95% intervals over the seeds.

Every stage resumes: a study continues until it has N finished trials (an
interrupted trial continues from its run directory), finished runs are
reused, and the report is written again. Layout of ``out``::

    tuning/OPTIMIZER/    the study of each optimizer: optuna.db (Optuna), and the study's folder
                         compare-OPTIMIZER/ with its trials and table (Ray: its experiment too)
    runs/                the final runs, one directory per optimizer and seed
    protocol.json        what was done, for the report; "runs" lists the final runs, which
                         ``locoprop report OUT`` reads (not the tuning trials)
    report/              report.md, tables and figures
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from analysis.report import write_report
from sweeps import schema
from sweeps.commands import presets
from sweeps.runner import records
from sweeps.runner.config import RunConfig, run_dir_name
from sweeps.runner.train import loss_text, train
from sweeps.search.results import best_trial

__all__ = ["PROTOCOL", "Tuning", "compare"]

PROTOCOL = schema.PROTOCOL
SELECTION_METRIC = "valid_loss"


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
    if tuning is not None:
        tuning.check(seeds)
    kind, value = base.budget
    print(
        f"compare: {', '.join(optimizers)} on {base.workload}/{base.data}, {_budget_text(kind, value)} per run, "
        f"batch {base.batch_size}, final seeds {', '.join(map(str, seeds))}"
        + (f", {tuning.trials} tuning trials each (seed {tuning.seed})" if tuning else ", presets")
        + f" -> {out}",
        flush=True,
    )
    tuned = {name: _tune(base, name, out, tuning, progress) for name in optimizers} if tuning else {}
    run_dirs = []
    for optimizer in optimizers:
        if tuning is not None and tuned[optimizer]["best"] is None:
            print(f"{optimizer}: no tuning trial finished its budget (all diverged or failed); no final runs")
            continue
        hparams = tuned[optimizer]["best"]["hparams"] if tuning else hparams_of(base.workload, optimizer)
        for seed in seeds:
            run_dirs.append(_final_run(base, optimizer, hparams, seed, out / schema.COMPARE_RUNS, progress))
    protocol = _protocol(base, seeds, tuning, tuned, run_dirs, command)
    # The final runs of this comparison, so that `locoprop report OUT` reads these and nothing else in OUT.
    protocol["runs"] = [os.path.relpath(run_dir, out) for run_dir in run_dirs]
    records.write_json(out / PROTOCOL, protocol)
    report = write_report(run_dirs, out / "report", protocol=protocol)
    print()
    print((report.parent / "results.md").read_text())
    print(f"report with the protocol, tables and plots: {report}")
    return report


def _tune(base: RunConfig, optimizer: str, out: pathlib.Path, tuning: Tuning, progress: bool | None) -> dict:
    """Run (or continue) the optimizer's study; its trial counts, cost and selected configuration."""
    from sweeps.search.spaces import load_space

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
    statuses = trials["status"].value_counts().to_dict() if not frame.empty else {}
    seconds = frame.groupby("trial")["wall_time_s"].max().sum() if not frame.empty else 0.0
    return {
        "trials": len(trials),
        "finished": int(statuses.get("ok", 0)),
        "pruned": int(statuses.get("pruned", 0)),
        "diverged": int(statuses.get("diverged", 0)),
        "failed": int(sum(n for status, n in statuses.items() if status not in ("ok", "pruned", "diverged"))),
        "train_seconds": float(seconds),
        "table": str(table),
    }


def _final_run(base: RunConfig, optimizer: str, hparams: dict, seed: int, out: pathlib.Path, progress) -> pathlib.Path:
    config = dataclasses.replace(base, optimizer=optimizer, hparams=dict(hparams), seed=seed)
    config.out = str(out / run_dir_name(config))
    result = train(config, resume=True, progress=progress)
    s = result.summary
    print(
        f"{optimizer} seed {seed}: {s['status']}, {s['steps']} steps in {s['train_seconds']:.1f} s, "
        f"valid loss {loss_text(s['final_valid_loss'])}, test loss {loss_text(s['final_test_loss'])}",
        flush=True,
    )
    return result.run_dir


def _protocol(base, seeds, tuning, tuned, run_dirs, command) -> dict[str, Any]:
    """What protocol.json records (read by analysis.report)."""
    kind, value = base.budget
    split_sizes = None
    if run_dirs:
        split_sizes = json.loads((run_dirs[0] / records.SUMMARY).read_text()).get("split_sizes")
    protocol = {
        "command": command,
        "workload": base.workload,
        "data": base.data,
        "batch_size": base.batch_size,
        "budget": {"kind": kind, "value": value},
        "seeds": list(seeds),
        "split_sizes": split_sizes,
        "tuning": None,
        "presets": None,
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
        protocol["presets"] = {"source": presets.__name__, "note": presets.PROVENANCE}
    return protocol


def _budget_text(kind: str, value: float) -> str:
    return {"time": f"{value:g} s of training", "steps": f"{value:g} steps", "epochs": f"{value:g} epochs"}[kind]
