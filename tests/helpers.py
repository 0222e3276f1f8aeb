"""Helpers the tests import (``from helpers import …``); the fixtures are in conftest.py."""

import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locoprop import LocoPropOptimizer


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_params(model: nn.Module, expected: dict[str, torch.Tensor], **tolerances) -> None:
    actual = snapshot(model)
    assert actual.keys() == expected.keys()
    for name in actual:
        if tolerances:
            torch.testing.assert_close(actual[name], expected[name], **tolerances, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(actual[name], expected[name]), f"parameter {name} changed"


def backprop_sgd_step(model: nn.Module, loss_fn, lr: float) -> dict[str, torch.Tensor]:
    """Parameters after one plain SGD step on ``loss_fn(model)``, computed on a copy with autograd."""
    clone = copy.deepcopy(model)
    params = [p for p in clone.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(clone), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)
    return snapshot(clone)


def relative_errors(got, reference) -> list[float]:
    """‖g − r‖ / ‖r‖ of each pair of tensors (g in float64 against r)."""
    return [((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, reference)]


def bce_sum_mean(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with logits, summed over features and averaged over the batch (the official loss)."""
    return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()


def missing_system_dependency(reason: str) -> None:
    """Skip a test whose optional system data or service is missing, except in CI.

    The README's test command must pass on a fresh machine without the
    Debian packages; ``.ci/run`` installs them, so there (``CI`` set) a
    missing one is a failure, not a skip.
    """
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)")
    pytest.skip(f"{reason}; .ci/run installs it")


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches, loss_fn, scheduler=None) -> None:
    """The plain loop: per batch, ``zero_grad``, ``loss_fn(model, batch).backward()``, ``step`` (then the scheduler)."""
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_round_trip_continues(make_model, make_optimizer, batches, loss_fn, make_scheduler=None, saved_at=3):
    """The state_dict contract: train on ``batches[:saved_at]``, save model, optimizer
    (scheduler) and RNG state through bytes as a checkpoint file would, and
    continue; a fresh model and optimizer loaded with ``weights_only=True``
    continue bit-for-bit. Returns the reloaded optimizer."""
    model = make_model()
    opt = make_optimizer(model)
    scheduler = make_scheduler(opt) if make_scheduler else None
    train_steps(model, opt, batches[:saved_at], loss_fn, scheduler)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None,
            "rng": torch.get_rng_state(),  # a sampled Fisher draws labels
        },
        buffer,
    )
    train_steps(model, opt, batches[saved_at:], loss_fn, scheduler)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = make_model()
    fresh.load_state_dict(saved["model"])
    fresh_opt = make_optimizer(fresh)
    fresh_opt.load_state_dict(saved["optimizer"])
    fresh_scheduler = make_scheduler(fresh_opt) if make_scheduler else None
    if fresh_scheduler is not None:
        fresh_scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    train_steps(fresh, fresh_opt, batches[saved_at:], loss_fn, fresh_scheduler)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), f"{name} differs after the reload"
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), make_model().parameters())), "it trained"
    return fresh_opt


# ------------------------------------------------ LocoProp steps checked against backprop
# With one local SGD iteration at lr ETA and activation_lr GAMMA, a LocoProp step is the backprop SGD step at
# ETA·GAMMA (SPEC §2): the recording tests (in-place operations, shared weights, the output unit) compare them.
ETA, GAMMA = 0.05, 2.0
PARALLEL_PATHS = ["batched", "none"]  # the batched local solves and the reference path
CLOSE = dict(rtol=1e-10, atol=1e-12)  # float64 steps that agree up to rounding


def one_locoprop_sgd_step(model, loss_fn, **kwargs):
    """The LocoProp optimizer after one step on ``loss_fn(model)``: one local SGD iteration at ETA, GAMMA."""
    opt = LocoPropOptimizer(model, lr=ETA, activation_lr=GAMMA, local_iters=1, inner="sgd", **kwargs)
    loss_fn(model).backward()
    opt.step()
    return opt


def locoprop_trained(model, loss_fn, steps=2, **kwargs):
    """The parameters of ``model`` after ``steps`` LocoProp steps (lr ETA, activation_lr GAMMA) on ``loss_fn``."""
    opt = LocoPropOptimizer(model, lr=ETA, activation_lr=GAMMA, **kwargs)
    train_steps(model, opt, range(steps), lambda m, _: loss_fn(m))
    return snapshot(model)


def classification_loss(x, y):
    """The cross-entropy of a model on the batch (x, y), as a function of the model."""
    return lambda m: F.cross_entropy(m(x), y)


# How long a test waits for a subprocess (a CLI run, spawned ranks, a sweep worker) before calling it hung.
# Generous on purpose: it only has to tell a hang from a slow machine, and with one CPU-bound neighbour on
# two cores a step can be 15× slower (a bench subprocess that takes 40 s alone ran past 300 s under load).
HANG_GUARD_S = 1800


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``locoprop ARGV``, argparse's usage errors included."""
    from sweeps.commands.cli import main

    try:
        status = main(argv)
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err
