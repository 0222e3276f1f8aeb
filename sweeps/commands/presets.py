"""Tuned hyperparameter presets for ``locoprop compare``.

Where they come from: a grid search over the values in :data:`GRID`, one
seed (0), the compare defaults of the workload, the "official" schedule
with half the epochs; the preset is the point with the lowest final
training loss (the autoencoder benchmark reports training loss). Re-run it
with::

    python -m sweeps.commands.presets --workload autoencoder --data mnist5k --out runs/presets

which prints every grid point and the winners. The numbers in
:data:`PRESETS` were measured that way on a 2-core CPU (2026-11-24).
"""

from __future__ import annotations

import argparse
import itertools
import math
import pathlib

# Compare defaults per workload: batch size and epochs that finish the
# whole comparison (5 optimizers × 2 seeds) in about ten minutes on 2 cores.
COMPARE_DEFAULTS = {
    "autoencoder": dict(batch_size=250, epochs=20),
    "mlp": dict(batch_size=250, epochs=20),
    "cnn": dict(batch_size=250, epochs=10),
}
COMPARE_OPTIMIZERS = ["locoprop-m", "locoprop-s", "adam", "rmsprop", "kfac"]

GRID = {
    "adam": dict(lr=[1e-4, 3e-4, 1e-3, 3e-3]),
    "rmsprop": dict(lr=[1e-4, 3e-4, 1e-3, 3e-3]),
    "kfac": dict(lr=[0.03, 0.1, 0.3], damping=[1e-3, 1e-2, 1e-1]),
    "locoprop-m": dict(lr=[3e-6, 1e-5, 3e-5, 1e-4], inner_momentum=[0.9, 0.999]),
    "locoprop-s": dict(lr=[3e-6, 1e-5, 3e-5, 1e-4], inner_momentum=[0.9, 0.999]),
}

# (workload, optimizer) -> hyperparameters over the registry defaults, from
# `python -m sweeps.commands.presets` (10 epochs, batch 250, seed 0, final training loss):
#   adam        lr 1e-4: 208.3, 3e-4: 193.1, 1e-3: 190.2, 3e-3: 191.0
#   rmsprop     lr 1e-4: 192.4, 3e-4: 146.2, 1e-3: 199.3, 3e-3: 206.5
#   kfac        lr {0.03, 0.1, 0.3} × damping {1e-3: ~330, 1e-2: ~219, 1e-1: ~239}; lr barely matters
#               because KL clipping (1e-3) bounds the step; best lr 0.3, damping 1e-2: 218.4
#   locoprop-m  lr 3e-6/1e-5/3e-5/1e-4 with inner momentum 0.9: 155.4/116.3/101.7/81.9,
#               with 0.999 (official): 83.0/69.8/71.8/109.2; best lr 1e-5, 0.999 (the official setup)
#   locoprop-s  with 0.9: 215.0/198.7/167.7/191.8, with 0.999: 96.6/87.1/92.7/74.5; best lr 1e-4, 0.999
#               (the edge of the grid: a wider one may find more)
PRESETS: dict[tuple[str, str], dict] = {
    ("autoencoder", "adam"): {"lr": 1e-3},
    ("autoencoder", "rmsprop"): {"lr": 3e-4},
    ("autoencoder", "kfac"): {"lr": 0.3, "damping": 1e-2},
    ("autoencoder", "locoprop-m"): {"lr": 1e-5, "inner_momentum": 0.999},
    ("autoencoder", "locoprop-s"): {"lr": 1e-4, "inner_momentum": 0.999},
}


def preset(workload: str, optimizer: str) -> dict:
    """The tuned hyperparameters, or {} (registry defaults) where none were tuned."""
    return dict(PRESETS.get((workload, optimizer), {}))


def _grid_points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def main(argv: list[str] | None = None) -> None:
    from sweeps.runner import RunConfig, train

    parser = argparse.ArgumentParser(description="Grid-search the compare presets.")
    parser.add_argument("--workload", default="autoencoder")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--optimizers", default=",".join(GRID))
    parser.add_argument("--out", default="runs/presets")
    args = parser.parse_args(argv)
    defaults = COMPARE_DEFAULTS[args.workload]
    for optimizer in args.optimizers.split(","):
        results = []
        for point in _grid_points(GRID[optimizer]):
            name = "-".join(f"{k}{v}" for k, v in point.items())
            config = RunConfig(
                workload=args.workload,
                data=args.data,
                optimizer=optimizer,
                hparams=point,
                epochs=max(defaults["epochs"] // 2, 1),
                batch_size=defaults["batch_size"],
                seed=0,
                out=str(pathlib.Path(args.out) / args.workload / optimizer / name),
            )
            result = train(config, resume=True, progress=False)
            loss = result.summary["final_train_loss"]
            loss = loss if result.status == "ok" and loss is not None and math.isfinite(loss) else math.inf
            results.append((loss, point))
            print(f"{optimizer:12s} {point}  final train loss {loss:.4f}  ({result.status})", flush=True)
        best = min(results, key=lambda r: r[0])
        print(f"BEST {args.workload} {optimizer}: {best[1]}  ({best[0]:.4f})", flush=True)


if __name__ == "__main__":
    main()
