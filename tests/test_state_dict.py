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
        # refreshed at steps 0 and 4, saved at age 3: a reload that lost the age would refresh at step 3
        dict(variant="S", solve="exact", prox=0.5, covariance_refresh=4),
        dict(variant="S", solve="exact", prox=0.5, covariance_refresh=2, covariance_decay=0.7),
    ],
    ids=["M-rmsprop-tf", "S-adam", "S-exact", "S-exact-refresh-4", "S-exact-refresh-2-decay"],
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


def test_the_amortised_exact_state_survives_the_state_dict():
    model = _model()
    opt = LocoPropOptimizer(model, variant="S", solve="exact", prox=0.5, covariance_refresh=3, covariance_decay=0.5)
    train_steps(model, opt, [torch.rand(16, 10) for _ in range(2)], _bce)
    fresh = LocoPropOptimizer(copy.deepcopy(model), variant="S", solve="exact", prox=0.5)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["covariance_refresh"] == 3 and fresh.param_groups[0]["covariance_decay"] == 0.5
    kept = fresh.state_dict()["state"][0]
    assert set(kept) == {"covariance_inverse", "covariance_age", "covariance_prox", "covariance"}
    assert kept["covariance_age"] == 2 and kept["covariance_inverse"].shape == (11, 11)
    torch.testing.assert_close(kept["covariance_inverse"], opt.state[model[0].weight]["covariance_inverse"])
