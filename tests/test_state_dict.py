"""state_dict round trip: a reloaded optimizer continues bit-for-bit on CPU."""

import copy
import io

import pytest
import torch
from conftest import bce_sum_mean, snapshot
from torch import nn

from locoprop import LocoPropOptimizer


def _model():
    return nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3), nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 10))


def _train(model, opt, batches, scheduler=None):
    for x in batches:
        opt.zero_grad()
        bce_sum_mean(model(x), x).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variant="M", inner="rmsprop-tf", inner_kwargs={"momentum": 0.9}, output_activation="sigmoid"),
        dict(variant="S", inner="adam", prox=0.1),
        dict(variant="S", solve="exact", prox=0.5),
    ],
    ids=["M-rmsprop-tf", "S-adam", "S-exact"],
)
def test_reloaded_optimizer_continues_identically(kwargs):
    batches = [torch.rand(16, 10) for _ in range(6)]
    model = _model()
    opt = LocoPropOptimizer(model, lr=1e-2, activation_lr=2.0, local_iters=3, **kwargs)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    _train(model, opt, batches[:3], scheduler)

    # Save through bytes, as a checkpoint on disk would.
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
    _train(model, opt, batches[3:], scheduler)
    expected = snapshot(model)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = _model()
    fresh.load_state_dict(saved["model"])
    fresh_opt = LocoPropOptimizer(fresh, lr=1e-2, activation_lr=2.0, local_iters=3, **kwargs)
    fresh_opt.load_state_dict(saved["opt"])
    fresh_scheduler = torch.optim.lr_scheduler.ExponentialLR(fresh_opt, gamma=0.9)
    fresh_scheduler.load_state_dict(saved["sched"])
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**3)
    _train(fresh, fresh_opt, batches[3:], fresh_scheduler)

    got = snapshot(fresh)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_state_dict_holds_the_inner_state():
    model = _model()
    opt = LocoPropOptimizer(model, lr=1e-2, inner="rmsprop-tf")
    _train(model, opt, [torch.rand(4, 10)])
    state = opt.state_dict()
    inner = state["inner"]["state"]
    assert len(inner) == len(list(model.parameters()))
    assert set(inner[0]) == {"ms", "mom"}
    copy.deepcopy(state)  # plain data, no references to the model
