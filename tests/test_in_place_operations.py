"""What the hooks record is what the step solves when an operation after a
unit works in place: an in-place activation, an input or an output changed
in place (refused where the step cannot be the one the forward pass defines).

With one local SGD iteration, a LocoProp step is the backprop SGD step at
lr·γ (SPEC §2); the expected parameters come from autograd on a copy of the
model, never from locoprop.
"""

import copy

import pytest
import torch
from helpers import (
    CLOSE,
    ETA,
    GAMMA,
    PARALLEL_PATHS,
    assert_same_params,
    backprop_sgd_step,
    classification_loss,
    locoprop_trained,
    one_locoprop_sgd_step,
    snapshot,
)
from torch import nn

from locoprop import LocoPropOptimizer


def _conv_net(inplace):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    ).double()


def _mlp(activation):
    return nn.Sequential(nn.Linear(6, 8), activation, nn.Linear(8, 8), copy.deepcopy(activation), nn.Linear(8, 4))


@pytest.mark.parametrize("parallel", PARALLEL_PATHS)
@pytest.mark.parametrize("variant", ["M", "S"])
def test_in_place_relu_after_a_conv_gives_the_backprop_step(variant, parallel):
    """The issue's network: the recorded pre-activation shares memory with
    the output that ReLU(inplace=True) overwrites."""
    model = _conv_net(inplace=True)
    loss_fn = classification_loss(torch.randn(10, 2, 8, 8, dtype=torch.float64), torch.randint(0, 5, (10,)))
    expected = backprop_sgd_step(model, loss_fn, ETA * GAMMA)
    one_locoprop_sgd_step(model, loss_fn, variant=variant, output_activation="softmax", parallel=parallel)
    assert_same_params(model, expected, **CLOSE)


@pytest.mark.parametrize("parallel", PARALLEL_PATHS)
@pytest.mark.parametrize(
    "variant, activation", [("M", nn.LeakyReLU(0.1, inplace=True)), ("S", nn.ReLU(inplace=True))], ids=["M", "S"]
)
def test_in_place_activation_between_linear_units_gives_the_backprop_step(variant, activation, parallel):
    model = _mlp(activation).double()
    loss_fn = classification_loss(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,)))
    expected = backprop_sgd_step(model, loss_fn, ETA * GAMMA)
    one_locoprop_sgd_step(model, loss_fn, variant=variant, output_activation="softmax", parallel=parallel)
    assert_same_params(model, expected, **CLOSE)


@pytest.mark.parametrize("parallel", PARALLEL_PATHS)
@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize(
    "make", [_conv_net, lambda inplace: _mlp(nn.LeakyReLU(0.1, inplace=inplace)).double()], ids=["conv", "mlp"]
)
def test_in_place_activations_train_as_the_out_of_place_ones(make, variant, parallel):
    """Several local iterations read the targets (the first one does not)."""
    out_of_place = make(inplace=False)
    in_place = make(inplace=True)
    in_place.load_state_dict(out_of_place.state_dict())
    inputs = torch.randn(10, 2, 8, 8) if isinstance(out_of_place[0], nn.Conv2d) else torch.randn(10, 6)
    loss_fn = classification_loss(inputs.double(), torch.randint(0, 4, (10,)))
    kwargs = dict(variant=variant, output_activation="softmax", parallel=parallel, local_iters=3, inner="adam")
    expected = locoprop_trained(out_of_place, loss_fn, **kwargs)
    actual = locoprop_trained(in_place, loss_fn, **kwargs)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **CLOSE, msg=name)


def test_an_input_changed_in_place_before_the_step_is_refused():
    model = _mlp(nn.Tanh())
    opt = LocoPropOptimizer(model, lr=1e-2)
    x = torch.randn(5, 6)
    model(x).sum().backward()
    x.mul_(2.0)  # the first unit's input, after autograd stopped watching it
    before, inner_state = snapshot(model), str(opt.inner.state_dict())
    with pytest.raises(RuntimeError, match=r"The input of unit '0' was modified in place after its forward pass"):
        opt.step()
    assert_same_params(model, before)
    assert str(opt.inner.state_dict()) == inner_state


def test_after_a_refused_step_zero_grad_drops_the_refused_batch():
    model = _mlp(nn.Tanh()).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    opt = LocoPropOptimizer(model, lr=ETA, activation_lr=GAMMA, local_iters=1, inner="sgd")
    model(x).sum().backward()
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.step()
    expected = backprop_sgd_step(model, lambda m: m(x).sum(), ETA * GAMMA)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    assert_same_params(model, expected, **CLOSE)


def test_an_overwritten_output_whose_parameters_changed_is_refused():
    """Its pre-activation could only be recomputed with the old parameters."""
    model = _mlp(nn.ReLU(inplace=True))
    opt = LocoPropOptimizer(model, lr=1e-2, variant="S")
    model(torch.randn(5, 6)).sum().backward()
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"output of unit '0' was modified in place .* parameters changed"):
        opt.step()
    assert_same_params(model, before)
