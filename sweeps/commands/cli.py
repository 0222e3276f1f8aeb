"""The ``locoprop`` command line (SPEC §7): what each command does with its flags, which
:mod:`sweeps.commands.flags` declares (:func:`locoprop_parser` joins each command's builder there to its
handler here).

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
import os
import pathlib
import shlex
import signal
import sys
import warnings

import torch

import locoprop
from analysis.load import CompareFolderRead, RunSkipped, RunsNotFound
from baselines.registry import OPTIMIZERS
from sweeps import interrupts, schema
from sweeps.commands import flags, presets
from sweeps.commands.flags import EXAMPLES, HPARAM_FLAGS
from sweeps.extras import MissingExtra
from sweeps.runner import run_directory
from sweeps.runner.budget import CalibrationSkipped
from sweeps.runner.config import ABSENT_AT, RunConfig, run_dir_name, run_identity
from sweeps.runner.data import DataUnavailable
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
from sweeps.runner.workloads import WORKLOADS
from sweeps.search.results import SweepNotice

# EXAMPLES, each command's example (sweeps.commands.flags), for the tests that parse them.
__all__ = ["EXAMPLES", "EXIT_BAD_INPUT", "EXIT_RUN_FAILED", "locoprop_parser", "main"]

EXIT_RUN_FAILED, EXIT_BAD_INPUT = 1, 2  # interrupted: 128 + the signal (interrupts.exit_status)
# Set in the environment of the processes torchrun starts (torchrun's own ranks, whatever their number).
TORCHRUN_ENVIRONMENT = "TORCHELASTIC_RUN_ID"


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
        precision=args.precision,
        out=str(out),
    )


def cmd_train(args) -> int:
    hparams = {name: getattr(args, name) for name in HPARAM_FLAGS if getattr(args, name) is not None}
    for key, value in args.hparam or []:
        if key in hparams and hparams[key] != value:  # two values for one hyperparameter: which one was meant?
            raise ValueError(f"Hyperparameter {key} is given twice ({hparams[key]!r} and {value!r}); give it once")
        hparams[key] = value
    if args.adaptive_gamma:
        if not {"activation_lr", *locoprop.ADAPTIVE_GAMMA} <= set(OPTIMIZERS[args.optimizer].defaults):
            raise ValueError(f"--adaptive-gamma adapts LocoProp's γ; optimizer {args.optimizer!r} has none")
        hparams = {**locoprop.ADAPTIVE_GAMMA, **hparams}  # the flags given explicitly win
    nproc = _nproc(args.nproc)
    config = run_config_from_args(args, args.optimizer, drop_neutral_hparams(args.optimizer, hparams), args.seed,
                                  pathlib.Path(args.out))  # fmt: skip
    config.out = str(pathlib.Path(args.out) / run_dir_name(config))
    args.run_dir = config.out  # for the message of an interrupt (_interrupted)
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
    a new run starts instead, or that there is none; None where the run exists."""
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
        return f"--resume: no run to continue in {out}, so a new one starts in {run_dir.name}"
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
            there, now = _setting_text(field, stored.get(field)), _setting_text(field, asked.get(field))
            differences.append(f"--{field.replace('_', '-')} {there} there, {now} now")
    return differences


def _setting_text(field: str, value: str | None) -> str:
    """A setting of a run identity as typed: a string without its JSON quotes; a field the identity leaves out
    at the value older runs had (:data:`~sweeps.runner.config.ABSENT_AT`: ``--precision fp32``) as that value."""
    if value is None and ABSENT_AT.get(field) is not None:
        return str(ABSENT_AT[field])
    decoded = json.loads(value) if value is not None else None
    return decoded if isinstance(decoded, str) else str(value)


def _hparam_flag(name: str) -> str:
    return HPARAM_FLAGS[name].flag if name in HPARAM_FLAGS else f"--hparam {name}"


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
    from sweeps.commands.compare import compare

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
    tuning = _tuning(args)
    compare(base, optimizers, args.seeds, out, tuning=tuning, progress=False if args.no_progress else None,
            command=shlex.join(_command_line(args, args.argv)))  # fmt: skip
    return 0


def _compare_suite(args) -> int:
    """``compare --workloads a,b,… | --suite``: a comparison per workload/data pair, then the cross-workload
    report (:mod:`sweeps.commands.suite`); every conflicting flag is refused before anything runs."""
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
    tuning = _tuning(args)
    run_suite(base, pairs, args.optimizers or presets.COMPARE_OPTIMIZERS, args.seeds, out, budget_given=budget_given,
              batch_given=batch_given, tuning=tuning, progress=False if args.no_progress else None,
              command=shlex.join(_command_line(args, args.argv)))  # fmt: skip
    return 0


def _tuning(args):
    """compare's tuning (:class:`~sweeps.commands.compare.Tuning`) of ``--tune N``, or None without it; the back
    end flags (:func:`sweeps.commands.flags.add_backend_flags`) and ``--tune-seed`` without ``--tune`` are refused
    (``--tune-seed`` defaults to None, so that one given, even as 0, is told apart from its absence)."""
    from sweeps.commands.compare import Tuning

    if args.tune is not None:
        seed = {} if args.tune_seed is None else {"seed": args.tune_seed}  # None: Tuning's default seed
        return Tuning(args.tune, backend=args.backend, storage=args.storage, address=args.address, **seed)
    if args.tune_seed is not None:
        raise ValueError(
            f"--tune-seed {args.tune_seed} is the training seed of the tuning trials, and nothing is tuned without "
            "--tune N: pass --tune N too, or drop --tune-seed"
        )
    if args.storage or args.address or args.backend != "optuna":
        raise ValueError("--backend, --storage and --address are for the tuning studies: pass --tune N too")
    return None


def _given(argv: list[str], flag: str) -> bool:
    """Whether ``flag`` is on the command line (as ``FLAG VALUE`` or ``FLAG=VALUE``), not just its default."""
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def cmd_sweep(args) -> int:
    from sweeps.search.search_space import load_space

    _check_backend_flags(args)
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


def _check_backend_flags(args) -> None:
    """Refuse a flag of `sweep` that belongs to the other back end: ``--storage`` is Optuna's, ``--address`` and
    ``--workers-per-trial`` Ray's (Ray's resource flags have defaults, so they are not told apart from absent)."""
    if args.backend == "ray" and args.storage:
        raise ValueError("--storage is an Optuna storage; --backend ray keeps its state under --out (drop --storage)")
    if args.backend == "optuna" and args.address:
        raise ValueError("--address is a Ray cluster's; with --backend optuna share a --storage URL between workers")
    if args.backend == "optuna" and args.workers_per_trial != 1:
        raise ValueError(
            "--workers-per-trial runs each trial on Ray Train workers: use it with --backend ray (an Optuna trial "
            "trains in one process)"
        )


def _hypergrad_modes(optimizer: str, modes: list[str]) -> list[str]:
    """The ``--hypergrad`` modes ``optimizer`` is benchmarked with: LocoProp's only, one for the exact
    solve (its sensitivity is the closed form whatever the mode)."""
    if optimizer == "locoprop-s-exact":
        return modes[:1]
    return modes if optimizer.startswith("locoprop") else []


def _bench_hparams(names: list[str], given: list[tuple[str, object]], compile_: bool) -> dict[str, dict]:
    """Per benchmarked optimizer, the ``--hparam NAME=VALUE`` settings it takes (and ``--compile`` for LocoProp's);
    a name none of them takes, or one given twice with two values, is refused naming it."""
    settings: dict[str, object] = {}
    for key, value in given:
        if key in settings and settings[key] != value:
            raise ValueError(f"--hparam {key} is given twice ({settings[key]!r} and {value!r}); give it once")
        settings[key] = value
    takes = {name: {key for key in settings if key in OPTIMIZERS[name].defaults} for name in names}
    unused = sorted(key for key in settings if not any(key in keys for keys in takes.values()))
    if unused:
        raise ValueError(
            f"--hparam {', '.join(unused)}: none of the benchmarked optimizers ({', '.join(names)}) takes "
            f"{'it' if len(unused) == 1 else 'them'}; see their registry defaults (baselines/registry.py)"
        )
    return {
        name: {**{key: settings[key] for key in sorted(takes[name])},
               **({"compile": True} if compile_ and name.startswith("locoprop") else {})}
        for name in names
    }  # fmt: skip


def cmd_bench(args) -> int:
    from sweeps.commands.bench import BenchConfig, bench

    # A value given twice is refused by the flag's parser (flags._once): one row per configuration.
    names, modes = args.optimizers, args.hypergrad
    batch_sizes = args.batch_size or [WORKLOADS[args.workload].default_batch_size]
    widths = args.width_mult
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    shared = dict(workload=args.workload, data=args.data, depth_mult=args.depth_mult, local_iters=args.local_iters,
                  steps=args.steps, warmup=args.warmup, device=device, parallel=args.parallel, nproc=args.nproc,
                  precision=args.precision, threads=args.threads)  # fmt: skip
    hparams = _bench_hparams(names, args.hparam or [], args.compile)
    configs = [
        BenchConfig(optimizer=name, batch_size=batch, width_mult=width, hypergrad=mode, hparams=hparams[name], **shared)
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
          f"{'GFLOP/s':>8s} {'of peak':>8s} {'peak MiB':>9s}" + (f" {'sent MiB/step':>14s}" if args.nproc > 1 else "")
          + (f" {'hypergrad overhead':>19s}" if hypergrad else ""))  # fmt: skip
    for r in records:
        bound = f"{r['flop_bound_ratio']:.3f}" if r["flop_bound_ratio"] is not None else "–"
        achieved = f"{r['achieved_gflops']:.0f}" if r.get("achieved_gflops") is not None else "–"
        fraction = f"{r['peak_fraction']:.1%}" if r.get("peak_fraction") is not None else "–"
        sent = f" {r['comm_bytes_per_step'] / 2**20:14.2f}" if args.nproc > 1 else ""
        name = r["optimizer"] + (f" (hypergrad {r['hypergrad']})" if r.get("hypergrad") else "")
        overhead = r["hypergrad_overhead"]
        extra = (f" {overhead:19.1%}" if overhead is not None else f" {'–':>19s}") if hypergrad else ""
        print(f"{name:38s} {r['batch_size']:6d} {r['width_mult']:6g} {r['step_time_s']:10.4f} "
              f"{r['ratio_to_adam']:7.2f} {bound:>13s} {achieved:>8s} {fraction:>8s} "
              f"{r['peak_mem_bytes'] / 2**20:9.1f}{sent}{extra}")  # fmt: skip
    ranks = f", {args.nproc} processes (Adam under DDP)" if args.nproc > 1 else ""
    print(
        f"device: {records[0]['device']}, {records[0]['threads']} threads{ranks}, precision {args.precision}; "
        f"median of {args.steps} steps"
    )
    peaks = records[0].get("matmul_peak_gflops") or {}
    if peaks:
        print("matmul peak: " + ", ".join(f"{name} {gflops:.0f} GFLOP/s" for name, gflops in peaks.items())
              + "; 'of peak': the step's FLOPs (3 forwards, + 2K unit forwards for LocoProp) at the peak of their "
              "dtypes, over its time")  # fmt: skip
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


def locoprop_parser() -> argparse.ArgumentParser:
    """``locoprop`` and its commands, in the order its --help lists them: each command's flags from its
    builder in :mod:`sweeps.commands.flags`, and the handler that runs it."""
    parser = flags.top_parser()
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, handler in (
        (flags.add_train, cmd_train),
        (flags.add_compare, cmd_compare),
        (flags.add_sweep, cmd_sweep),
        (flags.add_bench, cmd_bench),
        (flags.add_report, cmd_report),
    ):
        add(commands).set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status of the module docstring."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = locoprop_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # for the commands that record or repeat their own command line
    if args.command is None:  # a usage error, as argparse's own (exit status 2), with the help to fix it
        parser.print_help(sys.stderr)
        return 2
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
        run_dir = getattr(args, "run_dir", None)
        if run_dir is None or not (pathlib.Path(run_dir) / run_directory.CHECKPOINT).is_file():
            # Before the first checkpoint (a time budget's calibration, the first steps): nothing to continue.
            return f"{by} before the run's first checkpoint; nothing was kept, and the same command starts it: {again}"
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
