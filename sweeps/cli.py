"""The ``locoprop`` command line (SPEC §7)."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

import locoprop
from analysis.load import RunsNotFound
from baselines.registry import OPTIMIZERS
from sweeps.data import DATASETS, DataUnavailable
from sweeps.train import DEVICES, SCHEDULES, RunConfig, train
from sweeps.workloads import WORKLOADS

# Optimizer flags of `train`, and the registry hyperparameter each sets.
HPARAM_FLAGS = {
    "lr": float,
    "activation_lr": float,
    "local_iters": int,
    "inner": str,
    "inner_schedule": str,
    "prox": float,
    "momentum": float,
    "damping": float,
    "weight_decay": float,
}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), _parse_value(value)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(choices):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(bad)}; expected from {', '.join(choices)}")
        return names

    return parse


def add_run_flags(parser: argparse.ArgumentParser, epochs: int | None = 10, batch_size: int | None = 1000) -> None:
    """Flags shared by train, compare and sweep: what to train and how."""
    parser.add_argument("--workload", default="autoencoder", choices=list(WORKLOADS))
    parser.add_argument("--data", default="mnist5k", choices=list(DATASETS))
    parser.add_argument("--data-dir", default=None, help="directory of the IDX files for --data mnist")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--schedule", default="official", choices=SCHEDULES)
    parser.add_argument("--warmup-epochs", type=float, default=None, help="default: 5%% of the epochs")
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--depth-mult", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_config_from_args(args, optimizer: str, hparams: dict, seed: int, out: pathlib.Path) -> RunConfig:
    return RunConfig(
        workload=args.workload,
        data=args.data,
        optimizer=optimizer,
        hparams=hparams,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        width_mult=args.width_mult,
        depth_mult=args.depth_mult,
        device=args.device,
        data_dir=args.data_dir,
        out=str(out),
    )


def run_name(optimizer: str, workload: str, data: str, seed: int) -> str:
    return f"{optimizer}-{workload}-{data}-seed{seed}"


def cmd_train(args) -> int:
    hparams = {name: getattr(args, name) for name in HPARAM_FLAGS if getattr(args, name) is not None}
    hparams.update(dict(args.hparam or []))
    out = pathlib.Path(args.out) / run_name(args.optimizer, args.workload, args.data, args.seed)
    config = run_config_from_args(args, args.optimizer, hparams, args.seed, out)
    result = train(config, resume=args.resume, progress=False if args.no_progress else None)
    s = result.summary
    print(
        f"{s['status']}: {args.optimizer} on {args.workload}/{args.data}, {s['epochs_completed']} epochs, "
        f"train loss {s['final_train_loss']:.6g}, test loss {s['final_test_loss']:.6g}, "
        f"{s['train_seconds']:.1f} s training"
    )
    print(f"run directory: {result.run_dir}")
    return 0 if result.status in ("ok", "diverged") else 1


def cmd_compare(args) -> int:
    from sweeps.compare import compare

    return compare(args)


def cmd_sweep(args) -> int:
    from sweeps.spaces import load_space

    space = load_space(args.optimizer, args.space)
    out = pathlib.Path(args.out).resolve()
    base = run_config_from_args(args, args.optimizer, {}, args.seed, out)
    if args.data_dir:
        base.data_dir = str(pathlib.Path(args.data_dir).resolve())  # trials may run elsewhere
    progress = False if args.no_progress else None
    if args.backend == "optuna":
        from sweeps.optuna_backend import run_optuna_sweep

        table = run_optuna_sweep(
            base, space, study_name=args.study, out=out, trials=args.trials, storage=args.storage,
            metric=args.metric, pruner=args.pruner, sampler_seed=args.sampler_seed,
            heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period, progress=progress,
        )  # fmt: skip
    else:
        from sweeps.ray_backend import run_ray_sweep

        table = run_ray_sweep(
            base, space, study_name=args.study, out=out, trials=args.trials, address=args.address,
            metric=args.metric, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
            sampler_seed=args.sampler_seed, num_cpus=args.num_cpus,
        )  # fmt: skip
    print(f"results table: {table} (and .parquet); locoprop report {out} --out REPORT_DIR")
    return 0


def cmd_bench(args) -> int:
    from sweeps.bench import BenchConfig, bench

    names = list(dict.fromkeys(args.optimizers))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    records = []
    for batch in args.batch_size:
        for width in args.width_mult:
            shared = dict(workload=args.workload, batch_size=batch, width_mult=width, depth_mult=args.depth_mult,
                          local_iters=args.local_iters, steps=args.steps, warmup=args.warmup, device=device,
                          parallel=args.parallel, hparams={"compile": True} if args.compile else {})  # fmt: skip
            records += bench([BenchConfig(optimizer=name, **shared) for name in names])
    if args.json:
        for record in records:
            print(json.dumps(record))
        return 0
    print(f"{'optimizer':18s} {'batch':>6s} {'width':>6s} {'step (s)':>10s} {'/ Adam':>7s} {'/ FLOP bound':>13s} "
          f"{'peak MiB':>9s}")  # fmt: skip
    for r in records:
        bound = f"{r['flop_bound_ratio']:.3f}" if r["flop_bound_ratio"] is not None else "–"
        print(f"{r['optimizer']:18s} {r['batch_size']:6d} {r['width_mult']:6g} {r['step_time_s']:10.4f} "
              f"{r['ratio_to_adam']:7.2f} {bound:>13s} {r['peak_mem_bytes'] / 2**20:9.1f}")  # fmt: skip
    print(f"device: {records[0]['device']}, {records[0]['threads']} threads; median of {args.steps} steps")
    return 0


def cmd_report(args) -> int:
    from analysis.report import write_report

    report = write_report(args.inputs, args.out, target_loss=args.target_loss)
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locoprop",
        description="LocoProp research harness: train, compare, sweep, report and benchmark optimizers.",
    )
    parser.add_argument("--version", action="version", version=f"locoprop {locoprop.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser("train", help="train one run and write its run directory")
    add_run_flags(p)
    p.add_argument("--optimizer", default="locoprop-m", choices=list(OPTIMIZERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs", help="the run directory is created inside it")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    for name, kind in HPARAM_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)
    p.add_argument(
        "--hparam",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="any registry hyperparameter, e.g. --hparam inner_momentum=0.99 (repeatable)",
    )
    p.set_defaults(handler=cmd_train)

    p = commands.add_parser(
        "compare", help="the main job: LocoProp and baselines with tuned presets, then a results table"
    )
    add_run_flags(p, epochs=None, batch_size=None)
    p.add_argument("--optimizers", type=_name_list(list(OPTIMIZERS)), default=None)
    p.add_argument("--seeds", type=_int_list, default=[0, 1])
    p.add_argument("--out", default="runs/compare")
    p.set_defaults(handler=cmd_compare)

    p = commands.add_parser("sweep", help="a resumable hyperparameter sweep with Optuna or Ray Tune")
    add_run_flags(p)
    p.add_argument("--backend", default="optuna", choices=["optuna", "ray"])
    p.add_argument("--optimizer", required=True, choices=list(OPTIMIZERS))
    p.add_argument("--space", default=None, help="search-space YAML file (default: sweeps/spaces/OPTIMIZER.yaml)")
    p.add_argument("--trials", type=int, required=True, help="the study's total number of finished trials")
    p.add_argument("--study", required=True, help="study name; the same name continues the same study")
    p.add_argument("--out", required=True, help="folder for the trials' run directories and the results table")
    p.add_argument("--seed", type=int, default=0, help="training seed of every trial")
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--metric", default="train_loss", choices=["train_loss", "test_loss"])
    p.add_argument("--storage", default=None, help="Optuna storage: RDB URL or journal:PATH (default: SQLite in --out)")
    p.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    p.add_argument("--heartbeat-interval", type=int, default=60, help="seconds (RDB storages)")
    p.add_argument("--grace-period", type=int, default=120, help="seconds without heartbeat before a trial is stale")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.set_defaults(handler=cmd_sweep)

    p = commands.add_parser("bench", help="step time, ratio to Adam, FLOP-bound ratio and peak memory")
    p.add_argument("--workload", default="autoencoder", choices=list(WORKLOADS))
    p.add_argument("--batch-size", type=_int_list, default=[1000], help="one or more, comma-separated")
    p.add_argument("--width-mult", type=lambda t: [float(v) for v in t.split(",")], default=[1.0])
    p.add_argument("--depth-mult", type=int, default=1)
    p.add_argument(
        "--optimizers", type=_name_list(list(OPTIMIZERS)), default=["adam", "locoprop-m", "locoprop-s",
                                                                    "locoprop-s-exact"]
    )  # fmt: skip
    p.add_argument("--local-iters", type=int, default=10)
    p.add_argument("--parallel", default=None, choices=["auto", "batched", "streams", "none"])
    p.add_argument("--compile", action="store_true", help="LocoProp: fused (compiled) inner updates")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--json", action="store_true", help="one JSON object per optimizer")
    p.set_defaults(handler=cmd_bench)

    p = commands.add_parser("report", help="tables and plots from run directories and sweep tables")
    p.add_argument("inputs", nargs="+", metavar="RUNS_OR_TABLES", help="run directories, folders of them, tables")
    p.add_argument("--out", required=True, help="folder for report.md, tables and figures")
    p.add_argument("--target-loss", type=float, default=None, help="default: best first-order baseline's loss")
    p.set_defaults(handler=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except (DataUnavailable, RunsNotFound) as err:
        print(f"locoprop: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"locoprop: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
