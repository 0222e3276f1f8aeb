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
# `locoprop compare --tune 8` (tuning seed 0, 8 trials per optimizer, 30 s of training per trial and run, final
# runs seeds 1, 2; 2-core CPU; values rounded to 4 digits). Each workload's block gives its command and, per
# optimizer, trials finished/pruned/diverged, the selected configuration's validation loss at the budget, and
# its final runs (seeds 1, 2): validation loss mean (95% CI), steps. A workload's presets apply on any data set
# (the autoencoder's on fashion-mnist too).
#
# autoencoder on mnist5k, batch 250 (2026-11-30; 40 trials, 685 s of trial training, about 40 minutes; LocoProp's
# K was not searched then: these are the K = 10 figures; K below is from the study after them):
#   locoprop compare --tune 8 --time-budget 30 --seeds 1,2 --out runs/tuned8
#   adam        4/4/0  73.10   72.68 (72.26 to 73.10)    1183 steps
#   locoprop-m  4/4/0  77.46   79.33 (77.77 to 80.90)     145 steps
#   rmsprop     4/4/0  83.11   83.09 (82.86 to 83.32)    1204 steps
#   locoprop-s  4/4/0  89.53   89.93 (75.16 to 104.7)     163 steps
#   kfac        5/3/0  110.27  109.5 (63.35 to 155.7)     142 steps
# LocoProp's K on the autoencoder (2026-12-05, issue 28: the same spaces with K searched and each trial priced at
# its own K; both selected the points above, M at K = 5, S at K = 3; Adam selected its preset again):
#   locoprop compare --precision fp32 --tune 8 --optimizers adam,locoprop-m,locoprop-s,locoprop-s-exact --seeds 1,2
#   adam        4/4/0  85.42   83.90 (78.81 to 88.99)     626 steps
#   locoprop-m  4/4/0  77.16   77.66 (71.30 to 84.02)     138 steps
#   locoprop-s  4/4/0  96.32   95.00 (94.96 to 95.05)     233 steps
#
# curves, resnet and transformer (2026-12-05, issue 26; about 45 minutes each, the three side by side; LocoProp's
# K, K-FAC's periods and γ up to 1000 searched, each trial priced at its own K and periods):
#   locoprop compare --workload W --tune 8 --seeds 1,2 --threads 1 --out OUT
# curves on curves, batch 250:
#   locoprop-m  6/2/0  89.60   97.38 (68.54 to 126.2)     364 steps
#   locoprop-s  5/3/0  98.94   111.0 (69.54 to 152.6)     248 steps
#   adam        4/4/0  94.05   95.68 (92.62 to 98.74)    1623 steps
#   rmsprop     4/4/0  103.3   105.2 (102.6 to 107.9)    1794 steps
#   kfac        5/3/0  106.8   106.5 (93.46 to 119.6)     584 steps
# resnet on fashion-mnist, batch 128:
#   locoprop-m  4/4/0  0.3794  0.3849 (0.3212 to 0.4485)  565 steps
#   locoprop-s  4/4/0  0.3680  0.3838 (0.3132 to 0.4544)  570 steps
#   adam        5/3/0  0.2716  0.2704 (0.2604 to 0.2803) 1296 steps
#   rmsprop     4/4/0  0.2753  0.2636 (0.2229 to 0.3042) 1315 steps
#   kfac        6/2/0  0.2759  0.2734 (0.2404 to 0.3063)  711 steps
# transformer on fortunes, batch 16:
#   locoprop-m  6/2/0  2.612   2.623 (2.478 to 2.769)     339 steps
#   locoprop-s  4/4/0  2.566   2.557 (2.541 to 2.572)     546 steps
#   adam        4/4/0  2.288   2.310 (2.135 to 2.485)     855 steps
#   rmsprop     6/2/0  2.556   2.553 (2.526 to 2.580)     875 steps
#   kfac        5/3/0  2.588   2.583 (2.566 to 2.599)     385 steps
# What they say about LocoProp's γ: about 7 (M) and 37 (S) on CURVES's summed BCE, near the autoencoder's 2.7 and
# 34, but about 500 on the two mean cross-entropy losses, 50 times the registry default of 10. (LocoProp-M and -S
# draw the same points: their spaces are the same and trial k's draws are seeded by (tuning seed, k); on the
# ResNet and the transformer both selected the same one.)
# LocoProp-M and -S selected the same draw (trial 3 of both studies) on the ResNet and on the transformer.
_MEAN_CROSS_ENTROPY_LOCOPROP = {
    "lr": 2.739e-5,
    "activation_lr": 516.3,
    "inner": "rmsprop-tf",
    "inner_momentum": 0.9988,
    "local_iters": 3,
}
PRESETS: dict[tuple[str, str], dict] = {
    ("autoencoder", "adam"): {"lr": 9.085e-4, "beta1": 0.6221, "beta2": 0.9954, "eps": 1.229e-5},
    ("autoencoder", "rmsprop"): {"lr": 4.044e-4, "alpha": 0.9863, "eps": 8.343e-8},
    ("autoencoder", "kfac"): {"fisher": "sampled", "lr": 0.9247, "damping": 2.161, "kl_clip": 0.01592},
    ("autoencoder", "locoprop-m"): {
        "lr": 8.311e-4,
        "activation_lr": 2.650,
        "local_iters": 5,
        "inner": "rmsprop-tf",
        "inner_momentum": 0.9559,
    },
    ("autoencoder", "locoprop-s"): {
        "lr": 2.739e-5,
        "activation_lr": 33.50,
        "local_iters": 3,
        "inner": "rmsprop-tf",
        "inner_momentum": 0.9988,
    },
    ("curves", "locoprop-m"): {
        "lr": 3.857e-5,
        "activation_lr": 6.983,
        "inner": "rmsprop-tf",
        "inner_momentum": 0.9973,
        "local_iters": 5,
    },
    ("curves", "locoprop-s"): {
        "lr": 4.044e-5,
        "activation_lr": 37.48,
        "inner": "rmsprop-tf",
        "inner_momentum": 0.9994,
        "local_iters": 10,
    },
    ("curves", "adam"): {"lr": 1.178e-3, "beta1": 0.8755, "beta2": 0.9977, "eps": 8.554e-7},
    ("curves", "rmsprop"): {"lr": 4.044e-4, "alpha": 0.9863, "eps": 8.343e-8},
    ("curves", "kfac"): {
        "fisher": "sampled",
        "lr": 0.0102,
        "damping": 0.03354,
        "kl_clip": 5.553e-4,
        "factor_update_freq": 10,
        "inv_update_freq": 30,
    },
    ("resnet", "locoprop-m"): _MEAN_CROSS_ENTROPY_LOCOPROP,
    ("resnet", "locoprop-s"): _MEAN_CROSS_ENTROPY_LOCOPROP,
    ("resnet", "adam"): {"lr": 8.84e-3, "beta1": 0.9358, "beta2": 0.91, "eps": 3.332e-8},
    ("resnet", "rmsprop"): {"lr": 8.311e-3, "alpha": 0.9947, "eps": 7.692e-4},
    ("resnet", "kfac"): {
        "fisher": "empirical",
        "lr": 0.02336,
        "damping": 8.554e-3,
        "kl_clip": 0.01436,
        "factor_update_freq": 10,
        "inv_update_freq": 1,
    },
    ("transformer", "locoprop-m"): _MEAN_CROSS_ENTROPY_LOCOPROP,
    ("transformer", "locoprop-s"): _MEAN_CROSS_ENTROPY_LOCOPROP,
    ("transformer", "adam"): {"lr": 1.178e-3, "beta1": 0.8755, "beta2": 0.9977, "eps": 8.554e-7},
    ("transformer", "rmsprop"): {"lr": 3.857e-4, "alpha": 0.9951, "eps": 2.255e-6},
    ("transformer", "kfac"): {
        "fisher": "sampled",
        "lr": 0.9247,
        "damping": 2.161,
        "kl_clip": 0.01592,
        "factor_update_freq": 10,
        "inv_update_freq": 1,
    },
}
# The command that selected each workload's presets.
TUNED_BY = {
    "autoencoder": "`locoprop compare --tune 8 --time-budget 30 --seeds 1,2` (2026-11-30; autoencoder on mnist5k, "
    "batch 250, 30 s per run), LocoProp's K by `locoprop compare --precision fp32 --tune 8 --optimizers "
    "adam,locoprop-m,locoprop-s,locoprop-s-exact --seeds 1,2` (2026-12-05)",
    **{
        workload: f"`locoprop compare --workload {workload} --tune 8 --seeds 1,2 --threads 1` (2026-12-05; batch "
        f"{COMPARE_DEFAULTS[workload]['batch_size']}, 30 s per run)"
        for workload in ("curves", "resnet", "transformer")
    },
}


def provenance(workload: str) -> str:
    """Where ``workload``'s presets come from (protocol.json and the report say it)."""
    if workload not in TUNED_BY:
        return f"none tuned for the {workload} workload: every optimizer uses the registry defaults"
    return f"selected on validation loss by {TUNED_BY[workload]}; optimizers without a preset use the registry defaults"


def preset(workload: str, optimizer: str) -> dict:
    """The tuned hyperparameters, or {} (registry defaults) where none were tuned."""
    return dict(PRESETS.get((workload, optimizer), {}))
