"""The local objectives of SPEC §2, checked against autograd on the user's loss.

The key identity: at θ^old, ∇ℓ(θ) = γ·∇L(θ) for both variants and every
transfer function. The form that locoprop solves (divergence to the current
output plus γ times a linear term in the handed-over gradient G,
``locoprop.local``) is checked against SPEC's objective with its targets
a − γ·g written out by hand: equal gradients at every θ when G = Jᵀg, and
values that differ by a constant. The integrals F below are written out
here, by hand, independently of locoprop.transfer.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locoprop.layers import LinearAdapter
from locoprop.local import add_prox_grad_, local_grads, local_objective
from locoprop.transfer import leaky_relu, softplus, transfer_by_name, transfer_from_module

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


def _moved(unit, scale=0.3):
    """θ ≠ θ^old: where a later local iteration evaluates the gradient."""
    generator = torch.Generator().manual_seed(5)
    return [(p.detach() + scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)) for p in
            (unit.weight, unit.bias)]  # fmt: skip


def _spec_objective(variant, f, integral, x, a, g):
    """SPEC §2's ℓ(θ) with the target written out (â = a − γg or ŷ = f(a) − γg), for F elementary."""

    def objective(weight, bias):
        a_theta = F.linear(x, weight, bias)
        if variant == "S":
            return 0.5 * (a_theta - (a - GAMMA * g)).pow(2).sum()
        return integral(a_theta).sum() - ((f(a) - GAMMA * g) * a_theta).sum()

    return objective


def _spec_gradient(variant, f, integral, x, a, g, theta):
    """∇ of SPEC's ℓ at θ; for F not elementary its gradient in a is f(a) − ŷ, by definition of F."""
    leaves = [t.clone().requires_grad_(True) for t in theta]
    if variant == "M" and integral is None:
        a_theta = F.linear(x, *leaves)
        return torch.autograd.grad(a_theta, leaves, f(a_theta) - (f(a) - GAMMA * g))
    return torch.autograd.grad(_spec_objective(variant, f, integral, x, a, g)(*leaves), leaves)


@pytest.mark.parametrize("variant", ["S", "M"])
@pytest.mark.parametrize("name", sorted(HIDDEN))
def test_hidden_unit_gradient_is_gamma_times_backprop(variant, name):
    activation, f, integral = HIDDEN[name]
    model = _network(activation)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    unit = model[0]
    expected, a, g = _backprop_grads(model, x, y, unit)
    params = [unit.weight, unit.bias]
    old = [p.detach().clone() for p in params]
    linear_term = [e / GAMMA for e in expected]  # G = ∇L

    # The identity itself, with SPEC's ℓ written by hand.
    for got, want in zip(_spec_gradient(variant, f, integral, x, a, g, old), expected):
        torch.testing.assert_close(got, want)

    # locoprop's local gradient at θ^old.
    transfer = transfer_from_module(activation)
    uses = [(x, transfer.anchor_at(a) if variant == "M" else ())]
    forward = LinearAdapter(unit).forward
    grads = local_grads(variant, transfer, forward, params, old, uses, linear_term, GAMMA)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("variant", ["S", "M"])
@pytest.mark.parametrize("name", sorted(HIDDEN))
def test_the_solved_form_has_the_gradient_of_specs_objective_at_every_theta(variant, name):
    """Divergence to a^old + γ·⟨G, θ⟩ with G = Jᵀg is SPEC's ℓ: equal gradients away from θ^old too."""
    activation, f, integral = HIDDEN[name]
    model = _network(activation)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    unit = model[0]
    expected, a, g = _backprop_grads(model, x, y, unit)
    old = [p.detach().clone() for p in (unit.weight, unit.bias)]
    theta = _moved(unit)
    transfer = transfer_from_module(activation)
    uses = [(x, transfer.anchor_at(a) if variant == "M" else ())]
    forward = LinearAdapter(unit).forward
    grads = local_grads(variant, transfer, forward, theta, old, uses, [e / GAMMA for e in expected], GAMMA)
    for got, want in zip(grads, _spec_gradient(variant, f, integral, x, a, g, theta)):
        torch.testing.assert_close(got, want)

    # The value differs from SPEC's by a constant (where F is elementary).
    if variant == "S" or integral is not None:
        spec = _spec_objective(variant, f, integral, x, a, g)
        ours = [local_objective(variant, transfer, forward, t, old, [(x, a)], [e / GAMMA for e in expected], GAMMA)
                for t in (theta, old)]  # fmt: skip
        torch.testing.assert_close(ours[0] - ours[1], spec(*theta) - spec(*old))


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

    old = [p.detach().clone() for p in (unit.weight, unit.bias)]
    for got_t, want in zip(_spec_gradient(variant, softmax_rows, log_sum_exp_rows, h, a, g, old), expected):
        torch.testing.assert_close(got_t, want)

    transfer = transfer_by_name("softmax")
    uses = [(h, transfer.anchor_at(a) if variant == "M" else ())]
    theta = _moved(unit)
    grads = local_grads(variant, transfer, LinearAdapter(unit).forward, theta, old, uses,
                        [e / GAMMA for e in expected], GAMMA)  # fmt: skip
    for got_t, want in zip(grads, _spec_gradient(variant, softmax_rows, log_sum_exp_rows, h, a, g, theta)):
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
    a_old = torch.randn(5, 2, dtype=torch.float64)
    transfer, forward = transfer_by_name("sigmoid"), LinearAdapter(unit).forward
    params = [unit.weight, unit.bias]
    old = [p.detach() + torch.randn_like(p) for p in params]
    linear_term = [torch.randn_like(p) for p in params]
    uses = [(x, transfer.anchor_at(a_old) if variant == "M" else ())]
    grads = local_grads(variant, transfer, forward, params, old, uses, linear_term, GAMMA)
    add_prox_grad_(grads, params, old, 2.0)
    leaves = [p.detach().requires_grad_() for p in params]
    objective = local_objective(variant, transfer, forward, leaves, old, [(x, a_old)], linear_term, GAMMA, prox=2.0)
    for grad, expected in zip(grads, torch.autograd.grad(objective, leaves)):
        torch.testing.assert_close(grad, expected)


TRANSFERS = ["identity", "tanh", "sigmoid", "relu", "leaky_relu(0.1)", "softplus", "softmax"]


def _transfer(name):
    return leaky_relu(0.1) if name == "leaky_relu(0.1)" else transfer_by_name(name)


@pytest.mark.parametrize("name", TRANSFERS)
@pytest.mark.parametrize("scale", [1e-7, 1e-3, 1.0, 30.0])
def test_the_change_of_a_transfer_is_accurate_in_float32_at_any_step(name, scale):
    """f(a + d) − f(a) from the anchor of a, in float32, is within a few float32 ulp (relative to the
    largest change) of the same difference in float64, however small d is; the direct difference in
    float32 loses d to the rounding of f(a) (checked too, so that the test would fail without the care)."""
    transfer = _transfer(name)
    generator = torch.Generator().manual_seed(3)
    a = 3 * torch.randn(64, 10, generator=generator)
    d = scale * torch.randn(64, 10, generator=generator)
    exact = transfer.fn(a.double() + d.double()) - transfer.fn(a.double())
    largest = exact.abs().max()
    got = transfer.change_from(transfer.anchor_at(a), d.clone())
    assert ((got.double() - exact).abs().max() / largest).item() < 64 * torch.finfo(torch.float32).eps
    if scale == 1e-7 and name != "identity":
        direct = transfer.fn(a + d) - transfer.fn(a)
        assert ((direct.double() - exact).abs().max() / largest).item() > 1e-3
    # The anchor is not consumed: a second change from it gives the same result.
    torch.testing.assert_close(transfer.change_from(transfer.anchor_at(a), d.clone()), got, rtol=0, atol=0)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_softplus_changes_far_down_from_a_saturated_unit_are_accurate_each(beta):
    """From a saturated point (σ(βa) rounds near 1) a move far down changes softplus by about −a: the log1p
    form, log1p(σ(βa)·expm1(βd)), would take the log of σ(βa)'s rounding there (errors of 1e-2 at a = 7.7,
    d = −10.5), and σ(−βa) underflows beyond βa = 88 (−inf at βa = 120); each change is within a few float32
    ulp of itself."""
    transfer = softplus(beta)
    a = torch.tensor([7.6733, 12.0, 9.0, 15.0, 6.0, -3.0, 60.0, 45.0]) / beta * 2
    d = torch.tensor([-10.4821, -20.0, -9.5, -16.0, -30.0, -5.0, -60.0, -50.0]) / beta * 2
    exact = transfer.fn(a.double() + d.double()) - transfer.fn(a.double())
    got = transfer.change_from(transfer.anchor_at(a), d.clone())
    assert ((got.double() - exact).abs() / exact.abs()).max().item() < 8 * torch.finfo(torch.float32).eps


def test_softplus_changes_near_the_threshold_at_a_small_beta_are_accurate():
    """βd, not d, decides the branch: at β = ½, a = −121, d = 40 (βd = 20, the threshold) the change is the
    direct difference of two small softpluses (an earlier clamp of d itself put it at 1.0 relative error)."""
    transfer = softplus(0.5)
    a = torch.tensor([-121.0, -60.0, 10.0, -30.0])
    d = torch.tensor([40.0, 39.9, 40.1, -10.0])
    exact = transfer.fn(a.double() + d.double()) - transfer.fn(a.double())
    got = transfer.change_from(transfer.anchor_at(a), d.clone())
    assert ((got.double() - exact).abs() / exact.abs()).max().item() < 64 * torch.finfo(torch.float32).eps
