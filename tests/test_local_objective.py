"""The local objectives of SPEC §2, checked against autograd on the user's loss.

The key identity: at θ^old, ∇ℓ(θ) = γ·∇L(θ) for both variants and every
transfer function. The integrals F below are written out here, by hand,
independently of locoprop.transfer.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locoprop.layers import LinearAdapter
from locoprop.local import add_prox_grad_, local_grads, local_objective, make_target
from locoprop.transfer import transfer_by_name, transfer_from_module

GAMMA = 0.7

# name -> (activation module, f, F written independently; None: not elementary)
HIDDEN = {
    "identity": (nn.Identity(), lambda a: a, lambda a: 0.5 * a**2),
    "tanh": (nn.Tanh(), torch.tanh, lambda a: torch.log(torch.cosh(a))),
    "sigmoid": (nn.Sigmoid(), torch.sigmoid, lambda a: torch.log1p(torch.exp(a))),
    "relu": (nn.ReLU(), torch.relu, lambda a: 0.5 * torch.clamp(a, min=0) ** 2),
    "leaky_relu": (
        nn.LeakyReLU(0.1),
        lambda a: torch.where(a > 0, a, 0.1 * a),
        lambda a: torch.where(a > 0, 0.5 * a**2, 0.05 * a**2),
    ),
    "softplus": (nn.Softplus(), lambda a: torch.log1p(torch.exp(a)), None),
}


def _network(activation: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4), activation, nn.Linear(4, 3)).double()


def _user_loss(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Any smooth scalar loss: a mean over the batch, as users write them.
    return F.cross_entropy(output, y) + 0.1 * output.pow(2).mean()


def _backprop_grads(model, x, y, unit):
    """γ·∇L for the unit's (weight, bias), and g = dL/da, a, from autograd."""
    captured = {}
    handle = unit.register_forward_hook(lambda m, i, out: captured.update(a=out))
    loss = _user_loss(model(x), y)
    handle.remove()
    grad_w, grad_b, g = torch.autograd.grad(loss, [unit.weight, unit.bias, captured["a"]])
    return [GAMMA * grad_w, GAMMA * grad_b], captured["a"].detach(), g


def _independent_local_grad(variant, f, integral, unit, x, a, g):
    """∇ℓ(θ^old) with ℓ written out from SPEC §2."""
    weight = unit.weight.detach().clone().requires_grad_(True)
    bias = unit.bias.detach().clone().requires_grad_(True)
    a_theta = F.linear(x, weight, bias)
    if variant == "S":
        loss = 0.5 * (a_theta - (a - GAMMA * g)).pow(2).sum()
        return torch.autograd.grad(loss, [weight, bias])
    y_hat = f(a) - GAMMA * g
    if integral is not None:
        loss = integral(a_theta).sum() - (y_hat * a_theta).sum()
        return torch.autograd.grad(loss, [weight, bias])
    # F not elementary: its gradient in a is f(a) − ŷ by definition of F.
    return torch.autograd.grad(a_theta, [weight, bias], f(a_theta) - y_hat)


@pytest.mark.parametrize("variant", ["S", "M"])
@pytest.mark.parametrize("name", sorted(HIDDEN))
def test_hidden_unit_gradient_is_gamma_times_backprop(variant, name):
    activation, f, integral = HIDDEN[name]
    model = _network(activation)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    unit = model[0]
    expected, a, g = _backprop_grads(model, x, y, unit)

    # The identity itself, with ℓ written by hand.
    for got, want in zip(_independent_local_grad(variant, f, integral, unit, x, a, g), expected):
        torch.testing.assert_close(got, want)

    # locoprop's target and local gradient.
    transfer = transfer_from_module(activation)
    target = make_target(variant, transfer, a, g, GAMMA)
    params = [unit.weight, unit.bias]
    grads = local_grads(variant, transfer, LinearAdapter(unit).forward, params, [(x, target)])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)

    # locoprop's objective value, differentiated by autograd, where F is elementary.
    if variant == "S" or transfer.integral is not None:
        leaves = [p.detach().clone().requires_grad_(True) for p in params]
        value = local_objective(variant, transfer, LinearAdapter(unit).forward, leaves, [(x, target)])
        for got, want in zip(torch.autograd.grad(value, leaves), expected):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("variant", ["S", "M"])
def test_softmax_output_unit_gradient_is_gamma_times_backprop(variant):
    """Cross-entropy folds softmax into the loss; F = logsumexp per row."""
    model = _network(nn.Tanh())
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    unit = model[2]
    expected, a, g = _backprop_grads(model, x, y, unit)
    h = torch.tanh(model[0](x)).detach()

    def log_sum_exp_rows(a):
        return torch.log(torch.exp(a).sum(dim=1))

    def softmax_rows(a):
        return torch.exp(a) / torch.exp(a).sum(dim=1, keepdim=True)

    got = _independent_local_grad(variant, softmax_rows, log_sum_exp_rows, unit, h, a, g)
    for got_t, want in zip(got, expected):
        torch.testing.assert_close(got_t, want)

    transfer = transfer_by_name("softmax")
    target = make_target(variant, transfer, a, g, GAMMA)
    grads = local_grads(variant, transfer, LinearAdapter(unit).forward, [unit.weight, unit.bias], [(h, target)])
    for got_t, want in zip(grads, expected):
        torch.testing.assert_close(got_t, want)


@pytest.mark.parametrize("name", ["identity", "tanh", "sigmoid", "relu", "leaky_relu", "softmax"])
def test_integral_derivative_is_the_transfer_function(name):
    """F' = f, so ℓ_M is the matching loss of f."""
    transfer = transfer_by_name(name)
    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(transfer.integral(a), a)
    torch.testing.assert_close(grad, transfer.fn(a.detach()))


def test_log_cosh_integral_is_stable_for_large_inputs():
    a = torch.tensor([-200.0, -1.0, 0.0, 3.0, 500.0], dtype=torch.float64)
    expected = sum(abs(v) + math.log1p(math.exp(-2 * abs(v))) - math.log(2) for v in a.tolist())
    assert transfer_by_name("tanh").integral(a).item() == pytest.approx(expected)


@pytest.mark.parametrize("variant", ["M", "S"])
def test_prox_gradient_completes_the_gradient_of_the_objective_with_prox(variant):
    """local_grads + add_prox_grad_ equals autograd on ℓ(θ) + (λ/2)‖θ − θ^old‖²."""
    unit = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    target = torch.rand(5, 2, dtype=torch.float64)
    transfer, forward = transfer_by_name("sigmoid"), LinearAdapter(unit).forward
    params = [unit.weight, unit.bias]
    old = [p.detach() + torch.randn_like(p) for p in params]
    grads = local_grads(variant, transfer, forward, params, [(x, target)])
    add_prox_grad_(grads, params, old, 2.0)
    leaves = [p.detach().requires_grad_() for p in params]
    objective = local_objective(variant, transfer, forward, leaves, [(x, target)], prox=2.0, old_params=old)
    for grad, expected in zip(grads, torch.autograd.grad(objective, leaves)):
        torch.testing.assert_close(grad, expected)
