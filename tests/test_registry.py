"""The optimizer registry serves every name of SPEC §7, and every name passes one contract table."""

import copy
import dataclasses
import gc
import io
import math
import re
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_round_trip_continues, assert_same_params, snapshot, train_steps
from torch import nn

from baselines import OPTIMIZERS, CombinedOptimizer, make_optimizer, optimizer_names
from baselines.registry import check_hparams
from locoprop import LocoPropOptimizer
from sweeps.runner import contract

SPEC_NAMES = [
    "sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "rmsprop-tf", "adagrad", "kfac", "shampoo",
    "soap", "muon", "locoprop-m", "locoprop-s", "locoprop-s-exact",
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class OptimizerInfo:
    """How the contract checks run one registry optimizer (torch's OptimizerInfo, in small).

    Attributes:
        name: the registry name.
        small_problem: hyperparameters over the registry defaults for the tiny
            classifier (the defaults suit the reference autoencoder at batch 1000).
        checkpoint: hyperparameters under which every periodic computation
            (preconditioners, inverses) happens before the save and after the reload.
        adapting: hyperparameters under which it adapts hyperparameters itself
            (the runner contract's ``adapted_hyperparameters``); None where it never does.
    """

    name: str
    small_problem: dict = dataclasses.field(default_factory=dict)
    checkpoint: dict = dataclasses.field(default_factory=dict)
    adapting: dict | None = None


_LOCOPROP_SMALL = dict(lr=1e-3, activation_lr=1.0, inner_momentum=0.9)
_SHAMPOO_OFTEN = dict(lr=1e-2, start_preconditioning_step=2, preconditioning_compute_steps=2)
OPTIMIZER_INFOS = [
    OptimizerInfo("sgd"),
    OptimizerInfo("momentum"),
    OptimizerInfo("nesterov"),
    OptimizerInfo("adam"),
    OptimizerInfo("adamw"),
    OptimizerInfo("rmsprop"),
    OptimizerInfo("rmsprop-tf", dict(lr=1e-2), dict(lr=1e-2)),  # ms starts at 1: small first steps
    OptimizerInfo("adagrad"),
    OptimizerInfo("kfac", checkpoint=dict(inv_update_freq=2, fisher="sampled")),  # sampled: the RNG matters too
    OptimizerInfo("shampoo", _SHAMPOO_OFTEN, _SHAMPOO_OFTEN),
    OptimizerInfo("soap", checkpoint=dict(precondition_frequency=2)),
    OptimizerInfo("muon"),
    OptimizerInfo("locoprop-m", _LOCOPROP_SMALL, _LOCOPROP_SMALL, {**_LOCOPROP_SMALL, "hypergrad_lr": 1e-3}),
    OptimizerInfo("locoprop-s", _LOCOPROP_SMALL, _LOCOPROP_SMALL, {**_LOCOPROP_SMALL, "hypergrad_lr": 1e-3}),
    # refreshed at steps 0, 2, 4, 6: the reload at step 3 continues with the kept covariance
    OptimizerInfo(
        "locoprop-s-exact",
        checkpoint=dict(covariance_refresh=2, covariance_decay=0.5),
        adapting=dict(hypergrad_lr=1e-3),
    ),
]
CONTRACT = pytest.mark.parametrize("info", OPTIMIZER_INFOS, ids=lambda info: info.name)


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(count: int, poisoned: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Classification batches; batch ``poisoned`` holds an infinite input, so its loss and gradients are NaN."""
    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(8, 3, generator=generator)
    batches = []
    for index in range(count):
        x = torch.randn(32, 8, generator=generator)
        y = (x[:, :3] @ mixing[:3]).argmax(1)
        if index == poisoned:
            x[0, 0] = math.inf
        batches.append((x, y))
    return batches


def _cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_registry_names_are_the_spec_names_and_each_has_a_search_space():
    from sweeps.search.search_space import load_space

    assert optimizer_names() == SPEC_NAMES == [info.name for info in OPTIMIZER_INFOS]
    for name in SPEC_NAMES:
        assert load_space(name).optimizer == name  # it parses: every parameter is one the optimizer takes


# The knobs that trade cost per step for progress per step (issue 28 item 3): searched, so that tuning at
# equal time can buy more, cheaper steps.
COST_KNOBS = [
    ("locoprop-m", "local_iters"),
    ("locoprop-s", "local_iters"),
    ("locoprop-s-exact", "covariance_refresh"),
    ("kfac", "factor_update_freq"),
    ("kfac", "inv_update_freq"),
    ("shampoo", "preconditioning_compute_steps"),
    ("soap", "precondition_frequency"),
]


@pytest.mark.parametrize("name, knob", COST_KNOBS)
def test_cost_knobs_are_searched_and_each_choice_trains(name, knob):
    from optuna.distributions import CategoricalDistribution

    from sweeps.search.search_space import load_space

    space = load_space(name)
    distribution = space.distributions[knob]
    assert isinstance(distribution, CategoricalDistribution) and knob not in space.fixed
    choices = distribution.choices
    assert len(choices) >= 3 and 1 in choices and OPTIMIZERS[name].defaults[knob] in choices
    for value in (min(choices), max(choices)):
        model = _classifier()
        opt = make_optimizer(name, model, loss="cross_entropy", **{knob: value})
        batches = _batches(1) * 6
        with torch.no_grad():
            initial = _cross_entropy(model, batches[0]).item()
        train_steps(model, opt, batches, _cross_entropy)
        with torch.no_grad():
            final = _cross_entropy(model, batches[0]).item()
        assert final < initial, (name, knob, value, initial, final)


# (name, hparams, period): what the calibration times a step over (whole periods).
COST_PERIODS = [
    ("adam", {}, 1),
    ("locoprop-m", {"local_iters": 3}, 1),  # K sets the cost of every step alike
    ("kfac", {"factor_update_freq": 2, "inv_update_freq": 3}, 6),
    # (blocks of 8: the classifier's layers are below the default block size, which leaves them unpreconditioned)
    ("shampoo", {"preconditioning_compute_steps": 3, "block_size": 8}, 3),
    ("shampoo", {"preconditioning_compute_steps": 3, "block_size": 8, "start_preconditioning_step": 7}, 3),
    ("soap", {"precondition_frequency": 4}, 4),
    ("locoprop-s-exact", {"covariance_refresh": 5}, 5),
]


@pytest.mark.parametrize("name, hparams, period", COST_PERIODS)
def test_the_cost_period_is_the_period_of_the_work_the_steps_do(name, hparams, period):
    """Counted independently: the steps that do more aten operations than the others (forward, backward, step)
    recur with the declared period from the calibration's first timed step on (after its untimed ones), and
    with no shorter one: a step's cost averaged over a period prices its refreshes in exactly. (Shampoo's start
    step changes only which update is applied, not when the preconditioners are recomputed.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    from baselines.registry import cost_period
    from sweeps.runner.budget import CALIBRATION_WARMUP

    assert cost_period(name, hparams) == period

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    model = _classifier()
    opt = make_optimizer(name, model, loss="cross_entropy", **hparams)
    counts = []
    for batch in _batches(CALIBRATION_WARMUP + 3 * period):
        with Count() as count:
            count.calls = 0
            train_steps(model, opt, [batch], _cross_entropy)
        counts.append(count.calls)
    # Which timed steps do more than the lightest (a refresh's iterative matrix roots vary in length: compare
    # the pattern of refreshes, not their exact counts).
    timed = counts[CALIBRATION_WARMUP:]
    heavy = [c > min(timed) for c in timed]
    assert all(heavy[i] == heavy[i + period] for i in range(len(heavy) - period)), (name, counts)
    for shorter in range(1, period):
        assert any(heavy[i] != heavy[i + shorter] for i in range(len(heavy) - shorter)), (name, shorter, counts)


@CONTRACT
def test_every_optimizer_lowers_the_loss(info):
    model = _classifier()
    opt = make_optimizer(info.name, model, loss="cross_entropy", **info.small_problem)
    assert isinstance(opt, torch.optim.Optimizer)
    (batch,) = _batches(1)
    with torch.no_grad():
        initial = _cross_entropy(model, batch).item()
    train_steps(model, opt, [batch] * 15, _cross_entropy)
    with torch.no_grad():
        final = _cross_entropy(model, batch).item()
    assert final < initial - 0.01, (initial, final)


@CONTRACT
def test_every_state_dict_loads_with_weights_only_and_continues_bit_exactly(info):
    """A checkpoint is data: torch.load(weights_only=True) reads it, and the
    reloaded optimizer continues exactly as the uninterrupted one."""
    assert_round_trip_continues(
        _classifier,
        lambda model: make_optimizer(info.name, model, loss="cross_entropy", **info.checkpoint),
        _batches(7),
        _cross_entropy,
    )


@CONTRACT
def test_an_lr_scheduler_moves_every_groups_lr(info):
    model = _classifier()
    opt = make_optimizer(info.name, model, loss="cross_entropy", **info.small_problem)
    initial = [group["lr"] for group in opt.param_groups]
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    train_steps(model, opt, _batches(2), _cross_entropy, scheduler)
    assert [group["lr"] for group in opt.param_groups] == pytest.approx([0.25 * lr for lr in initial])


@CONTRACT
def test_an_unknown_hyperparameter_is_refused_naming_the_valid_ones(info):
    model = _classifier()
    valid = ", ".join(sorted(OPTIMIZERS[info.name].defaults))
    with pytest.raises(
        ValueError, match=re.escape(f"Unknown hyperparameter(s) for {info.name!r}: betta; it takes {valid}")
    ):
        make_optimizer(info.name, model, betta=0.9)
    assert not any(m._forward_hooks for m in model.modules()), "a refused optimizer left hooks behind"


@CONTRACT
def test_a_non_finite_gradient_neither_crashes_nor_changes_anything(info):
    """The step of a batch whose gradients are NaN is skipped and counted;
    parameters and optimizer state stay as they were, and training goes on."""
    model = _classifier()
    opt = make_optimizer(info.name, model, loss="cross_entropy", **info.checkpoint)
    batches = _batches(4, poisoned=2)
    train_steps(model, opt, batches[:2], _cross_entropy)
    params, state = snapshot(model), copy.deepcopy(opt.state_dict())
    train_steps(model, opt, batches[2:3], _cross_entropy)
    assert_same_params(model, params)
    assert opt.skipped_steps == 1 and opt.state_dict().pop("skipped_steps") == 1
    state.pop("skipped_steps")
    assert _same_state({k: v for k, v in opt.state_dict().items() if k != "skipped_steps"}, state)
    train_steps(model, opt, batches[3:], _cross_entropy)
    assert all(p.isfinite().all() for p in model.parameters())
    assert any(not torch.equal(p, params[name]) for name, p in model.named_parameters())


# ------------------------------------------------------------ the runner's contract
def _module_hooks(model: nn.Module) -> int:
    return sum(
        len(hooks)
        for module in model.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks,
                      module._backward_hooks)
    )  # fmt: skip


def _protocol_members() -> set[str]:
    """The members :class:`RunnerOptimizer` declares: its annotations and its methods."""
    methods = {name for name, value in vars(contract.RunnerOptimizer).items() if callable(value)}
    return set(contract.RunnerOptimizer.__annotations__) | {name for name in methods if not name.startswith("_")}


def test_the_contract_declares_each_member_once_and_gives_every_optional_one_a_default():
    assert not set(contract.REQUIRED) & set(contract.OPTIONAL)
    assert _protocol_members() == set(contract.REQUIRED) | set(contract.OPTIONAL)
    assert set(contract.OPTIONAL) == set(contract.DEFAULTS)


def test_an_optimizer_without_the_optional_members_gets_every_default():
    model = _classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, opt, _batches(1), _cross_entropy)
    assert contract.skipped_steps(opt) == 0
    assert contract.step_phases(opt) == ()
    assert contract.last_step_seconds(opt) == {}
    assert contract.adapted_hyperparameters(opt) == {}
    assert contract.data_parallel(opt) is False
    assert contract.bytes_sent(opt) == 0
    contract.set_synchronize_timing(opt, True)
    contract.remove_hooks(opt)
    assert not hasattr(opt, "synchronize_timing")  # left as it was
    contract.last_step_seconds(opt)["x"] = 1.0  # a copy: the default stays empty
    assert contract.last_step_seconds(opt) == {} == dict(contract.DEFAULTS["last_step_seconds"])


@CONTRACT
def test_every_optimizer_keeps_the_runner_contract(info):
    """Each optional member an optimizer has is of the contract's type (one it lacks reads as the default:
    the test above); after a step, its timed phases are exactly the ones it names."""
    model = _classifier()
    opt = make_optimizer(info.name, model, loss="cross_entropy", **info.small_problem)
    for member in contract.REQUIRED:
        assert hasattr(opt, member), member
    assert all(isinstance(group, dict) and "lr" in group for group in opt.param_groups)
    present = {member for member in contract.OPTIONAL if hasattr(opt, member)}

    phases = contract.step_phases(opt)
    assert isinstance(phases, tuple) and all(isinstance(phase, str) and phase for phase in phases), phases
    assert len(set(phases)) == len(phases) and "forward_backward" not in phases, phases
    assert type(contract.data_parallel(opt)) is bool
    assert contract.adapted_hyperparameters(opt) == {}  # it adapts nothing at these hyperparameters
    if "synchronize_timing" in present:
        assert type(opt.synchronize_timing) is bool
        contract.set_synchronize_timing(opt, False)
        assert opt.synchronize_timing is False
    assert ("step_phases" in present) == ("last_step_seconds" in present), present

    train_steps(model, opt, _batches(2), _cross_entropy)
    seconds = contract.last_step_seconds(opt)
    assert set(seconds) == set(phases), (seconds, phases)
    assert all(type(value) is float and value >= 0 for value in seconds.values()), seconds
    assert type(contract.skipped_steps(opt)) is int and contract.skipped_steps(opt) == 0
    assert type(contract.bytes_sent(opt)) is int and contract.bytes_sent(opt) == 0  # one rank: nothing sent


@CONTRACT
def test_every_optimizer_that_adapts_hyperparameters_names_the_same_columns_at_every_call(info):
    """metrics.csv's header is written before the first step: the adapted columns cannot change."""
    if info.adapting is None:
        opt = make_optimizer(info.name, _classifier(), loss="cross_entropy", **info.small_problem)
        assert not hasattr(opt, "adapted_hyperparameters")
        return
    model = _classifier()
    opt = make_optimizer(info.name, model, loss="cross_entropy", **info.adapting)
    before = contract.adapted_hyperparameters(opt)
    assert before and all(isinstance(k, str) and type(v) is float for k, v in before.items()), before
    train_steps(model, opt, _batches(2), _cross_entropy)
    after = contract.adapted_hyperparameters(opt)
    assert list(after) == list(before) and all(type(v) is float and math.isfinite(v) for v in after.values())


@CONTRACT
def test_an_optimizer_has_remove_hooks_exactly_when_it_hooks_the_model_and_it_removes_every_hook(info):
    model = _classifier()
    opt = make_optimizer(info.name, model, loss="cross_entropy", **info.small_problem)
    assert (_module_hooks(model) > 0) == hasattr(opt, "remove_hooks")
    contract.remove_hooks(opt)
    assert _module_hooks(model) == 0


@CONTRACT
def test_an_optimizer_dropped_for_a_new_one_leaves_no_hooks_and_a_watched_model_pickles(info):
    """Rebuilding an optimizer on the same model (after a learning-rate range test, a restart) must not leave the
    old one watching it: its hooks held it, so it recorded every later batch. torch.save(model) with an optimizer
    attached wrote local functions and failed; the hooks now pickle as inert ones."""
    model = _classifier()
    opt = make_optimizer(info.name, model, loss="cross_entropy", **info.small_problem)
    hooks = _module_hooks(model)
    train_steps(model, opt, _batches(1), _cross_entropy)
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    loaded(torch.randn(4, 8)).sum().backward()  # its hooks do nothing
    old = weakref.ref(opt)
    del opt
    gc.collect()
    assert old() is None and _module_hooks(model) == 0
    opt = make_optimizer(info.name, model, loss="cross_entropy", **info.small_problem)
    assert _module_hooks(model) == hooks
    train_steps(model, opt, _batches(2), _cross_entropy)


def test_locoprop_entries_take_the_output_transfer_from_the_loss_and_flat_inner_kwargs():
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 8))
    opt = make_optimizer("locoprop-m", model, loss="bce", inner_momentum=0.5)
    assert isinstance(opt, LocoPropOptimizer)
    assert opt.variant == "M"
    assert opt.units[-1].transfer.name == "sigmoid"
    assert opt.inner.defaults["momentum"] == 0.5
    assert opt.inner.defaults["decay"] == 0.9  # registry default
    exact = make_optimizer("locoprop-s-exact", copy.deepcopy(model))
    assert (exact.variant, exact.solve) == ("S", "exact")


def test_locoprop_s_exact_takes_and_searches_its_covariance_refresh():
    from sweeps.search.search_space import load_space

    model = _classifier()
    opt = make_optimizer("locoprop-s-exact", model, loss="cross_entropy", covariance_refresh=10, covariance_decay=0.9)
    assert {(g["covariance_refresh"], g["covariance_decay"]) for g in opt.param_groups} == {(10, 0.9)}
    assert OPTIMIZERS["locoprop-s-exact"].defaults["covariance_refresh"] == 1  # the exact step of every batch
    assert load_space("locoprop-s-exact").distributions["covariance_refresh"].choices == (1, 5, 10, 20)
    with pytest.raises(ValueError, match="Unknown hyperparameter.*for 'locoprop-m': covariance_refresh"):
        make_optimizer("locoprop-m", model, covariance_refresh=10)
    with pytest.raises(ValueError, match="Invalid covariance_refresh: 0"):
        make_optimizer("locoprop-s-exact", model, covariance_refresh=0)


def test_locoprop_takes_its_local_dtype_from_the_registry():
    model = _classifier()
    assert make_optimizer("locoprop-m", model, loss="cross_entropy", local_dtype="bfloat16").local_dtype == "bfloat16"
    assert make_optimizer("locoprop-s", _classifier(), loss="cross_entropy").local_dtype is None
    with pytest.raises(ValueError, match="Invalid local_dtype: 'half'"):
        make_optimizer("locoprop-m", _classifier(), local_dtype="half")


def test_muon_takes_matrices_and_adamw_the_rest():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = make_optimizer("muon", model)
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(model[2].weight), id(model[4].weight)}
    rest = [model[0].weight, model[0].bias, model[2].bias, model[3].weight, model[3].bias, model[4].bias]
    assert [id(p) for g in adamw.param_groups for p in g["params"]] == [id(p) for p in rest]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    opt.step()
    scheduler.step()
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert adamw.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_unknown_names_and_hyperparameters_are_refused_with_the_valid_ones():
    model = nn.Linear(3, 2)
    with pytest.raises(
        ValueError, match="Unknown optimizer: 'lion'; expected one of sgd, momentum, .*locoprop-s-exact"
    ):
        make_optimizer("lion", model)
    with pytest.raises(ValueError, match="Unknown hyperparameter\\(s\\) for 'adam': betas; it takes beta1, beta2, eps"):
        make_optimizer("adam", model, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="Unknown loss: 'hinge'"):
        make_optimizer("kfac", model, loss="hinge")
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        make_optimizer("locoprop-m", model, lr=-1)


def test_shampoo_state_dict_holds_plain_data_and_refuses_a_mismatch():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = make_optimizer("shampoo", model)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()["state"][0]
    assert set(state["pre_conditioner"]) == {"statistics", "pre_conditioners"}
    assert set(state["graft"]) == {"momentum"}  # the default graft (SGD) has no statistics
    other_model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    other = make_optimizer("shampoo", other_model)
    other_model(torch.randn(5, 4)).sum().backward()
    other.step()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(
        ValueError, match=r"Shampoo state \w+\.\w+ does not fit this parameter \(saved a tensor of shape"
    ):
        other.load_state_dict(opt.state_dict())
    assert _same_state(other.state_dict(), before)  # refused before anything changed


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_state, a, b))
    return a == b


# (optimizer, hyperparameters, message): a value of the wrong type, refused before anything is built.
HPARAM_TYPE_ERRORS = [
    (
        "locoprop-m",
        dict(compile="yes"),
        "Invalid hyperparameter compile='yes' for 'locoprop-m': expected true or false",
    ),
    ("adam", dict(lr=True), "Invalid hyperparameter lr=True for 'adam': expected a finite number"),
    ("adam", dict(lr=math.inf), "Invalid hyperparameter lr=inf for 'adam': expected a finite number"),
    ("sgd", dict(lr=math.nan), "Invalid hyperparameter lr=nan for 'sgd': expected a finite number"),
    ("locoprop-s", dict(prox=-math.inf), "Invalid hyperparameter prox=-inf for 'locoprop-s'"),
    ("locoprop-m", dict(lr="1e-3"), "Invalid hyperparameter lr='1e-3' for 'locoprop-m': expected a finite number"),
    ("sgd", dict(nesterov=1), "Invalid hyperparameter nesterov=1 for 'sgd': expected true or false"),
    ("sgd", dict(momentum=1.5), "Invalid hyperparameter momentum=1.5 for 'sgd': expected a number in"),
    ("rmsprop", dict(momentum=-0.1), "Invalid hyperparameter momentum=-0.1 for 'rmsprop': expected a number in"),
    ("locoprop-m", dict(inner_momentum=1.0), "Invalid hyperparameter inner_momentum=1.0 for 'locoprop-m'"),
    ("kfac", dict(inv_update_freq=2.0), "Invalid hyperparameter inv_update_freq=2.0 for 'kfac': expected an integer"),
    ("kfac", dict(kl_clip=math.inf), "kl_clip=inf for 'kfac': expected a finite number \\(or null\\)"),
    ("kfac", dict(fisher=None), "Invalid hyperparameter fisher=None for 'kfac': expected a string"),
    ("locoprop-s", dict(inner_momentum="0.9"), "inner_momentum='0.9' for 'locoprop-s': expected a finite number"),
    ("locoprop-m", dict(inner_kwargs="x"), "inner_kwargs='x' for 'locoprop-m': expected a dictionary \\(or null\\)"),
]


@pytest.mark.parametrize("name, hparams, message", HPARAM_TYPE_ERRORS, ids=lambda v: str(v)[:30])
def test_hyperparameters_of_the_wrong_type_are_refused_naming_them(name, hparams, message):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=message):
        make_optimizer(name, model, **hparams)
    assert not any(m._forward_hooks for m in model.modules()), "a refused optimizer left hooks behind"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_float_hyperparameter_refuses_non_finite_and_bool_values_and_every_switch_a_string(name):
    spec = OPTIMIZERS[name]
    for hparam in spec.defaults:
        expected = spec.expected_type(hparam)
        assert expected in (bool, int, float, str, dict, list), (hparam, expected)  # the types check_hparams knows
        bad = {float: [math.inf, -math.inf, math.nan, True], int: [1.5, True], bool: ["yes", 1, "false"]}
        for value in bad.get(expected, []):
            with pytest.raises(ValueError, match=f"Invalid hyperparameter {hparam}={value!r} for {name!r}"):
                check_hparams(name, {hparam: value})


def test_values_of_the_right_type_pass():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    assert make_optimizer("adam", model, lr=1).param_groups[0]["lr"] == 1  # an integer is a number
    make_optimizer("kfac", model, loss="cross_entropy", kl_clip=None, inv_update_freq=3).remove_hooks()
    make_optimizer("locoprop-s", model, inner_momentum=None, inner_kwargs={"decay": 0.5}).remove_hooks()
    for name in SPEC_NAMES:  # every default has its own type
        check_hparams(name, dict(OPTIMIZERS[name].defaults))
