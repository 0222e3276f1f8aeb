"""solve="exact" (variant S, linear units) is the limit of the iterative S solve."""

import copy

import torch
from conftest import snapshot
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


def test_exact_solution_zeroes_the_gradient_of_the_local_objective():
    """Check optimality directly: ∇ℓ_S(θ_new) = 0, with ℓ_S written out."""
    model, x, y = _setup()
    old = copy.deepcopy(model)
    captured = {}
    handle = old[2].register_forward_hook(lambda m, i, out: captured.update(h=i[0], a=out))
    loss = (old(x) - y).pow(2).sum(1).mean()
    handle.remove()
    (g,) = torch.autograd.grad(loss, captured["a"])
    target = captured["a"].detach() - GAMMA * g

    new = _step(model, x, y, lr=1.0, solve="exact")
    weight = new["2.weight"].requires_grad_(True)
    bias = new["2.bias"].requires_grad_(True)
    h = captured["h"].detach()
    objective = 0.5 * (h @ weight.T + bias - target).pow(2).sum() + 0.5 * PROX * (
        (weight - old[2].weight.detach()).pow(2).sum() + (bias - old[2].bias.detach()).pow(2).sum()
    )
    for grad in torch.autograd.grad(objective, [weight, bias]):
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-9, rtol=0)
