"""Tuned hyperparameter presets for ``locoprop compare`` without ``--tune``.

What a sweep searches is defined only by the search spaces
(``sweeps/search/spaces``); these are the configurations that
``locoprop compare --tune`` selected, recorded with its command and output.
"""

from __future__ import annotations

# Compare defaults per workload: batch size and the training-time budget of
# every run, which finish the whole comparison (5 optimizers × 3 seeds) in
# about ten minutes on 2 cores.
COMPARE_DEFAULTS = {
    "autoencoder": dict(batch_size=250, time_budget=30.0),
    "mlp": dict(batch_size=250, time_budget=30.0),
    "cnn": dict(batch_size=250, time_budget=30.0),
}
COMPARE_OPTIMIZERS = ["locoprop-m", "locoprop-s", "adam", "rmsprop", "kfac"]

# (workload, optimizer) -> hyperparameters over the registry defaults, from
# a grid search of 2026-11-24 (10 epochs, batch 250, seed 0, final training loss):
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


PROVENANCE = (
    "a grid search of 2026-11-24 on training loss at 10 epochs (not yet the validation protocol); "
    "optimizers without a preset use the registry defaults"
)


def preset(workload: str, optimizer: str) -> dict:
    """The tuned hyperparameters, or {} (registry defaults) where none were tuned."""
    return dict(PRESETS.get((workload, optimizer), {}))
