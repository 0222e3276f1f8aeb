"""γ from a scale-free start (``relative_activation_lr`` ρ): γ = ρ·‖a‖/‖g‖ at the first step, checked against
norms taken with autograd, and the invariances that make it scale-free."""

import math

import pytest
import torch
from torch import nn

from locoprop import LocoPropOptimizer
from locoprop.relative_gamma import STARTED

IDENTITY = dict(local_iters=1, inner="sgd", inner_schedule="constant")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 6)).double()


def _batch(n: int = 16) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))


def _bce(output, x, scale: float = 1.0) -> torch.Tensor:
    return scale * nn.functional.binary_cross_entropy_with_logits(output, x, reduction="none").sum(1).mean()


def _unit_squares(model: nn.Module, x: torch.Tensor) -> list[tuple[float, float]]:
    """(‖a_m‖², ‖g_m‖²) per Linear m, its output and g = ∂L/∂a by autograd (no LocoProp code involved)."""
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in model if isinstance(m, nn.Linear)]
    loss = _bce(model(x), x)
    for hook in hooks:
        hook.remove()
    grads = torch.autograd.grad(loss, outputs)
    return [(o.detach().square().sum().item(), g.square().sum().item()) for o, g in zip(outputs, grads)]


def _expected_gamma(model: nn.Module, x: torch.Tensor, rho: float) -> float:
    """ρ·‖a‖/‖g‖ over every Linear's output."""
    squares = _unit_squares(model, x)
    return rho * math.sqrt(sum(a for a, _ in squares)) / math.sqrt(sum(g for _, g in squares))


def _step(model, opt, x, scale: float = 1.0) -> None:
    opt.zero_grad()
    _bce(model(x), x, scale).backward()
    opt.step()


@pytest.mark.parametrize("variant", ["M", "S"])
def test_the_first_step_sets_every_gamma_to_rho_times_the_norm_ratio(variant):
    model, x = _model(), _batch()
    expected = _expected_gamma(_model(), x, 0.05)
    opt = LocoPropOptimizer(model, variant=variant, lr=1e-3, relative_activation_lr=0.05,
                            output_activation="sigmoid" if variant == "M" else None)  # fmt: skip
    _step(model, opt, x)
    assert [group["activation_lr"] for group in opt.param_groups] == pytest.approx([expected] * 3, rel=1e-12)
    assert all(group[STARTED] for group in opt.param_groups)
    # The runner records the measured γ per unit (metrics.csv columns gamma/UNIT).
    assert opt.adapted_hyperparameters() == pytest.approx(
        {"gamma/0": expected, "gamma/2": expected, "gamma/4": expected}
    )
    # From then on γ is an ordinary value: the next steps keep it and measure nothing.
    _step(model, opt, _batch(8))
    assert [group["activation_lr"] for group in opt.param_groups] == pytest.approx([expected] * 3, rel=1e-12)
    assert opt._recorder.measure_gradients is False


@pytest.mark.parametrize("variant", ["M", "S"])
def test_the_step_is_the_same_whatever_the_scale_of_the_loss(variant):
    """L → cL gives g → cg, G → cG and γ → γ/c: the targets and the step do not change."""
    x, params = _batch(), []
    for scale in (1.0, 1e4):
        model = _model()
        opt = LocoPropOptimizer(model, variant=variant, lr=1e-3, local_iters=5, inner="adam",
                                relative_activation_lr=0.1)  # fmt: skip
        for _ in range(3):
            _step(model, opt, x, scale)
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-9, atol=1e-12)


def test_the_exact_step_is_the_same_on_a_batch_seen_twice():
    """A mean loss over the batch repeated twice: ‖a‖ grows by √2 and each g halves, so γ doubles, as does
    C = Σx̃ᵀx̃ of the exact S solve, and the step θ^old − γ·G(C + λI)⁻¹ stays (λ doubled with C)."""
    x, params = _batch(), []
    for copies, prox in ((1, 0.5), (2, 1.0)):
        model = _model()
        opt = LocoPropOptimizer(model, variant="S", solve="exact", prox=prox, relative_activation_lr=0.2)
        _step(model, opt, x.repeat(copies, 1))
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(params[1], params[0], rtol=1e-10, atol=1e-13)


def test_with_the_identity_setting_the_step_is_sgd_at_eta_times_the_measured_gamma():
    model, x = _model(), _batch()
    gamma = _expected_gamma(_model(), x, 0.3)
    reference = _model()
    sgd = torch.optim.SGD(reference.parameters(), lr=1e-3 * gamma)
    _bce(reference(x), x).backward()
    sgd.step()
    opt = LocoPropOptimizer(model, variant="S", lr=1e-3, relative_activation_lr=0.3, **IDENTITY)
    _step(model, opt, x)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13)


def test_a_skipped_step_leaves_the_start_pending():
    model, x = _model(), _batch()
    opt = LocoPropOptimizer(model, variant="S", lr=1e-3, activation_lr=7.0, relative_activation_lr=0.05)
    opt.zero_grad()
    _bce(model(x), x).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(group["activation_lr"] == 7.0 and STARTED not in group for group in opt.param_groups)
    _step(model, opt, x)
    assert opt.param_groups[0]["activation_lr"] == pytest.approx(_expected_gamma(_model(), x, 0.05), rel=1e-12)


def test_a_zero_gradient_tells_nothing_and_the_next_step_measures():
    model, x = _model(), _batch()
    opt = LocoPropOptimizer(model, variant="S", lr=1e-3, activation_lr=7.0, relative_activation_lr=0.05)
    _step(model, opt, x, scale=0.0)
    assert all(group["activation_lr"] == 7.0 and STARTED not in group for group in opt.param_groups)
    assert opt._recorder.measure_gradients is True
    before = _model()
    before.load_state_dict(model.state_dict())
    _step(model, opt, x)
    assert opt.param_groups[0]["activation_lr"] == pytest.approx(_expected_gamma(before, x, 0.05), rel=1e-12)


def test_a_checkpoint_keeps_the_measured_gamma_and_does_not_measure_again():
    model, x = _model(), _batch()
    opt = LocoPropOptimizer(model, variant="S", lr=1e-3, relative_activation_lr=0.05)
    _step(model, opt, x)
    gamma = opt.param_groups[0]["activation_lr"]
    state = opt.state_dict()
    fresh = LocoPropOptimizer(model, variant="S", lr=1e-3, relative_activation_lr=0.05)
    assert fresh._recorder.measure_gradients is True
    fresh.load_state_dict(state)
    assert fresh._recorder.measure_gradients is False
    _step(model, fresh, 3 * _batch(8))
    assert [group["activation_lr"] for group in fresh.param_groups] == [gamma] * 3


@pytest.mark.parametrize("rho", [0.0, -1.0, float("nan"), float("inf"), True, torch.tensor(0.1), "0.1"])
def test_a_bad_rho_is_refused_naming_it(rho):
    with pytest.raises(ValueError, match="relative_activation_lr"):
        LocoPropOptimizer(_model(), variant="S", relative_activation_lr=rho)


def test_a_bad_rho_set_between_steps_is_refused_and_changes_nothing():
    model, x = _model(), _batch()
    opt = LocoPropOptimizer(model, variant="S", lr=1e-3, relative_activation_lr=0.05)
    opt.param_groups[1]["relative_activation_lr"] = -2.0
    opt.zero_grad()
    _bce(model(x), x).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="relative_activation_lr: -2.0"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(group["activation_lr"] == 10.0 for group in opt.param_groups)


# ------------------------------------------------------------------ ρ̄: a cap at the first step
@pytest.mark.parametrize("variant", ["M", "S"])
def test_the_cap_lowers_a_gamma_above_it_to_rho_bar_times_the_norm_ratio_and_keeps_one_below(variant):
    x = _batch()
    cap = _expected_gamma(_model(), x, 0.05)
    for given, expected in ((100 * cap, cap), (0.01 * cap, 0.01 * cap)):
        model = _model()
        opt = LocoPropOptimizer(model, variant=variant, lr=1e-3, activation_lr=given, max_relative_activation_lr=0.05,
                                output_activation="sigmoid" if variant == "M" else None)  # fmt: skip
        _step(model, opt, x)
        assert [group["activation_lr"] for group in opt.param_groups] == pytest.approx([expected] * 3, rel=1e-12)
        assert opt.adapted_hyperparameters() == pytest.approx({f"gamma/{i}": expected for i in (0, 2, 4)})
        # Only the first step: the next one keeps γ and measures nothing.
        _step(model, opt, _batch(8))
        assert [group["activation_lr"] for group in opt.param_groups] == pytest.approx([expected] * 3, rel=1e-12)
        assert opt._recorder.measure_gradients is False


def test_with_the_cap_a_gamma_far_too_large_takes_the_step_of_the_capped_gamma():
    x = _batch()
    cap = _expected_gamma(_model(), x, 0.05)
    results = []
    for kwargs in (dict(activation_lr=1e4 * cap, max_relative_activation_lr=0.05), dict(activation_lr=cap)):
        model = _model()
        opt = LocoPropOptimizer(model, variant="M", lr=1e-2, output_activation="sigmoid", **kwargs)
        _step(model, opt, x)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], rtol=1e-10, atol=1e-14)


def test_the_cap_and_rho_together_take_the_smaller_and_the_cap_starts_hypergradients_from_below():
    x = _batch()
    ratio = _expected_gamma(_model(), x, 1.0)
    model = _model()
    opt = LocoPropOptimizer(model, variant="S", lr=1e-3, relative_activation_lr=0.2, max_relative_activation_lr=0.05)
    _step(model, opt, x)
    assert [group["activation_lr"] for group in opt.param_groups] == pytest.approx([0.05 * ratio] * 3, rel=1e-12)
    model = _model()
    opt = LocoPropOptimizer(model, variant="S", lr=1e-3, activation_lr=1e6, max_relative_activation_lr=0.05,
                            hypergrad_lr=0.1, hypergrad_rule="normalized", hypergrad="gradient")  # fmt: skip
    _step(model, opt, x)
    first = [group["activation_lr"] for group in opt.param_groups]
    assert first == pytest.approx([0.05 * ratio] * 3, rel=1e-12)
    _step(model, opt, _batch(8))
    # The second step moves each γ by its first hypergradient, by e^±0.1 (the normalized rule's first step).
    factors = [group["activation_lr"] / gamma for group, gamma in zip(opt.param_groups, first)]
    expected = [math.exp(-0.1 * math.copysign(1, h)) for h in opt.last_hypergradients.values()]
    assert factors == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("rho", [0.0, -1.0, float("nan"), float("inf"), True, torch.tensor(0.1), "0.1"])
def test_a_bad_cap_is_refused_naming_it(rho):
    with pytest.raises(ValueError, match="max_relative_activation_lr"):
        LocoPropOptimizer(_model(), variant="S", max_relative_activation_lr=rho)


# ------------------------------------------------------------------ ρ_max: a ceiling at every step, per unit
def _unit_bounds(model: nn.Module, x: torch.Tensor, rho: float) -> list[float]:
    """ρ·‖a_m‖/‖g_m‖ per Linear m."""
    return [rho * math.sqrt(a / g) for a, g in _unit_squares(model, x)]


@pytest.mark.parametrize("variant", ["M", "S"])
def test_the_ceiling_caps_each_unit_s_gamma_at_its_own_bound_at_every_step(variant):
    model, batches = _model(), [_batch(), _batch(8) * 0.5]
    kwargs = dict(variant=variant, lr=1e-3, output_activation="sigmoid" if variant == "M" else None)
    bounds = _unit_bounds(_model(), batches[0], 0.05)
    assert max(bounds) / min(bounds) > 1.5  # per unit, not one bound for all
    given = sorted(bounds)[1]  # above one unit's bound, below another's
    opt = LocoPropOptimizer(model, activation_lr=given, relative_activation_lr_ceiling=0.05, **kwargs)
    _step(model, opt, batches[0])
    expected = [min(given, bound) for bound in bounds]
    assert [group["activation_lr"] for group in opt.param_groups] == pytest.approx(expected, rel=1e-12)
    assert opt.adapted_hyperparameters() == pytest.approx({f"gamma/{i}": g for i, g in zip((0, 2, 4), expected)})
    # The next step measures again, from the model as it is now.
    later = _unit_bounds(model, batches[1], 0.05)
    _step(model, opt, batches[1])
    expected = [min(gamma, bound) for gamma, bound in zip(expected, later)]
    assert [group["activation_lr"] for group in opt.param_groups] == pytest.approx(expected, rel=1e-12)
    assert opt._recorder.measure_gradients is True


def test_the_ceiling_bounds_gamma_after_hypergradients_moved_it():
    model = _model()
    opt = LocoPropOptimizer(model, variant="S", lr=1e-3, activation_lr=1e6, relative_activation_lr_ceiling=0.05,
                            hypergrad_lr=0.1, hypergrad_rule="normalized", hypergrad="gradient")  # fmt: skip
    for n in (16, 8, 12):
        batch = torch.sigmoid(torch.randn(n, 6, generator=torch.Generator().manual_seed(n), dtype=torch.float64))
        bounds = _unit_bounds(model, batch, 0.05)
        _step(model, opt, batch)
        assert all(group["activation_lr"] <= bound * (1 + 1e-12) for group, bound in zip(opt.param_groups, bounds))
    assert opt.last_hypergradients  # the hypergradients ran


@pytest.mark.parametrize("rho", [0.0, -1.0, float("nan"), True, "0.1"])
def test_a_bad_ceiling_is_refused_naming_it(rho):
    with pytest.raises(ValueError, match="relative_activation_lr_ceiling"):
        LocoPropOptimizer(_model(), variant="S", relative_activation_lr_ceiling=rho)


def test_adaptive_gamma_does_not_depend_on_the_start_and_reaches_a_good_fixed_gammas_loss():
    from locoprop import ADAPTIVE_GAMMA

    batches = [torch.sigmoid(torch.randn(16, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64))
               for i in range(80)]  # fmt: skip

    def train(start: float, adaptive: bool) -> tuple[float, list[float]]:
        model = _model()
        opt = LocoPropOptimizer(model, variant="M", lr=1e-2, activation_lr=start, output_activation="sigmoid",
                                inner="rmsprop-tf", inner_kwargs=dict(momentum=0.9),
                                **(ADAPTIVE_GAMMA if adaptive else {}))  # fmt: skip
        losses = []
        for x in batches:
            losses.append(_bce(model(x), x).item())
            _step(model, opt, x)
        return sum(losses[-10:]) / 10, [group["activation_lr"] for group in opt.param_groups]

    good, _ = train(1.0, adaptive=False)  # 3.79 here; γ = 10: 3.85
    stuck_high, _ = train(1e6, adaptive=False)  # 4.80
    stuck_low, _ = train(1e-4, adaptive=False)  # 4.20
    from_high, gammas_high = train(1e6, adaptive=True)  # 3.78 from either start
    from_low, gammas_low = train(1e-4, adaptive=True)
    # The first step sets γ from the norms, so the given γ leaves no trace: the same run from either start.
    assert (from_high, gammas_high) == (from_low, gammas_low)
    assert from_high < min(stuck_high, stuck_low) - 0.3 and from_high == pytest.approx(good, rel=0.02)
    assert len(set(gammas_high)) > 1  # the units' γ adapted apart
