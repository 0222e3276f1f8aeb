"""What a step leaves behind: nothing of the batch outlives it."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_params, backprop_sgd_step
from torch import nn

from locoprop import LocoPropOptimizer
from locoprop.local_gradients import LocalGradients
from locoprop.recording import UseRecord


def _model():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("variant", ["M", "S"])
def test_records_are_released_although_the_caller_keeps_the_loss(variant):
    """Users keep ``loss`` (and so its graph, with the recording hooks) until
    their next iteration; x, a and g of every unit must not live that long."""
    model = _model()
    opt = LocoPropOptimizer(model, variant=variant, output_activation="softmax")
    loss = F.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,)))
    loss.backward()
    records = [weakref.ref(r) for unit in opt.units for r in unit.records]
    assert records and all(r() is not None for r in records)
    opt.step()
    assert loss.grad_fn is not None  # the graph is still referenced here
    assert all(r() is None for r in records)


@pytest.mark.parametrize("parallel", ["batched", "none"])
def test_a_step_leaves_no_plan_for_the_garbage_collector(parallel):
    """A reference cycle through the plan would keep a step's buffers alive
    until the collector ran, into the next step's peak memory."""
    model = _model()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax", parallel=parallel)
    gc.collect()
    gc.disable()
    try:
        F.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
        opt.step()
        left = [o for o in gc.get_objects() if type(o) is LocalGradients]
    finally:
        gc.enable()
    assert left == []


def _live_records() -> int:
    gc.collect()
    return sum(type(o) is UseRecord for o in gc.get_objects())


def test_forwards_that_are_never_backpropagated_hold_nothing():
    """Evaluation without torch.no_grad(): a forward's records go with its
    graph, as plain PyTorch's saved tensors do, not at the next step."""
    model = _model()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    baseline = _live_records()
    for _ in range(20):
        F.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).item()
    assert _live_records() == baseline
    kept = model(torch.randn(16, 6))  # a backward pass may still come: its records stay
    assert _live_records() == baseline + len(opt.units)
    del kept
    assert _live_records() == baseline


def test_a_kept_forward_backpropagated_after_others_is_the_one_solved():
    model = _model().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    expected = backprop_sgd_step(model, lambda m: F.cross_entropy(m(x), y), 0.1)
    opt = LocoPropOptimizer(model, lr=0.1, activation_lr=1.0, local_iters=1, inner="sgd", output_activation="softmax")
    loss = F.cross_entropy(model(x), y)
    for _ in range(3):
        model(torch.randn(4, 6, dtype=torch.float64)).sum().item()
    loss.backward()
    opt.step()
    assert_same_params(model, expected, rtol=1e-10, atol=1e-12)
