"""Baseline optimizers and the registry that names every optimizer (SPEC §7).

``make_optimizer(name, model, loss=..., **hparams)`` builds any of
``optimizer_names()``; ``OPTIMIZERS[name]`` holds its defaults and the
hyperparameters a sweep searches.
"""

from baselines.combined import CombinedOptimizer
from baselines.kfac import KFAC
from baselines.registry import OPTIMIZERS, OptimizerSpec, make_optimizer, optimizer_names

__all__ = ["KFAC", "OPTIMIZERS", "CombinedOptimizer", "OptimizerSpec", "make_optimizer", "optimizer_names"]
