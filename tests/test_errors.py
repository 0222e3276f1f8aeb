"""Bad input: a clear error naming the value, and nothing changed (SPEC §3)."""

import copy
import inspect
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_params, backprop_sgd_step, snapshot
from torch import nn

from locoprop import LocoPropOptimizer


def _mlp(activation=None):
    return nn.Sequential(nn.Linear(4, 3), activation or nn.Tanh(), nn.Linear(3, 2))


def _conv():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))


CONSTRUCTION_ERRORS = [
    (dict(variant="X"), "Invalid variant: 'X'"),
    (dict(variant="m"), "Invalid variant: 'm'"),
    (dict(lr=0.0), "Invalid learning rate: 0.0"),
    (dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    (dict(activation_lr=0), "Invalid activation_lr: 0"),
    (dict(activation_lr=-2.0), "Invalid activation_lr: -2.0"),
    (dict(local_iters=0), "Invalid local_iters: 0"),
    (dict(local_iters=2.5), "Invalid local_iters: 2.5"),
    (dict(inner="lion"), "Unknown inner optimizer: 'lion'"),
    (dict(inner=nn.Linear), "Unknown inner optimizer: <class"),
    (dict(inner_kwargs={"bogus": 1}), "Invalid inner_kwargs for inner optimizer 'rmsprop'"),
    (dict(inner_schedule="cosine"), "Invalid inner_schedule: 'cosine'"),
    (dict(prox=-1.0), "Invalid prox: -1.0"),
    (dict(lr=float("inf")), "Invalid learning rate: inf"),
    (dict(lr=float("nan")), "Invalid learning rate: nan"),
    (dict(lr=True), "Invalid learning rate: True"),
    (dict(lr=torch.tensor(1e-3)), "Invalid learning rate: a tensor (tensor(0.0010)); LocoPropOptimizer needs a float"),
    (dict(activation_lr=torch.tensor(2.0)), "Invalid activation_lr: a tensor (tensor(2.)); LocoPropOptimizer needs a"),
    (dict(activation_lr=float("inf")), "Invalid activation_lr: inf"),
    (dict(activation_lr=True), "Invalid activation_lr: True"),
    (dict(prox=float("inf")), "Invalid prox: inf"),
    (dict(compile="yes"), "Invalid compile: 'yes'; expected True or False"),
    (dict(solve="newton"), "Invalid solve: 'newton'"),
    (dict(solve="exact", variant="M"), "solve='exact' needs variant 'S'"),
    (dict(solve="exact", variant="S", prox=0.0), "solve='exact' needs prox > 0"),
    (dict(output_activation="gelu"), "Invalid output_activation: 'gelu'"),
    (dict(solve="exact", variant="S", prox=1.0, covariance_refresh=0), "Invalid covariance_refresh: 0; expected an"),
    (dict(solve="exact", variant="S", prox=1.0, covariance_refresh=-3), "Invalid covariance_refresh: -3"),
    (dict(solve="exact", variant="S", prox=1.0, covariance_refresh=2.0), "Invalid covariance_refresh: 2.0"),
    (dict(solve="exact", variant="S", prox=1.0, covariance_refresh=True), "Invalid covariance_refresh: True"),
    (dict(solve="exact", variant="S", prox=1.0, covariance_decay=1.0), "Invalid covariance_decay: 1.0; expected a"),
    (dict(solve="exact", variant="S", prox=1.0, covariance_decay=-0.1), "Invalid covariance_decay: -0.1"),
    (dict(solve="exact", variant="S", prox=1.0, covariance_decay=True), "Invalid covariance_decay: True"),
    (dict(solve="exact", variant="S", prox=1.0, covariance_decay=float("nan")), "Invalid covariance_decay: nan"),
    (dict(covariance_refresh=10), "covariance_refresh=10 applies to solve='exact' only"),
    (dict(variant="S", covariance_decay=0.9), "covariance_decay=0.9 applies to solve='exact' only"),
    (dict(units=[(nn.Linear(2, 2), "tanh")]), "is not a submodule of the model"),
    (dict(units=["tanh"]), "Invalid unit 'tanh'"),
    (dict(units=[("0", "tanh")]), "is not a submodule"),
    (dict(inner_kwargs={"lr": 123.0}), "Invalid inner_kwargs: lr=123.0; the inner learning rate is the optimizer's lr"),
]


@pytest.mark.parametrize("kwargs, message", CONSTRUCTION_ERRORS, ids=lambda v: str(v)[:40])
def test_bad_arguments_raise_value_error_and_leave_the_model_alone(kwargs, message):
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=_literal(message)):
        LocoPropOptimizer(model, **kwargs)
    assert_same_params(model, before)
    assert not any(m._forward_hooks for m in model.modules()), "a refused optimizer left hooks behind"


@pytest.mark.parametrize("activation", [nn.GELU(), nn.SiLU()], ids=lambda m: type(m).__name__)
def test_variant_m_takes_the_s_target_for_a_non_monotone_transfer_and_says_so(activation):
    """A unit followed by GELU or SiLU has no convex integral: variant M solves it with the S target
    (never as identity), warns once naming it, and describe() shows the variant of every unit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), activation, nn.Linear(3, 2)).double()
    name = type(activation).__name__
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    kwargs = dict(lr=0.05, activation_lr=2.0, local_iters=3, inner="sgd")
    results = {}
    for variant in ("M", "S"):
        m = copy.deepcopy(model)
        opt = LocoPropOptimizer(m, variant=variant, **kwargs)
        F.cross_entropy(m(x), y).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        said = [str(w.message) for w in caught if "takes the S target" in str(w.message)]
        results[variant] = (m, opt, said)
    m, opt, said = results["M"]
    assert len(said) == 1 and f"'2' ({name})" in said[0]
    rows = {row.unit: row for row in opt.describe().rows}
    assert (rows["0"].transfer, rows["0"].variant) == ("tanh", "M")
    assert (rows["2"].transfer, rows["2"].variant) == (name, "S")
    # Unit '2' took exactly the S step; unit '0' the M step (it differs from S's).
    s_model = results["S"][0]
    torch.testing.assert_close(m[2].weight, s_model[2].weight, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(m[0].weight, s_model[0].weight)
    # No second warning for the same unit.
    F.cross_entropy(m(x), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert not [w for w in caught if "takes the S target" in str(w.message)]


def test_unit_errors():
    with pytest.raises(ValueError, match=_literal("solve='exact' supports nn.Linear units only; unit '0' is a Conv2d")):
        LocoPropOptimizer(_conv(), variant="S", solve="exact", prox=1.0)
    conv = nn.Conv2d(1, 2, 3)
    with pytest.raises(
        ValueError, match=_literal("Softmax over the last dimension does not apply to Conv2d unit 'Conv2d'")
    ):
        LocoPropOptimizer(conv, variant="M", units=[(conv, nn.Softmax(dim=-1))])
    LocoPropOptimizer(conv, variant="S", units=[(conv, nn.Softmax(dim=-1))])  # (S reads no transfer function)
    with pytest.raises(ValueError, match=_literal("no trainable weight to use as a unit")):
        LocoPropOptimizer(nn.Sequential(nn.LayerNorm(4)))
    model = _mlp()
    with pytest.raises(ValueError, match=r"Units listed more than once: \['0'\]"):
        LocoPropOptimizer(model, units=[(model[0], "tanh"), (model[0], "tanh")])
    with pytest.raises(ValueError, match=_literal("Unit '1' is a Tanh, which holds no 'weight'")):
        LocoPropOptimizer(model, units=[(model[1], "tanh")])
    with pytest.raises(TypeError, match="needs the model"):
        LocoPropOptimizer(list(model.parameters()))


def test_frozen_layers_are_not_units():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    opt = LocoPropOptimizer(model)
    assert opt.parameter_roles() == {"0.bias": "backprop", "2.weight": "2", "2.bias": "2"}
    with pytest.raises(ValueError, match=r"a frozen weight \(requires_grad=False\): \['0'\]"):
        LocoPropOptimizer(model, units=[(model[0], "tanh")])


def test_step_before_any_backward_pass():
    model = _mlp()
    opt = LocoPropOptimizer(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="called before any backward pass"):
        opt.step()
    model(torch.randn(5, 4))  # a forward alone is not enough
    with pytest.raises(RuntimeError, match="called before any backward pass"):
        opt.step()
    assert_same_params(model, before)


def test_a_closure_that_skips_its_batch_takes_no_step():
    """A closure that returns no loss and leaves no gradient (Lightning's ``training_step`` returning None) is a
    step of nothing, as with torch's optimizers; the next batch's step is the plain one."""
    model = _mlp()
    opt = LocoPropOptimizer(model, lr=1e-2)
    x = torch.randn(5, 4)
    before = snapshot(model)

    def skipped():
        model(x)  # its forward ran; its loss was None, so no backward
        opt.zero_grad()

    assert opt.step(skipped) is None
    assert_same_params(model, before)
    reference = copy.deepcopy(model)
    reference_opt = LocoPropOptimizer(reference, lr=1e-2)
    for net, optimizer in ((model, opt), (reference, reference_opt)):
        optimizer.zero_grad()
        net(x).square().sum().backward()
        optimizer.step()
    assert_same_params(model, snapshot(reference))


def test_when_no_weight_is_used_in_a_linear_map_nothing_is_said_to_be_local():
    """Weight norm computes every convolution's weight from g and v, so no unit is ever seen: after the first
    forward describe() says 0% local, parameter_roles() says backprop, and the first step warns (it reported
    every unit local while the training was the inner optimizer's on every parameter)."""
    weight_norm = nn.utils.parametrizations.weight_norm
    model = nn.Sequential(weight_norm(nn.Conv1d(1, 4, 3, padding=1)), nn.Tanh(), weight_norm(nn.Conv1d(4, 1, 3)))
    opt = LocoPropOptimizer(model, variant="M")
    assert opt.describe().local_share > 0.8  # before any forward: every unit counts
    model(torch.randn(2, 1, 8)).square().sum().backward()
    assert opt.describe().local_share == 0.0
    assert set(opt.parameter_roles().values()) == {"backprop"}
    with pytest.warns(UserWarning, match="Only 0% of the model's trainable parameters are solved locally"):
        opt.step()


@pytest.mark.parametrize("scheduled", [False, True], ids=["", "with-lr-scheduler"])
def test_warnings_of_a_step_name_the_callers_line(scheduled):
    """(Whatever wraps the step: torch.no_grad, torch's step hooks, an lr scheduler's step counter.)"""
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))  # GELU: M falls back to S, and says so
    opt = LocoPropOptimizer(model, variant="M")
    if scheduled:
        torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    model(torch.randn(3, 4)).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        opt.step()
    assert caught and {(w.filename, w.lineno) for w in caught} == {(__file__, line)}


def test_second_step_without_a_new_backward_is_refused():
    model = _mlp()
    opt = LocoPropOptimizer(model, lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    before, inner_state = snapshot(model), opt.inner.state_dict()
    with pytest.raises(RuntimeError, match="Unit '0' has a gradient but no forward and backward pass was recorded"):
        opt.step()
    assert_same_params(model, before)
    assert str(opt.inner.state_dict()) == str(inner_state)


def test_a_schedule_that_sets_lr_to_zero_is_refused_with_the_cause_named():
    """transformers' get_linear_schedule_with_warmup starts at lr = 0, which SPEC §3 refuses: the message says
    where such a value comes from; nothing changes."""
    model = _mlp()
    opt = LocoPropOptimizer(model, lr=1e-2)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)  # a warm-up from 0
    model(torch.randn(5, 4)).sum().backward()
    before = snapshot(model)
    with pytest.raises(ValueError, match="Invalid learning rate: 0.0; .*if a schedule set it, start and end"):
        opt.step()
    assert_same_params(model, before)


def test_a_numpy_integer_local_iters_is_named_as_such():
    np = pytest.importorskip("numpy")
    with pytest.raises(
        ValueError, match=re.escape("Invalid local_iters: np.int64(3); expected an integer ≥ 1 (a Python")
    ):
        LocoPropOptimizer(_mlp(), local_iters=np.int64(3))


def test_a_unit_this_loss_did_not_use_may_keep_zeroed_gradients():
    """zero_grad(set_to_none=False) leaves zeros on a unit the next loss does not use (a multi-task head): it
    took no part, so it is not refused as a gradient that no forward explains, and it does not move; a nonzero
    gradient on it still is refused."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x, head):
            return (self.a if head == "a" else self.b)(x)

    torch.manual_seed(0)
    model = TwoHeads()
    opt = LocoPropOptimizer(model, variant="S", inner="sgd", lr=0.1)
    for head in ("a", "b", "a"):
        unused = model.b if head == "a" else model.a
        before = snapshot(model)
        opt.zero_grad(set_to_none=False)
        model(torch.randn(5, 4), head).pow(2).sum().backward()
        opt.step()
        assert torch.equal(unused.weight, before[f"{'b' if head == 'a' else 'a'}.weight"])
        assert not torch.equal(getattr(model, head).weight, before[f"{head}.weight"])
    opt.zero_grad(set_to_none=False)
    model(torch.randn(5, 4), "a").pow(2).sum().backward()
    model.b.weight.grad.fill_(1.0)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="Unit 'b' has a gradient but no forward and backward pass was recorded"):
        opt.step()
    assert_same_params(model, before)


class _SparseEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.fc(self.emb(ids).mean(1))))


def _sparse_gradients(inner: str) -> tuple[nn.Module, LocoPropOptimizer, dict]:
    """A model with a sparse embedding after its backward pass, its optimizer, and its parameters then."""
    torch.manual_seed(0)
    model = _SparseEmbedding()
    opt = LocoPropOptimizer(model, inner=inner, lr=0.1, output_activation="softmax")
    F.cross_entropy(model(torch.randint(0, 10, (5, 3))), torch.randint(0, 3, (5,))).backward()
    return model, opt, snapshot(model)


@pytest.mark.parametrize("inner", ["adam", "rmsprop-tf", "rmsprop"])
def test_sparse_gradients_with_an_inner_optimizer_that_cannot_take_them_are_refused_naming_them(inner):
    """Adam raised midway through its step, after the units' groups had moved."""
    model, opt, before = _sparse_gradients(inner)
    with pytest.raises(RuntimeError, match="'emb.weight' have sparse gradients"):
        opt.step()
    assert_same_params(model, before)
    assert not opt.inner.state


@pytest.mark.parametrize("inner", ["sgd", "momentum", "adagrad"])
def test_sparse_gradients_step_with_an_inner_optimizer_that_takes_them(inner):
    model, opt, before = _sparse_gradients(inner)
    opt.step()
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", 0.0, "Invalid learning rate: 0.0"),
        ("local_iters", 0, "Invalid local_iters: 0"),
        ("activation_lr", -1.0, "Invalid activation_lr: -1.0"),
        ("inner_schedule", "cosine", "Invalid inner_schedule: 'cosine'"),
        ("covariance_refresh", 0, "Invalid covariance_refresh: 0"),
        ("covariance_refresh", 5, "covariance_refresh=5 applies to solve='exact' only"),
    ],
)
def test_bad_group_hyperparameter_refuses_the_step(key, value, message):
    model = _mlp()
    opt = LocoPropOptimizer(model, lr=1e-2)
    opt.param_groups[-1][key] = value
    model(torch.randn(5, 4)).sum().backward()
    before = snapshot(model)
    with pytest.raises(ValueError, match=_literal(message)):
        opt.step()
    assert_same_params(model, before)
    assert not opt.inner.state
    # Mended, the same backward pass still steps.
    opt.param_groups[-1][key] = opt.defaults[key]
    opt.step()
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_non_finite_batch_is_skipped_and_counted():
    model = _mlp()
    opt = LocoPropOptimizer(model, lr=1e-2, inner="adam")
    x = torch.randn(5, 4)
    before = snapshot(model)
    (model(x).sum() * float("nan")).backward()
    opt.step()
    assert_same_params(model, before)
    assert opt.skipped_steps == 1
    assert not opt.inner.state
    opt.zero_grad()
    x[0, 0] = float("inf")
    model(x).sum().backward()
    opt.step()
    assert_same_params(model, before)
    assert opt.skipped_steps == 2
    # A finite batch afterwards steps normally.
    opt.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before["0.weight"])
    assert opt.skipped_steps == 2
    assert opt.state_dict()["skipped_steps"] == 2


def test_load_state_dict_for_other_units_is_refused():
    opt = LocoPropOptimizer(_mlp())
    other = LocoPropOptimizer(nn.Sequential(nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"State dict is for units \['0'\], but this optimizer has units \['0', '2'\]"):
        opt.load_state_dict(other.state_dict())


def test_load_state_dict_of_another_optimizer_is_refused_naming_it():
    model = _mlp()
    opt = LocoPropOptimizer(model, inner="adam")
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    before = opt.state_dict()
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"Not a LocoPropOptimizer state dict \(it has \['param_groups', 'state'\]"):
        opt.load_state_dict(adam.state_dict())
    assert str(opt.state_dict()) == str(before)


def test_meta_device_model_is_refused_at_construction():
    with torch.device("meta"):
        model = _mlp()
    with pytest.raises(ValueError, match=r"Parameters \['0.weight', '0.bias', '2.weight'\] … are on the meta device"):
        LocoPropOptimizer(model)


def test_a_step_after_the_model_moved_to_meta_is_refused_naming_it():
    model = _mlp()
    opt = LocoPropOptimizer(model)
    model.to("meta")
    model(torch.randn(8, 4, device="meta")).sum().backward()
    with pytest.raises(RuntimeError, match=r"Parameters \['0.weight', '0.bias', '2.weight'\] … are on the meta device"):
        opt.step()


def test_add_param_group_adds_parameters_updated_on_their_gradient():
    """A group added later is outside every unit: one inner SGD step at η on γ·∇L."""
    model = _mlp()
    extra = nn.Parameter(torch.ones(3))
    opt = LocoPropOptimizer(model, lr=0.1, activation_lr=2.0, local_iters=3, inner="sgd")
    opt.add_param_group({"params": extra, "lr": 0.05})
    assert opt.param_groups[-1]["unit"] is None and opt.param_groups[-1]["activation_lr"] == 2.0
    x = torch.randn(5, 4)
    for _ in range(2):
        opt.zero_grad()
        expected = extra.detach() - 0.05 * 2.0 * torch.autograd.grad((model(x).sum(1, keepdim=True) * extra).sum(),
                                                                     extra)[0]  # fmt: skip
        (model(x).sum(1, keepdim=True) * extra).sum().backward()
        opt.step()
        torch.testing.assert_close(extra.detach(), expected)
    # The added group is checkpointed with the rest.
    state = opt.state_dict()
    assert len(state["param_groups"]) == len(opt.param_groups)


@pytest.mark.parametrize(
    "group, error, message",
    [
        ({"params": [nn.Parameter(torch.ones(2))], "lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
        (
            {"params": [nn.Parameter(torch.ones(2))], "unit": "x"},
            ValueError,
            "Cannot add unit 'x' with add_param_group",
        ),
        ("params", ValueError, "Invalid param group 'params'"),
        (None, ValueError, "Invalid param group None"),
    ],
    ids=["bad-lr", "unit", "not-a-dict", "none"],
)
def test_add_param_group_refusals_change_nothing(group, error, message):
    opt = LocoPropOptimizer(_mlp())
    groups, inner_groups = len(opt.param_groups), len(opt.inner.param_groups)
    with pytest.raises(error, match=_literal(message)):
        opt.add_param_group(group)
    assert (len(opt.param_groups), len(opt.inner.param_groups)) == (groups, inner_groups)


def test_add_param_group_refuses_a_unit_parameter():
    model = _mlp()
    opt = LocoPropOptimizer(model)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [model[0].weight]})
    assert len(opt.param_groups) == 2 and len(opt.inner.param_groups) == 2


def _literal(message: str) -> str:
    return re.escape(message)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(variant="M"),
        dict(variant="S"),
        dict(variant="M", parallel="none"),
        dict(variant="S", parallel="none"),
    ],
    ids=lambda kw: "-".join(map(str, kw.values())),
)
def test_a_forward_under_bf16_autocast_steps_in_the_parameters_dtype(kwargs):
    """Under autocast the records are bf16; the local problems run in float32
    and one local SGD step is still the backprop SGD step at η·γ (to bf16 precision)."""
    model = _mlp()
    x = torch.randn(64, 4)

    def loss_fn(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float().pow(2).sum(1).mean()

    expected = backprop_sgd_step(model, loss_fn, lr=0.05 * 2.0)
    opt = LocoPropOptimizer(model, lr=0.05, activation_lr=2.0, local_iters=1, inner="sgd", **kwargs)
    loss_fn(model).backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_same_params(model, expected, rtol=0, atol=2e-3)


def test_under_autocast_m_anchors_at_the_pre_activation_the_forward_went_on_with(monkeypatch):
    """a^old of M's divergence is the bf16 output the network computed its loss from, cast up to float32, not a
    float32 forward of the unit again (which differs from it by bf16 rounding and costs a matmul)."""
    import locoprop.optimizer as optimizer_module

    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(64, 16)
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    opt = LocoPropOptimizer(model, lr=0.05, activation_lr=2.0, local_iters=2, variant="M")
    outputs = []
    model[0].register_forward_hook(lambda module, inputs, output: outputs.append(output.detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().pow(2).sum(1).mean().backward()
    (hidden,) = outputs
    anchors = {}
    original = optimizer_module.prepare_solves

    def prepare_solves(problems, *args):
        original(problems, *args)
        anchors.update({p.unit.name: p.anchors[0] for p in problems if p.unit is not None})

    monkeypatch.setattr(optimizer_module, "prepare_solves", prepare_solves)
    opt.step()
    transfer = next(u for u in opt.units if u.name == "0").transfer
    assert transfer.name == "tanh" and hidden.dtype == torch.bfloat16
    got, forward = anchors["0"], transfer.anchor_at(hidden.detach().float())
    recomputed = transfer.anchor_at(F.linear(x, weight, bias))
    assert all(g.dtype == torch.float32 for g in got)
    for g, f in zip(got, forward):
        torch.testing.assert_close(g, f, rtol=0, atol=0)
    assert any((g - r).abs().max() > 0 for g, r in zip(got, recomputed))  # the test tells the two apart


@pytest.mark.parametrize("parallel", ["batched", "none"])
def test_the_exact_solve_under_bf16_autocast_solves_in_the_parameters_dtype(parallel):
    """The same exact step as without autocast, to bf16 rounding of the records."""
    x = torch.randn(64, 4)
    steps = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = _mlp()
        opt = LocoPropOptimizer(model, variant="S", solve="exact", prox=1.0, activation_lr=2.0, parallel=parallel)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(x).float().pow(2).sum(1).mean()
        loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        steps.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    for exact, autocast in zip(*steps):
        assert exact.abs().max() > 1e-3  # a real step
        torch.testing.assert_close(autocast, exact, rtol=0, atol=2e-2 * exact.abs().max().item())


def test_numpy_scalar_hyperparameters_are_taken_as_floats():
    np = pytest.importorskip("numpy")
    opt = LocoPropOptimizer(_mlp(), lr=np.float32(1e-3), activation_lr=np.float64(2.0), prox=np.float32(0.5))
    group = opt.param_groups[0]
    assert [type(group[k]) for k in ("lr", "activation_lr", "prox")] == [float, float, float]
    assert group["lr"] == pytest.approx(1e-3) and group["activation_lr"] == 2.0 and group["prox"] == 0.5


def test_a_parameter_frozen_when_the_optimizer_was_built_and_unfrozen_since_is_named_in_a_warning():
    """It is in no param group, so it is never updated; that was silent, and its .grad grew step after step."""
    model = _mlp()
    model[0].requires_grad_(False)
    opt = LocoPropOptimizer(model, variant="S", inner="sgd", lr=0.1)
    model[0].requires_grad_(True)
    with pytest.warns(UserWarning, match=r"'0.weight', '0.bias' have gradients but are in no param group"):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
