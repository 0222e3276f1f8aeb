"""Shared helpers for the tests."""

import copy
import os

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


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
