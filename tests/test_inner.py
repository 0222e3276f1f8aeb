"""Inner optimizers: TF-1 RMSProp, the schedules, and lr schedulers."""

import math

import pytest
import torch
from helpers import snapshot
from torch import nn

from locoprop import LocoPropOptimizer, RMSpropTF
from locoprop.inner import inner_lr, rmsprop_tf


def test_rmsprop_tf_matches_the_tf1_update_written_out():
    lr, decay, momentum, eps = 0.1, 0.9, 0.5, 1e-10
    p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = RMSpropTF([p], lr=lr, decay=decay, momentum=momentum, eps=eps)
    grads = [[0.3, -1.0, 2.0], [0.1, 0.4, -0.2], [-0.5, 0.0, 1.5]]

    value = [1.0, -2.0, 0.5]
    ms = [1.0, 1.0, 1.0]  # TF-1 starts the squared-gradient slot at one
    mom = [0.0, 0.0, 0.0]
    for g in grads:
        for i, gi in enumerate(g):
            ms[i] = decay * ms[i] + (1 - decay) * gi * gi
            mom[i] = momentum * mom[i] + lr * gi / math.sqrt(ms[i] + eps)
            value[i] -= mom[i]
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        assert p.tolist() == pytest.approx(value, rel=1e-12)


def test_rmsprop_tf_foreach_equals_for_loop():
    shapes = [(3, 4), (4,), (2, 2, 2)]
    a = [torch.randn(s, dtype=torch.float64) for s in shapes]
    b = [t.clone() for t in a]
    ms_a = [torch.ones_like(t) for t in a]
    ms_b = [torch.ones_like(t) for t in a]
    mom_a = [torch.zeros_like(t) for t in a]
    mom_b = [torch.zeros_like(t) for t in a]
    for _ in range(4):
        grads = [torch.randn_like(t) for t in a]
        kw = dict(lr=0.01, decay=0.9, momentum=0.99, eps=1e-5)
        rmsprop_tf(a, grads, ms_a, mom_a, foreach=False, **kw)
        rmsprop_tf(b, grads, ms_b, mom_b, foreach=True, **kw)
    for x, y in zip(a + ms_a + mom_a, b + ms_b + mom_b):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "Invalid learning rate: 0.0"),
        (dict(decay=1.0), "Invalid decay value: 1.0"),
        (dict(momentum=-0.1), "Invalid momentum value: -0.1"),
        (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    ],
)
def test_rmsprop_tf_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RMSpropTF([torch.zeros(2, requires_grad=True)], **kwargs)


def test_linear_floor_schedule_values():
    assert [inner_lr("linear-floor", 2.0, t, 10) for t in range(10)] == pytest.approx(
        [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.8, 0.6, 0.5, 0.5]
    )
    assert [inner_lr("constant", 2.0, t, 4) for t in range(4)] == [2.0] * 4


def test_two_local_steps_follow_the_linear_floor_schedule():
    """Variant S on one linear layer, K = 2, inner SGD, written out by hand:
    θ1 = θ0 − η·γ∇L(θ0);  θ2 = θ1 − η·(1 − 1/2)·∇ℓ_S(θ1)."""
    eta, gamma = 0.01, 2.0
    layer = nn.Linear(3, 2).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randn(7, 2, dtype=torch.float64)
    xt = torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], 1)
    theta0 = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    a0 = xt @ theta0.T
    g = (a0 - y) / 7  # dL/da for L = ½ mean-over-batch squared error
    target = a0 - gamma * g
    theta1 = theta0 - eta * (gamma * g).T @ xt
    theta2 = theta1 - eta * 0.5 * (xt @ theta1.T - target).T @ xt

    opt = LocoPropOptimizer(layer, variant="S", lr=eta, activation_lr=gamma, local_iters=2, inner="sgd")
    (0.5 * (layer(x) - y).pow(2).sum(1).mean()).backward()
    opt.step()
    torch.testing.assert_close(torch.cat([layer.weight, layer.bias[:, None]], 1).detach(), theta2)


def test_lr_scheduler_moves_the_inner_learning_rate():
    """After StepLR halves lr, a one-iteration SGD step halves too."""
    gamma = 2.0
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    opt = LocoPropOptimizer(model, lr=0.1, activation_lr=gamma, local_iters=1, inner="sgd")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    steps = []
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = snapshot(model)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        scheduler.step()
        steps.append(lr)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[name] - lr * gamma * grads[name])
    assert steps == [0.1, 0.05]
    assert all(group["lr"] == 0.025 for group in opt.param_groups)


def test_one_cycle_schedule_runs_without_cycling_momentum():
    """OneCycleLR needs momentum or betas in the defaults to cycle them; the inner optimizer's momentum is
    not a param-group value, so the README's recipe is cycle_momentum=False: its lrs are what steps use."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    opt = LocoPropOptimizer(model, lr=0.1, activation_lr=2.0, local_iters=1, inner="sgd")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=4, cycle_momentum=False)
    used = []
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4, dtype=torch.float64)).pow(2).sum().backward()
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert used[0] < used[1] and all(lr > 0 for lr in used)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "rmsprop-tf"])
def test_every_inner_name_builds_and_keeps_state_across_steps(name):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = LocoPropOptimizer(model, lr=1e-3, inner=name, local_iters=3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
    stateful = name not in ("sgd",)
    assert bool(opt.inner.state[model[0].weight]) == stateful


def test_inner_accepts_an_optimizer_class_and_kwargs():
    model = nn.Linear(4, 2)
    opt = LocoPropOptimizer(model, inner=torch.optim.Adam, inner_kwargs={"betas": (0.5, 0.6)})
    assert isinstance(opt.inner, torch.optim.Adam)
    assert opt.inner.param_groups[0]["betas"] == (0.5, 0.6)


def test_compiled_rmsprop_tf_equals_the_eager_update():
    """Groups with their own lr (changing every step), one with another momentum
    (a separate compiled call), and a parameter without a gradient."""
    shapes = [(4, 3), (3,), (2, 4), (5,), (2,)]
    torch.manual_seed(0)
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = []
    for compiled in (False, True):
        params = [t.clone().requires_grad_(True) for t in start]
        groups = [{"params": params[:2]}, {"params": params[2:4], "lr": 0.3}, {"params": params[4:], "momentum": 0.9}]
        opt = RMSpropTF(groups, lr=0.1, decay=0.9, momentum=0.5, eps=1e-5, compiled=compiled)
        for step, gs in enumerate(grads):
            for group, base in zip(opt.param_groups, (0.1, 0.3, 0.1)):
                group["lr"] = base / (step + 1)  # a new lr each step, as the inner schedule does
            for p, g in zip(params, gs):
                p.grad = g.clone()
            params[3].grad = None
            opt.step()
        results.append([p.detach() for p in params])
    assert torch.equal(results[1][3], start[3])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compile_option_fuses_the_inner_update():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    assert LocoPropOptimizer(model, inner="rmsprop-tf", compile=True).inner.compiled
    assert LocoPropOptimizer(model, inner="adam", compile=True).inner.defaults["fused"] is True
    assert not LocoPropOptimizer(model, inner="rmsprop-tf").inner.compiled
