"""``locoprop compare``: the main job.

Runs LocoProp-M, LocoProp-S and the baselines with tuned presets
(``sweeps.commands.presets``) over a few seeds, each as an ordinary run directory
under ``--out`` (named after its config by ``sweeps.commands.cli.run_name``), then
writes the report of ``analysis`` (tables and plots) to ``--out``/report
and prints its results table. Finished runs are reused (the same command
names the same directories), so an interrupted comparison continues where
it stopped.
"""

from __future__ import annotations

import pathlib

from analysis.report import write_report
from sweeps.commands import presets
from sweeps.runner.train import loss_text, train

__all__ = ["compare"]


def compare(args) -> int:
    from sweeps.commands.cli import run_config_from_args, run_name

    defaults = presets.COMPARE_DEFAULTS.get(args.workload, dict(batch_size=250, epochs=10))
    args.epochs = args.epochs or defaults["epochs"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    optimizers = args.optimizers or presets.COMPARE_OPTIMIZERS
    out = pathlib.Path(args.out)
    jobs = [(optimizer, seed) for optimizer in optimizers for seed in args.seeds]
    print(
        f"compare: {', '.join(optimizers)} on {args.workload}/{args.data}, {args.epochs} epochs, "
        f"batch {args.batch_size}, seeds {', '.join(map(str, args.seeds))} -> {out}",
        flush=True,
    )
    run_dirs = []
    for index, (optimizer, seed) in enumerate(jobs, 1):
        config = run_config_from_args(args, optimizer, presets.preset(args.workload, optimizer), seed, out)
        config.out = str(out / run_name(config))
        result = train(config, resume=True, progress=False if args.no_progress else None)
        run_dirs.append(result.run_dir)
        s = result.summary
        print(
            f"[{index}/{len(jobs)}] {optimizer} seed {seed}: {s['status']}, train loss "
            f"{loss_text(s['final_train_loss'])}, test loss {loss_text(s['final_test_loss'])}, "
            f"{s['train_seconds']:.1f} s",
            flush=True,
        )
    report = write_report(run_dirs, out / "report")
    print()
    print((report.parent / "results.md").read_text())
    print(f"report with tables and plots: {report}")
    return 0
