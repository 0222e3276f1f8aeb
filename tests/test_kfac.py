"""K-FAC against formulas computed independently (per-example autograd, explicit patches)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_round_trip_continues, snapshot
from torch import nn

from baselines import KFAC


def _per_example_output_grads(layer, x, y):
    """ĝ_i = d(per-example loss ½‖layer(x_i) − y_i‖²)/da_i, one example at a time."""
    rows = []
    for xi, yi in zip(x, y):
        a = layer(xi[None]).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(0.5 * (a - yi).pow(2).sum(), a)
        rows.append(g[0])
    return torch.stack(rows)


@pytest.mark.parametrize("damping", [1e-14, 0.3])
def test_step_equals_kronecker_preconditioned_gradient(damping):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    y = torch.randn(64, 3, dtype=torch.float64)
    lr = 0.5

    # Independent computation.
    xt = torch.cat([x, torch.ones(64, 1, dtype=torch.float64)], 1)
    a_factor = xt.T @ xt / 64
    g_hat = _per_example_output_grads(layer, x, y)
    g_factor = g_hat.T @ g_hat / 64
    grads = torch.autograd.grad(0.5 * (layer(x) - y).pow(2).sum(1).mean(), [layer.weight, layer.bias])
    grad = torch.cat([grads[0], grads[1][:, None]], 1)
    pi = math.sqrt((a_factor.trace() / 5) / (g_factor.trace() / 3))
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    direction = torch.linalg.solve(g_factor + math.sqrt(damping) / pi * eye(3), grad) @ torch.linalg.inv(
        a_factor + pi * math.sqrt(damping) * eye(5)
    )
    theta = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    expected = theta - lr * direction

    opt = KFAC(layer, lr=lr, damping=damping, momentum=0.0, factor_decay=0.0, kl_clip=None, inv_update_freq=1)
    (0.5 * (layer(x) - y).pow(2).sum(1).mean()).backward()
    opt.step()
    got = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_kl_clip_scales_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    lr, kl_clip = 0.3, 1e-6

    def step(m, clip):
        opt = KFAC(m, lr=lr, momentum=0.0, factor_decay=0.0, kl_clip=clip, damping=1e-2)
        m(x).pow(2).sum(1).mean().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        before = snapshot(m)
        opt.step()
        return {n: p.detach() - before[n] for n, p in m.named_parameters()}, grads

    free, grads = step(copy.deepcopy(model), None)
    clipped, _ = step(copy.deepcopy(model), kl_clip)
    # V = −Δ/lr, so lr²·⟨V, ∇⟩ = −lr·⟨Δ, ∇⟩.
    vg = -lr * sum((free[n] * grads[n]).sum() for n in free).item()
    nu = math.sqrt(kl_clip / vg)
    assert nu < 1
    for n in free:
        torch.testing.assert_close(clipped[n], nu * free[n])


def _explicit_patches(x, kernel, stride, padding):
    """Patches by slicing the padded input at every output position, flattened like the weight."""
    x = F.pad(x, (padding, padding, padding, padding))
    n, _, h, w = x.shape
    rows = []
    for i in range(n):
        for r in range(0, h - kernel + 1, stride):
            for s in range(0, w - kernel + 1, stride):
                rows.append(x[i, :, r : r + kernel, s : s + kernel].reshape(-1))
    return torch.stack(rows)


def test_conv2d_factors_match_explicit_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)

    captured = {}
    handle = conv.register_forward_hook(lambda m, i, out: captured.update(a=out))
    loss = model(x).pow(2).sum(1).mean()
    handle.remove()
    (g,) = torch.autograd.grad(loss, captured["a"])

    patches = _explicit_patches(x, 3, 2, 1)
    patches = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    expected_a = patches.T @ patches / len(patches)
    g_hat = 5 * g.permute(0, 2, 3, 1).reshape(-1, 3)  # per-example gradients, one row per position
    expected_g = g_hat.T @ g_hat / 5  # mean over examples of the sum over positions

    opt = KFAC(model, factor_decay=0.0)
    model(x).pow(2).sum(1).mean().backward()
    opt.step()
    torch.testing.assert_close(opt.state[conv.weight]["A"], expected_a)
    torch.testing.assert_close(opt.state[conv.weight]["G"], expected_g)


def test_sampled_fisher_solves_least_squares_far_faster_than_sgd():
    torch.manual_seed(0)
    scales = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1], dtype=torch.float64)
    x = torch.randn(2000, 5, dtype=torch.float64) * scales  # ill-conditioned inputs
    y = x @ torch.randn(5, 2, dtype=torch.float64) + 0.5
    layer = nn.Linear(5, 2).double()

    def loss_of(m):
        return 0.5 * (m(x) - y).pow(2).sum(1).mean()

    def steps_to_solve(m, opt, limit):
        for step in range(1, limit + 1):
            opt.zero_grad()
            loss_of(m).backward()
            opt.step()
            if loss_of(m).item() < 1e-4:
                return step
        return math.inf

    kfac_model = copy.deepcopy(layer)
    kfac = KFAC(
        kfac_model,
        lr=1.0,
        damping=1e-8,
        momentum=0.0,
        factor_decay=0.5,
        kl_clip=None,
        inv_update_freq=1,
        fisher="sampled",
        loss="mse",
    )
    kfac_steps = steps_to_solve(kfac_model, kfac, 50)

    xt = torch.cat([x, torch.ones(2000, 1, dtype=torch.float64)], 1)
    top = torch.linalg.eigvalsh(xt.T @ xt / 2000)[-1].item()
    sgd_model = copy.deepcopy(layer)
    sgd_steps = steps_to_solve(sgd_model, torch.optim.SGD(sgd_model.parameters(), lr=1.0 / top), 500)

    assert kfac_steps <= 15, kfac_steps
    assert sgd_steps > 10 * kfac_steps, (kfac_steps, sgd_steps)


def test_factors_and_eigenbases_refresh_on_their_own_periods():
    """factor_update_freq F: A and G (and the sampled Fisher's extra forward pass) change on steps 0, F, 2F, ...
    only; inv_update_freq T: the eigenbases on steps 0, T, 2T, ..., from the factors as last updated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = KFAC(model, lr=0.05, factor_update_freq=3, inv_update_freq=2, fisher="sampled", loss="mse")
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    weight = model[0].weight
    factor_changes, eigen_changes, extra_passes = [], [], []
    previous = None
    for _ in range(8):
        x = torch.randn(16, 5)
        forwards.clear()
        opt.zero_grad()
        model(x).pow(2).sum(1).mean().backward()
        opt.step()
        state = opt.state[weight]
        current = (state["A"].clone(), state["QA"].clone())
        if previous is not None:
            factor_changes.append(not torch.equal(current[0], previous[0]))
            eigen_changes.append(not torch.equal(current[1], previous[1]))
        extra_passes.append(len(forwards) - 1)
        previous = current
    # steps 1..7: factors updated on 3 and 6; eigenbases refreshed on 2, 4, 6 (on 2 and 4 from unchanged factors
    # after step 0 and 3: changed on 4 only, since step 2's factors are step 0's).
    assert factor_changes == [False, False, True, False, False, True, False]
    assert eigen_changes == [False, False, False, True, False, True, False]
    assert extra_passes == [1, 0, 0, 1, 0, 0, 1, 0]


def test_factor_update_freq_one_is_the_step_before_the_knob():
    """F = 1 (the default) gives the step of a K-FAC whose factors update every step, computed by hand: with
    factor_decay 0, no momentum and no clipping, one layer, the step is (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    steps = []
    for kwargs in (dict(), dict(factor_update_freq=1)):
        model = copy.deepcopy(layer)
        opt = KFAC(model, lr=1.0, damping=1e-2, momentum=0.0, factor_decay=0.0, kl_clip=None, **kwargs)
        before = model.weight.detach().clone()
        out = model(x)
        out.retain_grad()
        loss = out.pow(2).sum(1).mean()
        loss.backward()
        g = out.grad
        grad = model.weight.grad.clone()
        opt.step()
        a = x.T @ x / 32
        gg = g.T @ g * 32
        pi = math.sqrt((torch.trace(a) / 4) / (torch.trace(gg) / 3))
        expected = torch.linalg.solve(gg + math.sqrt(1e-2) / pi * torch.eye(3, dtype=torch.float64), grad)
        expected = expected @ torch.linalg.inv(a + pi * math.sqrt(1e-2) * torch.eye(4, dtype=torch.float64))
        torch.testing.assert_close(before - model.weight.detach(), expected, rtol=1e-8, atol=1e-12)
        steps.append(model.weight.detach().clone())
    torch.testing.assert_close(steps[0], steps[1], rtol=0, atol=0)


def test_state_dict_round_trip_continues_identically():
    """With a parameter outside its layers (LayerNorm) and weight decay, on top of the registry's contract table."""

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.LayerNorm(5), nn.Linear(5, 3))

    assert_round_trip_continues(
        make,
        lambda model: KFAC(model, lr=0.05, inv_update_freq=2, weight_decay=1e-3),
        [torch.randn(16, 6) for _ in range(6)],
        lambda model, x: model(x).pow(2).sum(1).mean(),
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0.0), "Invalid learning rate: 0.0"),
        (dict(damping=0.0), "Invalid damping: 0.0"),
        (dict(momentum=1.0), "Invalid momentum: 1.0"),
        (dict(weight_decay=-1.0), "Invalid weight_decay: -1.0"),
        (dict(factor_decay=1.0), "Invalid factor_decay: 1.0"),
        (dict(kl_clip=0.0), "Invalid kl_clip: 0.0"),
        (dict(inv_update_freq=0), "Invalid inv_update_freq: 0"),
        (dict(factor_update_freq=0), "Invalid factor_update_freq: 0"),
        (dict(factor_update_freq=1.5), "Invalid factor_update_freq: 1.5"),
        (dict(fisher="true"), "Invalid fisher: 'true'"),
        (dict(fisher="sampled"), "Invalid loss for the sampled Fisher: None"),
        (dict(fisher="sampled", loss="hinge"), "Invalid loss for the sampled Fisher: 'hinge'"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=message):
        KFAC(model, **kwargs)
    assert not model._forward_hooks


def test_step_before_backward_is_refused():
    model = nn.Linear(3, 2)
    before = snapshot(model)
    opt = KFAC(model)
    with pytest.raises(RuntimeError, match="before any backward pass"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_factor_with_many_zero_directions_gives_a_finite_step():
    """MNIST's border pixels are always 0, so A has hundreds of zero eigenvalues; float32 eigh (MKL) returns NaN
    for some such batches (this one among them), which made the step NaN."""
    from sweeps.runner.data import load_dataset

    data = load_dataset("mnist5k").with_validation(0.1)
    x = data.train_x[torch.randperm(3600, generator=torch.Generator().manual_seed(1))[:250]]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 784))
    opt = KFAC(model, lr=0.01, damping=0.03, kl_clip=None, momentum=0.0)
    before = snapshot(model)
    F.binary_cross_entropy_with_logits(model(x), x, reduction="none").sum(1).mean().backward()
    opt.step()
    assert all(p.isfinite().all() for p in model.parameters())
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_eigenbases_hold_no_subnormal_numbers_and_the_step_is_unchanged():
    """A real MNIST batch's A, decomposed in float64 and cast to float32, has thousands of eigenvector entries
    below float32's smallest normal number (the zero-variance border pixels); each one puts the CPU's products on
    their slow path (K-FAC's steps 1.4× slower until a refresh happened to have fewer). They are set to 0; the step
    equals the one from the unflushed float64 eigenbasis."""
    from sweeps.runner.data import load_dataset

    data = load_dataset("mnist5k")
    x = data.train_x[:250].reshape(250, -1).float()
    torch.manual_seed(0)
    layer = nn.Linear(784, 16)
    target = torch.randn(250, 16)
    opt = KFAC(layer, lr=0.1, damping=0.03, kl_clip=None, momentum=0.0, factor_decay=0.0, inv_update_freq=1)
    (0.5 * (layer(x) - target).pow(2).sum(1).mean()).backward()
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).double()
    theta = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).double()
    opt.step()

    tiny = torch.finfo(torch.float32).tiny
    state = opt.state[layer.weight]
    for key in ("QA", "dA", "QG", "dG"):
        assert not ((state[key].abs() < tiny) & (state[key] != 0)).any(), key
    # Before the flush, the same cast held subnormal entries: the check above can fail.
    _, vectors = torch.linalg.eigh(state["A"].double())
    cast = vectors.float()
    assert ((cast.abs() < tiny) & (cast != 0)).sum() > 100

    # The step from the float64 decompositions of the same factors, nothing flushed.
    d_a, q_a = torch.linalg.eigh(state["A"].double())
    d_g, q_g = torch.linalg.eigh(state["G"].double())
    root, pi = math.sqrt(0.03), state["pi"]
    v = q_g.T @ grad @ q_a / ((d_g.clamp(min=0)[:, None] + root / pi) * (d_a.clamp(min=0)[None, :] + root * pi))
    expected = theta - 0.1 * (q_g @ v @ q_a.T)
    got = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
