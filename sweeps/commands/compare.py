"""``locoprop compare``: the main job.

Runs LocoProp-M, LocoProp-S and the baselines with tuned presets
(:mod:`sweeps.commands.presets`) over a few seeds, each as an ordinary run
directory under ``out`` (named by :func:`sweeps.runner.config.run_dir_name`),
then writes the report of ``analysis`` (tables and plots) to ``out``/report
and prints its results table. Finished runs are reused (the same command
names the same directories), so an interrupted comparison continues where
it stopped.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

from analysis.report import write_report
from sweeps.commands import presets
from sweeps.runner.config import RunConfig, run_dir_name
from sweeps.runner.train import loss_text, train

__all__ = ["compare"]


def compare(
    base: RunConfig,
    optimizers: Sequence[str],
    seeds: Sequence[int],
    out: pathlib.Path,
    *,
    hparams_of: Callable[[str, str], dict] = presets.preset,
    progress: bool | None = None,
) -> pathlib.Path:
    """Train every optimizer over every seed, then write the report; returns report.md's path.

    Args:
        base: what every run shares (workload, data, epochs, batch size, …);
            its optimizer, hparams, seed and out are set per run.
        optimizers: registry names.
        seeds: training seeds, one run per optimizer and seed.
        out: folder of the run directories and of report/.
        hparams_of: (workload, optimizer) -> hyperparameters over the registry
            defaults (default: the compare presets).
        progress: progress bars (default: when stderr is a terminal).
    """
    out = pathlib.Path(out)
    jobs = [(optimizer, seed) for optimizer in optimizers for seed in seeds]
    print(
        f"compare: {', '.join(optimizers)} on {base.workload}/{base.data}, {base.epochs} epochs, "
        f"batch {base.batch_size}, seeds {', '.join(map(str, seeds))} -> {out}",
        flush=True,
    )
    run_dirs = []
    for index, (optimizer, seed) in enumerate(jobs, 1):
        config = dataclasses.replace(base, optimizer=optimizer, hparams=hparams_of(base.workload, optimizer), seed=seed)
        config.out = str(out / run_dir_name(config))
        result = train(config, resume=True, progress=progress)
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
    return report
