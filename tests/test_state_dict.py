"""state_dict round trip: a reloaded optimizer continues bit-for-bit on CPU."""

import copy

import pytest
import torch
from helpers import assert_round_trip_continues, bce_sum_mean, train_steps
from torch import nn

from locoprop import LocoPropOptimizer


def _model():
    return nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3), nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 10))


def _bce(model, x):
    return bce_sum_mean(model(x), x)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variant="M", inner="rmsprop-tf", inner_kwargs={"momentum": 0.9}, output_activation="sigmoid"),
        dict(variant="S", inner="adam", prox=0.1),
        dict(variant="S", solve="exact", prox=0.5),
    ],
    ids=["M-rmsprop-tf", "S-adam", "S-exact"],
)
def test_reloaded_optimizer_and_scheduler_continue_identically(kwargs):
    reloaded = assert_round_trip_continues(
        _model,
        lambda model: LocoPropOptimizer(model, lr=1e-2, activation_lr=2.0, local_iters=3, **kwargs),
        [torch.rand(16, 10) for _ in range(6)],
        _bce,
        make_scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
    )
    assert reloaded.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**6)


def test_state_dict_holds_the_inner_state():
    model = _model()
    opt = LocoPropOptimizer(model, lr=1e-2, inner="rmsprop-tf")
    train_steps(model, opt, [torch.rand(4, 10)], _bce)
    state = opt.state_dict()
    inner = state["inner"]["state"]
    assert len(inner) == len(list(model.parameters()))
    assert set(inner[0]) == {"ms", "mom"}
    copy.deepcopy(state)  # plain data, no references to the model
