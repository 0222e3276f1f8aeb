"""``locoprop compare``: the main job.

Runs LocoProp-M, LocoProp-S and the baselines with tuned presets
(``sweeps.presets``) over a few seeds, each as an ordinary run directory
under ``--out``, then prints a results table and writes it as
``results.csv`` and ``results.md``. Finished runs are reused, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import math
import pathlib
import statistics

from sweeps import presets
from sweeps.train import train

__all__ = ["compare", "results_table"]

COLUMNS = [
    ("optimizer", "optimizer"),
    ("runs", "runs"),
    ("diverged", "diverged"),
    ("final_train_loss", "final train loss"),
    ("final_test_loss", "final test loss"),
    ("train_seconds", "train seconds"),
    ("median_step_time_s", "step time (s)"),
    ("step_ratio_to_adam", "step / Adam step"),
]


def compare(args) -> int:
    from sweeps.cli import run_config_from_args, run_name

    defaults = presets.COMPARE_DEFAULTS.get(args.workload, dict(batch_size=250, epochs=10))
    args.epochs = args.epochs or defaults["epochs"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    optimizers = args.optimizers or presets.COMPARE_OPTIMIZERS
    out = pathlib.Path(args.out)
    total = len(optimizers) * len(args.seeds)
    print(
        f"compare: {', '.join(optimizers)} on {args.workload}/{args.data}, {args.epochs} epochs, "
        f"batch {args.batch_size}, seeds {', '.join(map(str, args.seeds))} -> {out}",
        flush=True,
    )
    summaries = []
    for index, (optimizer, seed) in enumerate(((o, s) for o in optimizers for s in args.seeds), 1):
        hparams = presets.preset(args.workload, optimizer)
        run_dir = out / run_name(optimizer, args.workload, args.data, seed)
        config = run_config_from_args(args, optimizer, hparams, seed, run_dir)
        result = train(config, resume=True, progress=False if args.no_progress else None)
        s = result.summary
        summaries.append(s)
        print(
            f"[{index}/{total}] {optimizer} seed {seed}: {s['status']}, train loss {s['final_train_loss']:.4f}, "
            f"test loss {s['final_test_loss']:.4f}, {s['train_seconds']:.1f} s",
            flush=True,
        )
    rows = results_table(summaries)
    markdown = _markdown(rows)
    print()
    print(markdown)
    _write_csv(out / "results.csv", rows)
    (out / "results.md").write_text(markdown + "\n")
    print(f"\nresults: {out / 'results.md'}, {out / 'results.csv'}; run directories in {out}")
    return 0


def results_table(summaries: list[dict]) -> list[dict]:
    """One row per optimizer: mean ± std over seeds of the finished runs."""
    by_optimizer: dict[str, list[dict]] = {}
    for s in summaries:
        by_optimizer.setdefault(s["optimizer"], []).append(s)
    adam_step = _median([s["median_step_time_s"] for s in by_optimizer.get("adam", [])])
    rows = []
    for optimizer, runs in by_optimizer.items():
        ok = [s for s in runs if s["status"] == "ok"]
        step = _median([s["median_step_time_s"] for s in runs])
        rows.append(
            {
                "optimizer": optimizer,
                "runs": len(runs),
                "diverged": sum(s["status"] == "diverged" for s in runs),
                "final_train_loss": _mean_std([s["final_train_loss"] for s in ok]),
                "final_test_loss": _mean_std([s["final_test_loss"] for s in ok]),
                "train_seconds": _mean_std([s["train_seconds"] for s in runs]),
                "median_step_time_s": step,
                "step_ratio_to_adam": step / adam_step if step and adam_step else None,
            }
        )
    return rows


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mean_std(values) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, tuple):
        return f"{value[0]:.4g} ± {value[1]:.2g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _markdown(rows: list[dict]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    import csv

    fields = []
    for key, _ in COLUMNS:
        fields += (
            [f"{key}_mean", f"{key}_std"] if key in ("final_train_loss", "final_test_loss", "train_seconds") else [key]
        )
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            flat = {}
            for key, value in row.items():
                if isinstance(value, tuple):
                    flat[f"{key}_mean"], flat[f"{key}_std"] = value
                elif value is None and f"{key}_mean" in fields:
                    flat[f"{key}_mean"] = flat[f"{key}_std"] = ""
                else:
                    flat[key] = "" if value is None else value
            writer.writerow(flat)
