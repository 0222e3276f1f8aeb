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


# ---------------------------------------------------------------- the amortised exact solve (covariance_refresh)


def _units_inputs_and_gradients(model, x, y):
    """Per linear unit of the tanh MLP: its input x̃ = [x, 1] and G = [∇W | ∇b] of the loss, by autograd alone."""
    inputs = [x, torch.tanh(model[0](x))]
    loss = (model(x) - y).pow(2).sum(1).mean()
    grads = torch.autograd.grad(loss, [model[0].weight, model[0].bias, model[2].weight, model[2].bias])
    tilde = [torch.cat([h.detach(), torch.ones(len(h), 1, dtype=h.dtype)], 1) for h in inputs]
    return tilde, [torch.cat([grads[0], grads[1][:, None]], 1), torch.cat([grads[2], grads[3][:, None]], 1)]


def _closed_form_steps(model, batches, refresh, decay=0.0):
    """The amortised exact solve written out: per unit, C̄ ← ρ·C̄ + (1 − ρ)·C at steps 0, T, 2T, … (the first C̄
    is C), and every step θ ← θ − γ·(C̄ + λI)⁻¹-solve of G by torch.linalg.solve. Parameters after each step."""
    model = copy.deepcopy(model)
    averages, after = [None, None], []
    for step, (x, y) in enumerate(batches):
        tilde, grads = _units_inputs_and_gradients(model, x, y)
        with torch.no_grad():
            for index, (layer, h, g) in enumerate(zip([model[0], model[2]], tilde, grads)):
                if step % refresh == 0:
                    covariance = h.T @ h
                    averages[index] = covariance if averages[index] is None else (
                        decay * averages[index] + (1 - decay) * covariance)  # fmt: skip
                system = averages[index] + PROX * torch.eye(len(h.T), dtype=h.dtype)
                delta = torch.linalg.solve(system, g.T).T  # (C̄ + λI) symmetric: G(C̄ + λI)⁻¹
                layer.weight -= GAMMA * delta[:, :-1]
                layer.bias -= GAMMA * delta[:, -1]
        after.append(snapshot(model))
    return after


def _batches(count, rows=40):
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(rows, 6, dtype=torch.float64, generator=generator),
             torch.randn(rows, 3, dtype=torch.float64, generator=generator)) for _ in range(count)]  # fmt: skip


def _optimizer_steps(model, batches, **kwargs):
    opt = LocoPropOptimizer(model, variant="S", solve="exact", activation_lr=GAMMA, prox=PROX, **kwargs)
    after = []
    for x, y in batches:
        opt.zero_grad()
        (model(x) - y).pow(2).sum(1).mean().backward()
        opt.step()
        after.append(snapshot(model))
    return opt, after


@pytest.mark.parametrize("parallel", ["none", "batched"])
def test_covariance_refresh_1_is_the_exact_step_of_every_batch(parallel):
    """T = 1 (the default) solves with each batch's own C: the closed form by torch.linalg.solve to 1e-12, the
    same parameters bit for bit as the optimizer without the argument, and no state kept."""
    model, _, _ = _setup()
    batches = _batches(3)
    expected = _closed_form_steps(model, batches, refresh=1)
    opt, after = _optimizer_steps(copy.deepcopy(model), batches, covariance_refresh=1, parallel=parallel)
    _, default = _optimizer_steps(copy.deepcopy(model), batches, parallel=parallel)
    for got, want, plain in zip(after, expected, default):
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12)
            assert torch.equal(got[name], plain[name])
    assert not any(opt.state.values())


@pytest.mark.parametrize("parallel", ["none", "batched"])
@pytest.mark.parametrize("refresh, decay", [(3, 0.0), (2, 0.5)])
def test_the_amortised_solve_refreshes_at_steps_0_t_2t_and_reuses_the_stale_inverse_between(
    parallel, refresh, decay, monkeypatch
):
    """With T = 3 (T = 2 and ρ = ½: C̄ a moving average of the refresh batches) every step uses the inverse
    formed at the last step 0, T, 2T, …: the written-out steps to 1e-12, inverses formed exactly at those steps,
    and steps that differ from the every-batch solve (the test can tell)."""
    import locoprop.solve_exact

    formed = []
    original = locoprop.solve_exact.covariance_inverse
    monkeypatch.setattr(locoprop.solve_exact, "covariance_inverse",
                        lambda *args: formed.append(step) or original(*args))  # fmt: skip
    model, _, _ = _setup()
    batches = _batches(7)
    expected = _closed_form_steps(model, batches, refresh, decay)
    every_batch = _closed_form_steps(model, batches, refresh=1)
    m = copy.deepcopy(model)
    opt = LocoPropOptimizer(m, variant="S", solve="exact", activation_lr=GAMMA, prox=PROX, parallel=parallel,
                            covariance_refresh=refresh, covariance_decay=decay)  # fmt: skip
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        (m(x) - y).pow(2).sum(1).mean().backward()
        opt.step()
        for name, want in expected[step].items():
            torch.testing.assert_close(snapshot(m)[name], want, rtol=0, atol=1e-12)
    assert formed == [s for s in range(7) if s % refresh == 0 for _ in range(2)]  # two units
    assert not torch.allclose(expected[-1]["0.weight"], every_batch[-1]["0.weight"], rtol=0, atol=1e-6)
    kept = opt.state[m[0].weight]
    assert kept["covariance_age"] == 7 - 7 // refresh * refresh or refresh
    assert ("covariance" in kept) == (decay > 0)


def test_a_changed_prox_refreshes_and_t_back_at_1_drops_the_kept_covariance():
    model, _, _ = _setup()
    batches = _batches(4)
    opt, _ = _optimizer_steps(model, batches[:1], covariance_refresh=10)
    assert opt.state[model[0].weight]["covariance_prox"] == PROX
    for group in opt.param_groups:
        group["prox"] = 2 * PROX
    opt.zero_grad()
    (model(batches[1][0]) - batches[1][1]).pow(2).sum(1).mean().backward()
    opt.step()
    assert opt.state[model[0].weight]["covariance_prox"] == 2 * PROX
    assert opt.state[model[0].weight]["covariance_age"] == 1
    for group in opt.param_groups:
        group["covariance_refresh"] = 1
    opt.zero_grad()
    (model(batches[2][0]) - batches[2][1]).pow(2).sum(1).mean().backward()
    opt.step()
    assert not any(opt.state.values())


@pytest.mark.parametrize("parallel", ["none", "batched"])
def test_an_amortised_refresh_that_cannot_factor_changes_nothing(parallel):
    model = nn.Sequential(nn.Linear(2, 300), nn.Tanh(), nn.Linear(300, 4))
    opt = LocoPropOptimizer(model, variant="S", solve="exact", prox=1e-30, parallel=parallel, covariance_refresh=5)
    model(torch.randn(3, 2) * 100).sum().backward()
    before = snapshot(model)
    with pytest.raises(torch.linalg.LinAlgError, match=r"unit\(s\) \['2'\] is not positive definite.*Raise prox"):
        opt.step()
    assert_same_params(model, before)
    assert not any(opt.state.values())


def test_an_amortised_unit_whose_gamma_adapts_takes_the_same_step_and_keeps_its_sensitivity():
    """γ adapting (β > 0) needs Δ = G·P⁻¹ for its sensitivity; the others add G·P⁻¹ into θ directly. The first
    step (no hypergradient yet, γ unchanged) is the same both ways, and the sensitivity is −Δ."""
    model, _, _ = _setup()
    (x, y), second = _batches(2)
    plain, adapting = copy.deepcopy(model), copy.deepcopy(model)
    _optimizer_steps(plain, [(x, y)], covariance_refresh=3)
    opt, _ = _optimizer_steps(adapting, [(x, y)], covariance_refresh=3, hypergrad_lr=1e-3)
    for p, q in zip(plain.parameters(), adapting.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    moved = snapshot(adapting)
    for name, p in model.named_parameters():  # θ* = θ^old − γ·Δ, so ∂θ*/∂γ = −Δ = (θ* − θ^old)/γ
        torch.testing.assert_close(opt.state[dict(adapting.named_parameters())[name]]["gamma_sensitivity"],
                                   (moved[name] - p.detach()) / GAMMA, rtol=1e-10, atol=1e-12)  # fmt: skip
    opt.zero_grad()
    (adapting(second[0]) - second[1]).pow(2).sum(1).mean().backward()
    opt.step()
    assert set(opt.last_hypergradients) == {"0", "2"}
