"""solve="exact" (variant S, linear units) is the limit of the iterative S solve."""

import copy

import pytest
import torch
from helpers import assert_same_params, snapshot
from torch import nn

from locoprop import LocoPropOptimizer

GAMMA, PROX = 0.5, 2.0


def _setup():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randn(40, 3, dtype=torch.float64)
    return model, x, y


def _step(model, x, y, **kwargs):
    opt = LocoPropOptimizer(model, variant="S", activation_lr=GAMMA, prox=PROX, **kwargs)
    opt.zero_grad()
    (model(x) - y).pow(2).sum(1).mean().backward()
    opt.step()
    return snapshot(model)


def _stable_lr(model, x):
    """1 / largest eigenvalue of C + λI over both units (x̃ = [x, 1])."""
    with torch.no_grad():
        inputs = [x, torch.tanh(model[0](x))]
    top = 0.0
    for h in inputs:
        h1 = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
        top = max(top, torch.linalg.eigvalsh(h1.T @ h1)[-1].item() + PROX)
    return 1.0 / top


def test_exact_equals_iterative_solve_run_to_convergence():
    model, x, y = _setup()
    lr = _stable_lr(model, x)
    iterative = _step(copy.deepcopy(model), x, y, lr=lr, local_iters=3000, inner="sgd", inner_schedule="constant")
    exact = _step(copy.deepcopy(model), x, y, lr=lr, solve="exact")
    for name in exact:
        torch.testing.assert_close(exact[name], iterative[name], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("parallel", ["none", "batched"])
def test_exact_solution_zeroes_the_gradient_of_the_local_objective(parallel):
    """Check optimality directly: ∇ℓ_S(θ_new) = 0, with ℓ_S written out, for
    the reference solve and the fast one (lower-triangle C, solves from the right)."""
    model, x, y = _setup()
    old = copy.deepcopy(model)
    captured = {}
    handle = old[2].register_forward_hook(lambda m, i, out: captured.update(h=i[0], a=out))
    loss = (old(x) - y).pow(2).sum(1).mean()
    handle.remove()
    (g,) = torch.autograd.grad(loss, captured["a"])
    target = captured["a"].detach() - GAMMA * g

    new = _step(model, x, y, lr=1.0, solve="exact", parallel=parallel)
    weight = new["2.weight"].requires_grad_(True)
    bias = new["2.bias"].requires_grad_(True)
    h = captured["h"].detach()
    objective = 0.5 * (h @ weight.T + bias - target).pow(2).sum() + 0.5 * PROX * (
        (weight - old[2].weight.detach()).pow(2).sum() + (bias - old[2].bias.detach()).pow(2).sum()
    )
    for grad in torch.autograd.grad(objective, [weight, bias]):
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-9, rtol=0)


def test_fast_exact_solve_equals_the_reference_with_a_wide_layer_used_twice():
    """Blocked C (d ≥ 256), no bias on one unit, and a layer whose two uses add up."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide = nn.Linear(300, 300)
            self.head = nn.Linear(300, 4, bias=False)

        def forward(self, x):
            return self.head(torch.tanh(self.wide(torch.tanh(self.wide(x)))))

    model = Net().double()
    x = torch.randn(500, 300, dtype=torch.float64)
    y = torch.randn(500, 4, dtype=torch.float64)
    units = lambda m: [(m.wide, "tanh"), (m.head, "identity")]  # noqa: E731
    results = {}
    for parallel in ("none", "batched"):
        m = copy.deepcopy(model)
        opt = LocoPropOptimizer(m, variant="S", solve="exact", prox=PROX, activation_lr=GAMMA, units=units(m),
                                parallel=parallel)  # fmt: skip
        for _ in range(2):
            opt.zero_grad()
            (m(x) - y).pow(2).sum(1).mean().backward()
            opt.step()
        results[parallel] = snapshot(m)
    for name in results["none"]:
        torch.testing.assert_close(results["batched"][name], results["none"][name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("parallel", ["none", "batched"])
def test_exact_solve_that_cannot_factor_changes_nothing(parallel):
    """Unit '2' has a rank-3 C (300 inputs, 3 rows) and λ far below float32
    resolution: a clear error naming it, and no parameter changed."""
    model = nn.Sequential(nn.Linear(2, 300), nn.Tanh(), nn.Linear(300, 4))
    opt = LocoPropOptimizer(model, variant="S", solve="exact", prox=1e-30, parallel=parallel)
    model(torch.randn(3, 2) * 100).sum().backward()
    before = snapshot(model)
    with pytest.raises(torch.linalg.LinAlgError, match=r"unit\(s\) \['2'\] is not positive definite.*Raise prox"):
        opt.step()
    assert_same_params(model, before)


@pytest.mark.parametrize("change", ["none", "clip", "weight_decay"])
def test_fast_exact_solve_follows_the_records_whatever_happened_to_grad(change):
    """The fast solve takes Gᵀx̃ from p.grad only while it is the backprop
    gradient; after clipping or a hand-added decay it recomputes it, so both
    paths still return the minimiser of ℓ_S built from the records."""
    model, x, y = _setup()
    results = {}
    for parallel in ("none", "batched"):
        m = copy.deepcopy(model)
        opt = LocoPropOptimizer(m, variant="S", solve="exact", prox=PROX, activation_lr=GAMMA, parallel=parallel)
        opt.zero_grad()
        (m(x) - y).pow(2).sum(1).mean().backward()
        if change == "clip":
            torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=1e-3)
        elif change == "weight_decay":
            m[2].weight.grad.add_(m[2].weight.detach(), alpha=0.1)
        opt.step()
        results[parallel] = snapshot(m)
    for name in results["none"]:
        torch.testing.assert_close(results["batched"][name], results["none"][name], rtol=1e-9, atol=1e-12)
