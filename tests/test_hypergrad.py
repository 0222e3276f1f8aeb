"""Hypergradients of γ (SPEC §12) against independent computations: central finite differences of the
next loss in one unit's γ (step t−1 re-run from its saved state), and the two sensitivities against each other."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locoprop import LocoPropOptimizer
from locoprop.hypergrad import MAX_FACTOR, NORMALIZED_DECAYS, adapted_activation_lr, normalized_activation_lr
from locoprop.inner import INNER_NAMES


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 6)).double()


def _batches(count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(16, 6, generator=generator, dtype=torch.float64) for _ in range(count)]


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(x), torch.sigmoid(x))


def _step(model, opt, x) -> None:
    opt.zero_grad()
    _loss(model, x).backward()
    opt.step()


def _optimizer_kwargs(**overrides) -> dict:
    # β tiny: the sensitivities are computed, γ does not move (factor exp(−1e-30·h·γ) = 1 in float64).
    kwargs = dict(variant="M", lr=0.01, activation_lr=1.0, local_iters=5, inner="rmsprop-tf",
                  output_activation="sigmoid", hypergrad_lr=1e-30, hypergrad="unrolled")  # fmt: skip
    return {**kwargs, **overrides}


def _hypergradients_and_differences(kwargs: dict, eps: float = 1e-5) -> list[tuple[float, float]]:
    """(h, (L(γ+ε) − L(γ−ε))/2ε) per unit: h from the optimizer at step 2 for step 1's γ; the difference from
    step 1 re-run from the state after step 0 with one unit's γ moved, then the loss of step 2's batch."""
    batches = _batches()
    model = _model()
    opt = LocoPropOptimizer(model, **kwargs)
    _step(model, opt, batches[0])  # inner state that is not the initial one
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _step(model, opt, batches[1])
    _step(model, opt, batches[2])
    pairs = []
    for index, unit in enumerate(opt.units):
        losses = []
        for sign in (1, -1):
            again = _model()
            again.load_state_dict(saved_model)
            rerun = LocoPropOptimizer(again, **kwargs)
            rerun.load_state_dict(copy.deepcopy(saved_opt))  # (loading shares the state's tensors: copy)
            rerun.param_groups[index]["activation_lr"] += sign * eps
            _step(again, rerun, batches[1])
            with torch.no_grad():
                losses.append(_loss(again, batches[2]).item())
        pairs.append((opt.last_hypergradients[unit.name], (losses[0] - losses[1]) / (2 * eps)))
    return pairs


def _assert_match(pairs, rel=1e-5):
    for h, difference in pairs:
        assert h == pytest.approx(difference, rel=rel, abs=1e-10), pairs
    assert any(abs(h) > 1e-6 for h, _ in pairs)  # a test of something: the hypergradients are not all zero


@pytest.mark.parametrize("parallel", ["none", "batched"])
def test_exact_s_closed_form_equals_finite_differences(parallel):
    kwargs = _optimizer_kwargs(variant="S", solve="exact", prox=1.0, parallel=parallel, hypergrad="implicit")
    _assert_match(_hypergradients_and_differences(kwargs))


@pytest.mark.parametrize("inner", INNER_NAMES)
def test_unrolled_m_equals_finite_differences_for_every_inner_optimizer(inner):
    lr = 0.05 if inner in ("sgd", "momentum", "nesterov") else 0.01
    _assert_match(_hypergradients_and_differences(_optimizer_kwargs(inner=inner, lr=lr)))


@pytest.mark.parametrize("inner", ["rmsprop-tf", "adam"])
def test_unrolled_s_with_prox_equals_finite_differences(inner):
    _assert_match(_hypergradients_and_differences(_optimizer_kwargs(variant="S", inner=inner, prox=0.3)))


def test_unrolled_follows_weight_decay_and_an_inner_schedule():
    kwargs = _optimizer_kwargs(inner="adam", inner_kwargs=dict(weight_decay=0.1), inner_schedule="constant")
    _assert_match(_hypergradients_and_differences(kwargs))


@pytest.mark.parametrize("variant", ["M", "S"])
def test_implicit_equals_finite_differences_when_the_local_solve_converges(variant):
    # K = 400 SGD steps with λ > 0 reach the local optimum; CG with 60 steps solves H s = −Jᵀg.
    kwargs = _optimizer_kwargs(variant=variant, inner="sgd", lr=0.05, local_iters=400, prox=0.5,
                               hypergrad="implicit", hypergrad_iters=60)  # fmt: skip
    _assert_match(_hypergradients_and_differences(kwargs), rel=1e-3)


def _sensitivities(mode: str, local_iters: int) -> torch.Tensor:
    model = _model()
    opt = LocoPropOptimizer(model, **_optimizer_kwargs(inner="sgd", lr=0.05, local_iters=local_iters, prox=0.5,
                                                       hypergrad=mode, hypergrad_iters=60))  # fmt: skip
    _step(model, opt, _batches(1)[0])
    return torch.cat([opt.state[p]["gamma_sensitivity"].reshape(-1) for p in model.parameters()])


def test_implicit_and_unrolled_agree_as_k_grows():
    gaps = []
    for k in (3, 30, 300):
        implicit, unrolled = _sensitivities("implicit", k), _sensitivities("unrolled", k)
        gaps.append(((implicit - unrolled).norm() / unrolled.norm()).item())
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert gaps[2] < 1e-2 < 1 < gaps[0], gaps  # 480%, 82%, 0.4% here


@pytest.mark.parametrize("variant", ["M", "S"])
def test_gradient_is_the_direction_of_the_first_conjugate_gradient_step_of_implicit(variant):
    # One CG step from 0 on H s = −G gives s = −(⟨G, G⟩/⟨G, HG⟩)·G: "gradient" is that direction, free.
    sensitivities = {}
    for mode in ("gradient", "implicit"):
        model = _model()
        opt = LocoPropOptimizer(model, **_optimizer_kwargs(variant=variant, hypergrad=mode, hypergrad_iters=1,
                                                           hypergrad_rule="normalized"))  # fmt: skip
        x = _batches(1)[0]
        opt.zero_grad()
        _loss(model, x).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
        sensitivities[mode] = [opt.state[p]["gamma_sensitivity"] for p in model.parameters()]
    for unit in range(3):  # per unit: weight and bias together
        gradient = torch.cat([s.reshape(-1) for s in sensitivities["gradient"][2 * unit : 2 * unit + 2]])
        implicit = torch.cat([s.reshape(-1) for s in sensitivities["implicit"][2 * unit : 2 * unit + 2]])
        handed = torch.cat([g.reshape(-1) for g in grads[2 * unit : 2 * unit + 2]])
        assert torch.allclose(gradient, -handed, rtol=1e-12, atol=0)
        cosine = torch.dot(gradient, implicit) / (gradient.norm() * implicit.norm())
        assert cosine.item() == pytest.approx(1.0, abs=1e-10)


def test_gradient_with_the_plain_rule_is_refused_naming_both():
    with pytest.raises(ValueError, match="hypergrad='gradient' with hypergrad_rule='plain'"):
        LocoPropOptimizer(_model(), **_optimizer_kwargs(hypergrad="gradient"))
    # At β = 0 nothing is computed, so nothing is refused.
    LocoPropOptimizer(_model(), **_optimizer_kwargs(hypergrad="gradient", hypergrad_lr=0.0))


@pytest.mark.parametrize("rule", ["plain", "normalized"])
def test_a_shared_scope_moves_every_gamma_by_one_factor_from_the_sum_of_the_units_log_gradients(rule):
    # γ_m = c·γ_m⁰: ∂L/∂log c = Σ_m h_m·γ_m (each h_m checked against finite differences above); plain:
    # c ← c·exp(−β·Σ h γ); normalized, first step: c ← c·e^(−β·sign Σ h γ).
    model = _model()
    beta = 100.0 if rule == "plain" else 0.1
    opt = LocoPropOptimizer(model, **_optimizer_kwargs(hypergrad_lr=beta, hypergrad="implicit", hypergrad_rule=rule,
                                                       hypergrad_scope="shared"))  # fmt: skip
    for group, gamma in zip(opt.param_groups, (1.0, 2.0, 4.0)):
        group["activation_lr"] = gamma
    batches = _batches()
    _step(model, opt, batches[0])
    _step(model, opt, batches[1])
    h = opt.last_hypergradients
    u = h["0"] * 1.0 + h["2"] * 2.0 + h["4"] * 4.0
    factor = math.exp(-beta * u) if rule == "plain" else math.exp(-beta * math.copysign(1, u))
    assert 1 / MAX_FACTOR < factor < MAX_FACTOR and factor != pytest.approx(1.0, abs=1e-3)
    assert [g["activation_lr"] for g in opt.param_groups] == pytest.approx([factor, 2 * factor, 4 * factor],
                                                                            rel=1e-9)  # fmt: skip


def test_a_shared_scope_with_different_betas_is_refused_and_changes_nothing():
    model = _model()
    opt = LocoPropOptimizer(model, **_optimizer_kwargs(hypergrad_lr=0.1, hypergrad_rule="normalized",
                                                       hypergrad_scope="shared"))  # fmt: skip
    batches = _batches()
    _step(model, opt, batches[0])
    opt.param_groups[1]["hypergrad_lr"] = 0.2
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _loss(model, batches[1]).backward()
    with pytest.raises(ValueError, match=r"hypergrad_lr differ: \[0.1, 0.2\]"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert [g["activation_lr"] for g in opt.param_groups] == [1.0] * 3


def test_zero_hypergrad_lr_computes_nothing():
    model = _model()
    opt = LocoPropOptimizer(model, **_optimizer_kwargs(hypergrad_lr=0.0))
    for x in _batches():
        _step(model, opt, x)
    assert not any(opt.state[p] for p in model.parameters())  # no sensitivities
    assert opt.last_hypergradients == {}
    assert opt.adapted_hyperparameters() == {}
    assert [g["activation_lr"] for g in opt.param_groups] == [1.0] * 3


def test_gamma_moves_against_the_hypergradient_by_at_most_the_clip_factor():
    model = _model()
    opt = LocoPropOptimizer(model, **_optimizer_kwargs(hypergrad_lr=1e6, hypergrad="implicit"))
    generator = torch.Generator().manual_seed(2)
    moved = 0
    for _ in range(6):
        before = [g["activation_lr"] for g in opt.param_groups]
        _step(model, opt, torch.randn(16, 6, generator=generator, dtype=torch.float64))
        for group, unit, gamma in zip(opt.param_groups, opt.units, before):
            if unit.name not in opt.last_hypergradients:
                continue
            h, ratio = opt.last_hypergradients[unit.name], group["activation_lr"] / gamma
            assert 1 / MAX_FACTOR - 1e-12 <= ratio <= MAX_FACTOR + 1e-12
            assert math.copysign(1, math.log(ratio)) == -math.copysign(1, h)
            moved += ratio != 1
    assert moved >= 6
    assert set(opt.adapted_hyperparameters()) == {f"gamma/{u.name}" for u in opt.units}


def test_adapted_activation_lr_is_a_clipped_multiplicative_step():
    assert adapted_activation_lr(2.0, 0.1, 0.5) == pytest.approx(2.0 * math.exp(-0.5 * 0.1 * 2.0))
    assert adapted_activation_lr(2.0, 1e9, 1.0) == pytest.approx(2.0 / MAX_FACTOR)
    assert adapted_activation_lr(2.0, -1e9, 1.0) == pytest.approx(2.0 * MAX_FACTOR)
    assert adapted_activation_lr(2.0, 5.0, 0.0) == 2.0


def test_the_normalized_rule_is_an_adam_step_on_log_gamma_whatever_the_loss_scale():
    """Written out: m, v running averages of u = h·γ, bias-corrected, log γ moved by −β·m̂/√v̂."""
    rho1, rho2 = NORMALIZED_DECAYS
    for scale in (1.0, 1e-6, 1e6):  # the loss scaled by c scales every h by c: the same γ, every step
        gamma, moments, m, v = 0.5, [0.0, 0.0, 0], 0.0, 0.0
        expected = 0.5
        for t, h in enumerate([2.0, -1.0, 0.5, 0.5], start=1):
            u = h * expected  # the gradient in log γ, unscaled
            m, v = rho1 * m + (1 - rho1) * u, rho2 * v + (1 - rho2) * u * u
            expected *= math.exp(-0.1 * (m / (1 - rho1**t)) / math.sqrt(v / (1 - rho2**t)))
            gamma = normalized_activation_lr(gamma, scale * h, 0.1, moments)
            assert gamma == pytest.approx(expected, rel=1e-12)
        assert moments[2] == 4
    # The first step moves log γ by exactly β against the sign of h; a zero hypergradient moves nothing.
    assert normalized_activation_lr(2.0, 123.0, 0.3, [0.0, 0.0, 0]) == pytest.approx(2.0 * math.exp(-0.3))
    assert normalized_activation_lr(2.0, 0.0, 0.3, [0.0, 0.0, 0]) == 2.0
    assert normalized_activation_lr(2.0, -1.0, 5.0, [0.0, 0.0, 0]) == pytest.approx(2.0 * MAX_FACTOR)


@pytest.mark.parametrize("loss_scale", [1.0, 1e4])
def test_with_the_normalized_rule_gamma_first_moves_by_beta_at_any_loss_scale(loss_scale):
    model = _model()
    opt = LocoPropOptimizer(model, **_optimizer_kwargs(hypergrad_lr=0.2, hypergrad="implicit",
                                                       hypergrad_rule="normalized"))  # fmt: skip
    for x in _batches(2):
        before = [g["activation_lr"] for g in opt.param_groups]
        opt.zero_grad()
        (loss_scale * _loss(model, x)).backward()
        opt.step()
    assert set(opt.last_hypergradients) == {u.name for u in opt.units}
    for group, unit, gamma in zip(opt.param_groups, opt.units, before):
        h = opt.last_hypergradients[unit.name]
        assert group["activation_lr"] == pytest.approx(gamma * math.exp(-0.2 * math.copysign(1, h)), rel=1e-12)
        assert opt.state[unit.weight]["log_gamma_moments"][2] == 1


def test_the_normalized_rule_s_moments_are_checkpointed_and_restored_by_a_refused_step(monkeypatch):
    batches = _batches(6)
    kwargs = _optimizer_kwargs(hypergrad_lr=0.3, hypergrad="implicit", hypergrad_rule="normalized")
    model = _model()
    opt = LocoPropOptimizer(model, **kwargs)
    for x in batches[:3]:
        _step(model, opt, x)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    moments = {u.name: list(opt.state[u.weight]["log_gamma_moments"]) for u in opt.units}
    gammas = [g["activation_lr"] for g in opt.param_groups]
    monkeypatch.setattr("locoprop.optimizer.solve_iterative", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _step(model, opt, batches[3])
    assert {u.name: opt.state[u.weight]["log_gamma_moments"] for u in opt.units} == moments
    assert [g["activation_lr"] for g in opt.param_groups] == gammas
    monkeypatch.undo()
    for x in batches[3:]:
        _step(model, opt, x)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = _model()
    again.load_state_dict(saved["model"])
    reloaded = LocoPropOptimizer(again, **kwargs)
    reloaded.load_state_dict(saved["opt"])
    for x in batches[3:]:
        _step(again, reloaded, x)
    assert [g["activation_lr"] for g in reloaded.param_groups] == [g["activation_lr"] for g in opt.param_groups]
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("hypergrad_lr, climbs", [(0.0, False), (1e4, True)])
def test_gamma_climbs_from_a_start_far_too_small_and_the_loss_follows(hypergrad_lr, climbs):
    # γ = 1e-3 barely moves the targets: 40 steps leave the loss where it was unless γ adapts.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 10))
    opt = LocoPropOptimizer(model, variant="M", lr=1e-2, activation_lr=1e-3, inner="rmsprop-tf",
                            output_activation="identity", hypergrad_lr=hypergrad_lr)  # fmt: skip
    generator = torch.Generator().manual_seed(4)
    mixing = torch.randn(10, 10, generator=generator)
    losses = []
    for _ in range(40):
        x = torch.randn(64, 10, generator=generator)
        opt.zero_grad()
        loss = F.mse_loss(model(x), x @ mixing)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    gammas = [g["activation_lr"] for g in opt.param_groups]
    assert all(gamma > 1 for gamma in gammas) == climbs, gammas  # 10.6 and 1975 here
    assert (losses[-1] < 0.2 * losses[0]) == climbs, losses  # 10.7 to 0.49 here


@pytest.mark.parametrize("mode", ["implicit", "unrolled", "gradient"])
def test_state_dict_round_trip_continues_with_the_same_gamma_and_parameters(mode):
    batches = _batches(6)
    rule = "normalized" if mode == "gradient" else "plain"
    kwargs = _optimizer_kwargs(hypergrad_lr=50.0 if rule == "plain" else 0.3, hypergrad=mode, hypergrad_rule=rule)
    model = _model()
    opt = LocoPropOptimizer(model, **kwargs)
    for x in batches[:3]:
        _step(model, opt, x)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for x in batches[3:]:
        _step(model, opt, x)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = _model()
    again.load_state_dict(saved["model"])
    reloaded = LocoPropOptimizer(again, **kwargs)
    reloaded.load_state_dict(saved["opt"])
    for x in batches[3:]:
        _step(again, reloaded, x)
    assert [g["activation_lr"] for g in reloaded.param_groups] == [g["activation_lr"] for g in opt.param_groups]
    assert len({g["activation_lr"] for g in opt.param_groups}) > 1  # γ adapted, per unit
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert reloaded.last_hypergradients == opt.last_hypergradients


def test_a_non_finite_hypergradient_skips_the_step_and_changes_nothing():
    model = _model()
    opt = LocoPropOptimizer(model, **_optimizer_kwargs(hypergrad_lr=1.0))
    batches = _batches()
    _step(model, opt, batches[0])
    opt.state[model[0].weight]["gamma_sensitivity"][0, 0] = math.nan
    params = [p.detach().clone() for p in model.parameters()]
    gammas = [g["activation_lr"] for g in opt.param_groups]
    _step(model, opt, batches[1])
    assert opt.skipped_steps == 1
    assert [g["activation_lr"] for g in opt.param_groups] == gammas
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_a_step_refused_after_gamma_moved_restores_gamma(monkeypatch):
    model = _model()
    opt = LocoPropOptimizer(model, **_optimizer_kwargs(hypergrad_lr=1e3))
    batches = _batches()
    _step(model, opt, batches[0])
    gammas = [g["activation_lr"] for g in opt.param_groups]

    def fail(*args):
        assert [g["activation_lr"] for g in opt.param_groups] != gammas  # γ had moved
        raise RuntimeError("refused")

    monkeypatch.setattr("locoprop.optimizer.solve_iterative", fail)
    with pytest.raises(RuntimeError, match="refused"):
        _step(model, opt, batches[1])
    assert [g["activation_lr"] for g in opt.param_groups] == gammas


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hypergrad="forward"), "Invalid hypergrad: 'forward'"),
        (dict(hypergrad_iters=0), "Invalid hypergrad_iters: 0"),
        (dict(hypergrad_rule="adam"), "Invalid hypergrad_rule: 'adam'; expected one of plain, normalized"),
        (dict(hypergrad_scope="layer"), "Invalid hypergrad_scope: 'layer'; expected one of unit, shared"),
        (dict(hypergrad_lr=-1.0), "Invalid hypergrad_lr: -1.0"),
        (dict(hypergrad_lr=math.nan), "Invalid hypergrad_lr: nan"),
        (dict(inner=torch.optim.AdamW), "AdamW is none of them"),
        (dict(inner="adam", inner_kwargs=dict(amsgrad=True)), "amsgrad=True"),
    ],
)
def test_bad_hypergradient_settings_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LocoPropOptimizer(_model(), **_optimizer_kwargs(**kwargs))


def test_implicit_works_with_any_inner_optimizer_and_tied_weights_are_refused():
    LocoPropOptimizer(_model(), **_optimizer_kwargs(inner=torch.optim.AdamW, hypergrad="implicit"))
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.raises(ValueError, match="tied weights"):
        LocoPropOptimizer(nn.Sequential(first, nn.Tanh(), second), hypergrad_lr=0.1)


def test_raising_hypergrad_lr_in_param_groups_later_is_checked_at_the_step():
    model = _model()
    opt = LocoPropOptimizer(model, **_optimizer_kwargs(hypergrad_lr=0.0, inner=torch.optim.AdamW))
    opt.param_groups[0]["hypergrad_lr"] = 0.1
    with pytest.raises(ValueError, match="AdamW"):
        _step(model, opt, _batches(1)[0])
    assert opt.param_groups[0]["activation_lr"] == 1.0


def test_conv_units_take_the_generic_jacobian_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)).double()
    generator = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 2, 4, 4, generator=generator, dtype=torch.float64),
                torch.randint(0, 2, (8,), generator=generator)) for _ in range(3)]  # fmt: skip
    results = {}
    for mode in ("implicit", "unrolled"):
        torch.manual_seed(0)
        model_copy = copy.deepcopy(model)
        opt = LocoPropOptimizer(model_copy, variant="S", lr=0.05, local_iters=300, inner="sgd", prox=0.5,
                                output_activation="softmax", hypergrad_lr=1e-30, hypergrad=mode,
                                hypergrad_iters=80)  # fmt: skip
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model_copy(x), y).backward()
            opt.step()
        results[mode] = opt.last_hypergradients
    for name, h in results["unrolled"].items():
        assert results["implicit"][name] == pytest.approx(h, rel=1e-3), results


# ------------------------------------------------------------ in the harness
@pytest.mark.parametrize("optimizer", ["locoprop-m", "locoprop-s", "locoprop-s-exact"])
def test_the_hypergrad_spaces_search_beta_and_fix_gamma(optimizer):
    import optuna

    from baselines import make_optimizer
    from sweeps.search.search_space import SPACES_DIR, load_space

    space = load_space(optimizer, SPACES_DIR / "hypergrad" / f"{optimizer}.yaml")
    assert "hypergrad_lr" in space.distributions and "activation_lr" not in space.distributions
    params = optuna.create_study().ask(space.distributions).params
    opt = make_optimizer(optimizer, _model().float(), loss="bce", **space.to_hparams(params))
    assert opt.param_groups[0]["hypergrad_lr"] == params["hypergrad_lr"] > 0
    assert opt.param_groups[0]["activation_lr"] == space.fixed["activation_lr"] < 10


def test_a_sweep_searches_beta_and_records_gamma_per_unit(tmp_path):
    from sweeps.commands.cli import main
    from sweeps.runner import run_directory
    from sweeps.search.search_space import SPACES_DIR

    optimizer = "locoprop-m"
    space = SPACES_DIR / "hypergrad" / f"{optimizer}.yaml"
    code = main(["sweep", "--backend", "optuna", "--optimizer", optimizer, "--space", str(space),
                 "--workload", "autoencoder", "--data", "synthetic", "--width-mult", "0.05", "--batch-size", "64",
                 "--epochs", "1", "--trials", "2", "--study", "hg", "--out", str(tmp_path),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    runs = [path.parent for path in tmp_path.rglob(run_directory.CONFIG)]
    assert len(runs) == 2
    betas = set()
    for run in runs:
        config = run_directory.read_json(run / run_directory.CONFIG)
        assert config["hparams"]["activation_lr"] == 0.3  # γ starts where the space fixes it...
        betas.add(config["hparams"]["hypergrad_lr"])  # ...and β is what the sweep draws
        history = run_directory.read_history(run / run_directory.METRICS)
        gammas = [{k: v for k, v in row.items() if k.startswith("gamma/")} for row in history]
        assert gammas[0] and all(set(g) == set(gammas[0]) for g in gammas)  # a column per unit, every row
        assert any(v != 0.3 for v in gammas[-1].values())  # ...and γ moved
    assert len(betas) == 2
