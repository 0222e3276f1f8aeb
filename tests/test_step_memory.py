"""What a step leaves behind: nothing of the batch outlives it."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locoprop import LocoPropOptimizer
from locoprop.solve import LocalGradients


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
