"""SPEC §2's SGD identity for every kind of map this harness learned to see as a unit: one local step with
K = 1, inner SGD and a constant schedule is the backprop SGD step θ − η·γ·∇L (from autograd on a copy), with
the map solved locally (its kind in describe(), not "unseen"), in variants M and S."""

import pytest
import torch
from helpers import assert_same_params, backprop_sgd_step
from test_cross_attention import _attention, _inputs
from test_experts import Experts, FixedCapacity, _batch
from test_written_out_maps import Twin
from torch import nn

from locoprop import LocoPropOptimizer

ETA, GAMMA = 0.05, 2.0


def _decoder():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
                          nn.Tanh()).double()  # fmt: skip
    x, target = torch.randn(3, 2, 8, 8, dtype=torch.float64), torch.rand(3, 6, 8, 8, dtype=torch.float64)
    return model, lambda m: (m(x) - target).square().sum(), "conv_transpose2d"


def _experts(kind, dtype):
    def build():
        torch.manual_seed(0)
        model = Experts(kind, dtype)
        x, experts, target = _batch(dtype)
        return model, lambda m: (m(x, experts) - target).square().sum() / 2, "matmul" if kind == "added" else None

    return build


def _stacked():
    torch.manual_seed(0)
    model = FixedCapacity(True)
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    return model, lambda m: torch.tanh(m(x)).square().sum(), "stacked_matmul"


def _cross_attention():
    model = _attention()
    query, key, value, target = _inputs(True)
    return model, lambda m: (m(query, key, value, need_weights=False)[0] - target).square().sum(), "linear"


def _written(written):
    def build():
        torch.manual_seed(0)
        model = Twin(written, bias=written != "left").double()
        x, target = torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 7, 3, dtype=torch.float64)
        return model, lambda m: (m(x) - target).square().sum(), "left_matmul" if written == "left" else "linear"

    return build


BUILDERS = {
    "conv-transpose": _decoder,
    "eager-experts": _experts("eager", torch.float64),
    "grouped-experts": _experts("grouped", torch.float32),
    "addmm-experts": _experts("addmm", torch.float64),
    "experts-bias-added": _experts("added", torch.float64),
    "bmm-experts": _stacked,
    "cross-attention": _cross_attention,
    "x@W.T+b": _written("transposed"),
    "W@x": _written("left"),
}


@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("name", BUILDERS)
def test_one_local_sgd_step_is_the_backprop_sgd_step(name, variant):
    model, loss_fn, kind = BUILDERS[name]()
    float32 = next(model.parameters()).dtype == torch.float32
    expected = backprop_sgd_step(model, loss_fn, ETA * GAMMA)
    opt = LocoPropOptimizer(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_iters=1, inner="sgd",
                            inner_schedule="constant")  # fmt: skip
    loss_fn(model).backward()
    opt.step()
    tolerance = dict(rtol=1e-5, atol=1e-6) if float32 else dict(rtol=1e-10, atol=1e-12)
    assert_same_params(model, expected, **tolerance)
    kinds = {row.kind for row in opt.describe().rows}
    assert "unseen" not in kinds and (kind is None or kind in kinds), kinds
    assert opt.describe().local_share == 1.0
