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
    "curves": dict(batch_size=250, time_budget=30.0),
    "resnet": dict(batch_size=128, time_budget=30.0),
    "transformer": dict(batch_size=16, time_budget=30.0),
}
COMPARE_OPTIMIZERS = ["locoprop-m", "locoprop-s", "adam", "rmsprop", "kfac"]

# (workload, optimizer) -> hyperparameters over the registry defaults, selected on validation loss by
#
#   locoprop compare --tune 8 --time-budget 30 --seeds 1,2 --out runs/tuned8
#
# (autoencoder on mnist5k, batch 250, 30 s of training per trial and run, tuning seed 0; 2-core CPU,
# 2026-11-30; 40 trials, 685 s of trial training, about 40 minutes in all; values rounded to 4 digits).
# Its output, per optimizer:
# trials finished/pruned/diverged, the selected configuration's validation loss at the budget, and the
# final runs (seeds 1, 2) at the budget, validation loss mean (95% CI), steps:
#   adam        4/4/0  73.10   72.68 (72.26 to 73.10)    1183 steps
#   locoprop-m  4/4/0  77.46   79.33 (77.77 to 80.90)     145 steps
#   rmsprop     4/4/0  83.11   83.09 (82.86 to 83.32)    1204 steps
#   locoprop-s  4/4/0  89.53   89.93 (75.16 to 104.7)     163 steps
#   kfac        5/3/0  110.27  109.5 (63.35 to 155.7)     142 steps
# (LocoProp-M and -S drew the same first points: their spaces are the same and trial k's draws are seeded
# by (tuning seed, k).)
PRESETS: dict[tuple[str, str], dict] = {
    ("autoencoder", "adam"): {"lr": 9.085e-4, "beta1": 0.6221, "beta2": 0.9954, "eps": 1.229e-5},
    ("autoencoder", "rmsprop"): {"lr": 4.044e-4, "alpha": 0.9863, "eps": 8.343e-8},
    ("autoencoder", "kfac"): {"fisher": "sampled", "lr": 0.9247, "damping": 2.161, "kl_clip": 0.01592},
    ("autoencoder", "locoprop-m"): {
        "lr": 8.311e-4,
        "activation_lr": 2.650,
        "local_iters": 10,
        "inner": "rmsprop-tf",
        "inner_momentum": 0.9559,
    },
    ("autoencoder", "locoprop-s"): {
        "lr": 2.739e-5,
        "activation_lr": 33.50,
        "local_iters": 10,
        "inner": "rmsprop-tf",
        "inner_momentum": 0.9988,
    },
}
PROVENANCE = (
    "selected on validation loss by `locoprop compare --tune 8 --time-budget 30 --seeds 1,2` (2026-11-30; "
    "autoencoder on mnist5k, batch 250, 30 s per run); optimizers without a preset use the registry defaults"
)


def preset(workload: str, optimizer: str) -> dict:
    """The tuned hyperparameters, or {} (registry defaults) where none were tuned."""
    return dict(PRESETS.get((workload, optimizer), {}))
