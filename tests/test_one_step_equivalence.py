"""One local SGD step at inner lr η is a backprop SGD step at lr η·γ (SPEC §2).

The expected parameters come from autograd on a copy of the model and a
hand-written SGD update, never from locoprop.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import CLOSE, assert_same_params, backprop_sgd_step, bce_sum_mean
from torch import nn

from locoprop import LocoPropOptimizer

ETA, GAMMA = 0.05, 3.0


def _locoprop_one_step(model, loss_fn, **kwargs):
    opt = LocoPropOptimizer(model, lr=ETA, activation_lr=GAMMA, local_iters=1, inner="sgd", **kwargs)
    opt.zero_grad()
    loss_fn(model).backward()
    opt.step()
    return opt


ACTIVATIONS = [nn.Tanh(), nn.Sigmoid(), nn.ReLU(), nn.LeakyReLU(0.2), nn.Softplus(), nn.Identity()]


@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda m: type(m).__name__)
def test_linear_sequential(variant, activation):
    model = nn.Sequential(nn.Linear(8, 6), activation, nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 8)).double()
    x = torch.rand(32, 8, dtype=torch.float64)

    def loss_fn(m):
        return bce_sum_mean(m(x), x)

    expected = backprop_sgd_step(model, loss_fn, ETA * GAMMA)
    _locoprop_one_step(model, loss_fn, variant=variant, output_activation="sigmoid")
    assert_same_params(model, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["M", "S"])
def test_conv2d_sequential_with_softmax_output(variant):
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding_mode="reflect", padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    ).double()
    x = torch.randn(10, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (10,))

    def loss_fn(m):
        return F.cross_entropy(m(x), y)

    expected = backprop_sgd_step(model, loss_fn, ETA * GAMMA)
    opt = _locoprop_one_step(model, loss_fn, variant=variant, output_activation="softmax")
    assert [u.transfer.name for u in opt.units] == ["relu", "tanh", "softmax"]
    assert_same_params(model, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's, on the model's forward
@pytest.mark.parametrize("kernel", [3, 4])
def test_convolutions_with_padding_given_as_a_string_are_units_solved_as_with_the_padding_spelled_out(kernel):
    """padding="same"/"valid" made a convolution no unit (its weight took plain steps, silently). Now it is one,
    and three M iterations give what the same network with the padding written out does: padding=1 for a 3×3
    "same", an explicit ZeroPad2d for the 4×4 one (PyTorch pads it asymmetrically, one row before, two after)."""
    torch.manual_seed(0)
    pad = nn.ZeroPad2d((1, 2, 1, 2)) if kernel == 4 else nn.Identity()
    head = [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)]
    first = nn.Conv2d(2, 3, kernel, padding=1 if kernel == 3 else 0)
    spelled = nn.Sequential(pad, first, nn.Tanh(), nn.Conv2d(3, 4, 3, padding=0), *head).double()
    strings = nn.Sequential(
        nn.Identity(), nn.Conv2d(2, 3, kernel, padding="same"), nn.Tanh(), nn.Conv2d(3, 4, 3, padding="valid"),
        *copy.deepcopy(head)).double()  # fmt: skip
    strings.load_state_dict(spelled.state_dict())
    x, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    for model in (spelled, strings):
        opt = LocoPropOptimizer(model, variant="M", lr=ETA, activation_lr=GAMMA, local_iters=3, inner="sgd",
                                output_activation="softmax")  # fmt: skip
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert [(row.kind, row.transfer) for row in opt.describe().rows] == [
            ("conv2d", "tanh"), ("conv2d", "relu"), ("linear", "softmax")]  # fmt: skip
    assert_same_params(strings, dict(spelled.named_parameters()), rtol=1e-10, atol=1e-12)


def test_a_convolution_with_softmax_over_its_channels_solves_specs_m_problem():
    """Segmentation: cross-entropy over the channels of a convolution's output, a unit with nn.Softmax(dim=1).
    It was refused ("softmax over the last dimension"). Three constant-lr SGD iterations on SPEC §2's M
    objective, Σ logsumexp_c(a_θ) − ⟨softmax_c(a_old), a_θ⟩ + γ⟨G, θ⟩ over pixels, written out with autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 5, 1)).double()
    named_by_output_activation = copy.deepcopy(model)
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (2, 6, 6))
    h = torch.tanh(model[0](x)).detach()
    old = [p.detach().clone() for p in model[2].parameters()]
    a_old = F.conv2d(h, *old)
    leaves = [p.clone().requires_grad_(True) for p in old]
    linear_term = torch.autograd.grad(F.cross_entropy(F.conv2d(h, *leaves), y), leaves)
    theta = [p - ETA * GAMMA * g for p, g in zip(old, linear_term)]
    for _ in range(2):
        leaves = [p.clone().requires_grad_(True) for p in theta]
        a = F.conv2d(h, *leaves)
        divergence = torch.logsumexp(a, dim=1).sum() - (torch.softmax(a_old, dim=1) * a).sum()
        grads = torch.autograd.grad(divergence, leaves)
        theta = [p - ETA * (g + GAMMA * G) for p, g, G in zip(theta, grads, linear_term)]

    units = [(model[0], "tanh"), (model[2], nn.Softmax(dim=1))]
    opt = LocoPropOptimizer(model, variant="M", lr=ETA, activation_lr=GAMMA, local_iters=3, inner="sgd",
                            inner_schedule="constant", units=units)  # fmt: skip
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.describe().rows[1].transfer == "softmax(dim=1)"
    for got, want in zip(model[2].parameters(), theta):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    # output_activation="softmax" names the same: cross-entropy's softmax of a convolution is over its channels
    model = named_by_output_activation
    opt = LocoPropOptimizer(model, variant="M", lr=ETA, activation_lr=GAMMA, local_iters=3, inner="sgd",
                            inner_schedule="constant", output_activation="softmax")  # fmt: skip
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.describe().rows[1].transfer == "softmax(dim=1)"
    for got, want in zip(model[2].parameters(), theta):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["M", "S"])
def test_a_transposed_convolution_is_a_unit_of_its_decoder(variant):
    """nn.ConvTranspose2d (decoders, U-Nets, generators) was no unit: its weight took plain steps. Three
    constant-lr SGD iterations on SPEC §2's objective of the transposed convolution followed by tanh (M:
    Σ log cosh(a_θ) − ⟨tanh(a_old), a_θ⟩, S: ½‖a_θ − a_θold‖², plus γ⟨G, θ⟩), written out with autograd."""
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)  # (bias: 6 ≠ 4, ≠ 3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(), up, nn.Tanh()).double()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    target = torch.rand(3, 6, 8, 8, dtype=torch.float64)
    h = torch.relu(model[0](x)).detach()

    def transposed(theta):
        return F.conv_transpose2d(h, *theta, stride=2, padding=1, output_padding=1, groups=2)

    old = [p.detach().clone() for p in up.parameters()]
    a_old = transposed(old)
    leaves = [p.clone().requires_grad_(True) for p in old]
    linear_term = torch.autograd.grad((torch.tanh(transposed(leaves)) - target).square().sum(), leaves)
    theta = [p - ETA * GAMMA * g for p, g in zip(old, linear_term)]
    for _ in range(2):
        leaves = [p.clone().requires_grad_(True) for p in theta]
        a = transposed(leaves)
        if variant == "M":
            divergence = torch.log(torch.cosh(a)).sum() - (torch.tanh(a_old) * a).sum()
        else:
            divergence = 0.5 * (a - a_old).square().sum()
        grads = torch.autograd.grad(divergence, leaves)
        theta = [p - ETA * (g + GAMMA * G) for p, g, G in zip(theta, grads, linear_term)]

    opt = LocoPropOptimizer(model, variant=variant, lr=ETA, activation_lr=GAMMA, local_iters=3, inner="sgd",
                            inner_schedule="constant")  # fmt: skip
    (model(x) - target).square().sum().backward()
    opt.step()
    assert [(row.kind, row.transfer) for row in opt.describe().rows] == [("conv2d", "relu"),
                                                                          ("conv_transpose2d", "tanh")]  # fmt: skip
    assert opt.parameter_roles()["2.bias"] == "2"  # the bias is the unit's
    for got, want in zip(up.parameters(), theta):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("parallel", ["none", "batched"])
def test_a_unit_whose_bias_is_frozen_solves_for_its_weight_with_the_bias_held(parallel):
    """A frozen bias dropped the whole unit (its weight took plain steps). Now the bias is a constant of the
    map: three constant-lr SGD iterations on SPEC §2's M objective for the weight, Σ log cosh(a_W) − ⟨tanh(a_old),
    a_W⟩ + γ⟨G, W⟩ with a_W = xWᵀ + b, written out with autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    bias, old = model[0].bias.detach().clone(), model[0].weight.detach().clone()
    a_old = F.linear(x, old, bias)
    leaf = old.clone().requires_grad_(True)
    (linear_term,) = torch.autograd.grad(F.cross_entropy(model[2](torch.tanh(F.linear(x, leaf, bias))), y), leaf)
    weight = old - ETA * GAMMA * linear_term
    for _ in range(2):
        leaf = weight.clone().requires_grad_(True)
        a = F.linear(x, leaf, bias)
        divergence = (torch.logaddexp(a, -a) - math.log(2)).sum() - (torch.tanh(a_old) * a).sum()
        (grad,) = torch.autograd.grad(divergence, leaf)
        weight = weight - ETA * (grad + GAMMA * linear_term)

    opt = LocoPropOptimizer(model, variant="M", lr=ETA, activation_lr=GAMMA, local_iters=3, inner="sgd",
                            inner_schedule="constant", output_activation="softmax", parallel=parallel)  # fmt: skip
    assert opt.parameter_roles() == {"0.weight": "0", "2.weight": "2", "2.bias": "2"}
    F.cross_entropy(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), weight, rtol=1e-10, atol=1e-12)
    assert torch.equal(model[0].bias, bias)


class HandWritten(nn.Module):
    """No nn.Sequential: functional activations, a norm outside every unit,
    and one layer applied twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc1 = nn.Linear(2 * 4 * 4, 6)
        self.norm = nn.LayerNorm(6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        h = self.norm(torch.tanh(self.fc1(h)))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


@pytest.mark.parametrize("variant", ["M", "S"])
def test_hand_written_module_with_explicit_units(variant):
    model = HandWritten().double()
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))

    def loss_fn(m):
        return F.cross_entropy(m(x), y)

    expected = backprop_sgd_step(model, loss_fn, ETA * GAMMA)
    units = [(model.conv, "relu"), (model.fc1, "tanh"), (model.shared, nn.Tanh()), (model.out, "softmax")]
    opt = _locoprop_one_step(model, loss_fn, variant=variant, units=units)
    assert opt.parameter_roles()["norm.weight"] == "backprop"
    assert opt.parameter_roles()["shared.bias"] == "shared"
    assert_same_params(model, expected, rtol=1e-10, atol=1e-12)


def test_discovery_finds_units_and_transfers_in_nested_sequentials():
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.3)),
        nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.Sigmoid()),
        nn.Linear(4, 2),
    )
    opt = LocoPropOptimizer(model, variant="M")
    # Dropout sits between the second layer and its sigmoid: its unit's
    # own output is matched as is (identity).
    assert [(u.name, u.transfer.name) for u in opt.units] == [
        ("0.0", "leaky_relu(0.3)"),
        ("1.0", "identity"),
        ("2", "identity"),
    ]


def test_functional_expit_and_softmax_over_another_dimension_are_read_as_their_modules_are():
    """torch.special.expit was read as the identity, and F.softmax(a, dim=0) made M fall back to S, where
    nn.Sigmoid and nn.Softmax(dim=0) are M units: the two spellings now give the same units and step."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.out = nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(F.softmax(self.l2(torch.special.expit(self.l1(x))), dim=0))

    torch.manual_seed(0)
    functional = Functional().double()
    modules = nn.Sequential(functional.l1, nn.Sigmoid(), functional.l2, nn.Softmax(dim=0), functional.out)
    modules = copy.deepcopy(modules)
    x = torch.randn(7, 4, dtype=torch.float64)
    for model in (functional, modules):
        opt = LocoPropOptimizer(model, variant="M", lr=ETA, activation_lr=GAMMA, local_iters=3, inner="sgd")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to S
            model(x).pow(2).sum().backward()
            opt.step()
        assert [unit.transfer.name for unit in opt.units] == ["sigmoid", "softmax(dim=0)", "identity"]
    for mine, theirs in zip(functional.parameters(), modules.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


class _Holder(nn.Module):
    """A network held as ``self.net`` (a LightningModule's layout); the training code may call ``self.net``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5))
        self.net.append(nn.Sigmoid()).append(nn.Linear(5, 2))

    def forward(self, x):
        return self.net(x)


def test_a_forward_through_a_part_of_the_model_finds_the_transfers_inside_it():
    """``LocoPropOptimizer(holder)`` with the forward run as ``holder.net(x)``, the holder's own forward never
    called: the units' activations inside ``net`` are seen (they were the identity, silently), and the step
    is that of ``LocoPropOptimizer(net)``."""
    holder = _Holder()
    net = copy.deepcopy(holder.net)
    x = torch.randn(8, 4)
    hparams = dict(variant="M", lr=1e-2, activation_lr=1.0, local_iters=3)
    for model, run in ((holder, holder.net), (net, net)):
        opt = LocoPropOptimizer(model, **hparams)
        run(x).square().sum().backward()
        opt.step()
        assert [u.transfer.name for u in opt.units] == ["tanh", "sigmoid", "identity"]
    assert_same_params(holder.net, dict(net.named_parameters()))


class _SoftmaxThroughViews(nn.Module):
    """A unit's output reshaped before a softmax: its leading dimensions flattened (the softmax is still over
    each row of the output), or its last dimension split into groups (a softmax per head, as Deformable DETR's
    attention weights), or moved."""

    def __init__(self, layout):
        super().__init__()
        self.proj, self.head, self.layout = nn.Linear(4, 6), nn.Linear(6, 2), layout

    def forward(self, x):
        a = self.proj(x)
        if self.layout == "rows":
            p = a.view(-1, 6).softmax(-1).view(a.shape)
        elif self.layout == "groups":
            p = a.unflatten(-1, (2, 3)).softmax(-1).flatten(-2)
        else:
            p = a.transpose(1, 2).softmax(1).transpose(1, 2)
        return self.head(p)


@pytest.mark.parametrize("layout, transfer, variant", [
    ("rows", "softmax", "M"),
    ("groups", "softmax of a reshaped output", "S"),
    ("moved", "softmax", "M"),
])  # fmt: skip
def test_a_softmax_read_through_views_is_the_units_only_over_a_whole_dimension_of_its_output(layout, transfer,
                                                                                           variant):  # fmt: skip
    """A softmax per group of a unit's outputs is no softmax of its output: M takes the S target there, and
    says so (it took the softmax over the whole output, a wrong divergence, silently). Over the unit's last
    dimension moved to the middle it is the unit's softmax (it took the S target)."""
    model = _SoftmaxThroughViews(layout)
    opt = LocoPropOptimizer(model, variant="M")
    model(torch.randn(2, 3, 4)).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    rows = {row.unit: (row.transfer, row.variant) for row in opt.describe().rows}
    assert rows["proj"] == (transfer, variant)
    assert any("'proj'" in str(w.message) for w in caught) == (variant == "S")


class _AttentionPooling(nn.Module):
    """Scores over positions, a softmax over them (dim=1, not the score's last dimension), a weighted sum: the
    softmax of the B × T × 1 scores, or of the scores squeezed to B × T, by a function or a module (in a
    reentrant checkpoint: a forward without gradients reads it), or of scores written out, h @ Wᵀ + b."""

    def __init__(self, pool: str):
        super().__init__()
        self.enc, self.score, self.head = nn.Linear(5, 6), nn.Linear(6, 1), nn.Linear(6, 3)
        self.softmax = nn.Softmax(dim=-1)
        squeezed = lambda a: torch.softmax(a.squeeze(-1), dim=-1).unsqueeze(-1)  # noqa: E731
        self.pool = {"module": nn.Softmax(dim=1), "function": lambda a: torch.softmax(a, dim=1),
                     "folded bias": lambda a: torch.softmax(a, dim=1), "squeezed": squeezed,
                     "checkpointed": squeezed,
                     "checkpointed module": lambda a: self.softmax(a.squeeze(-1)).unsqueeze(-1)}[pool]  # fmt: skip
        self.kind = pool

    def scores(self, h):
        return h @ self.score.weight.T + self.score.bias if self.kind == "folded bias" else self.score(h)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        if self.kind.startswith("checkpointed"):
            weights = torch.utils.checkpoint.checkpoint(lambda h: self.pool(self.scores(h)), h, use_reentrant=True)
        else:
            weights = self.pool(self.scores(h))
        return self.head((weights * h).sum(1))


@pytest.mark.parametrize("pool", ["function", "module", "folded bias", "squeezed", "checkpointed",
                                  "checkpointed module"])  # fmt: skip
@pytest.mark.parametrize("parallel", ["batched", "none"])
def test_a_softmax_over_positions_solves_specs_m_problem_on_every_path(parallel, pool):
    """The score unit's M objective, Σ_b logsumexp over positions − ⟨softmax(a_old) − γg, a⟩, written out with
    autograd: the batched kernels applied it to the output's rows, over a dimension of size 1 (off by 21). The
    scores squeezed before the softmax are the same (they took the S target; in a checkpoint, by a module, the
    identity, a first version's hook counting its own stride reads as consumers)."""
    torch.manual_seed(0)
    model = _AttentionPooling(pool).double()
    x, y = torch.randn(4, 7, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    lr, gamma = 0.5, 2.0
    h = torch.tanh(model.enc(x)).detach()
    a_old = model.score(h)
    a_old.retain_grad()
    ((model.head((torch.softmax(a_old, 1) * torch.tanh(model.enc(x))).sum(1)) - y) ** 2).sum().backward()
    target = torch.softmax(a_old.detach(), 1) - gamma * a_old.grad
    weight, bias = (p.detach().clone().requires_grad_(True) for p in model.score.parameters())
    for _ in range(3):
        a = F.linear(h, weight, bias)
        grads = torch.autograd.grad(torch.logsumexp(a, dim=1).sum() - (target * a).sum(), (weight, bias))
        with torch.no_grad():
            weight -= lr * grads[0]
            bias -= lr * grads[1]
    model.zero_grad()
    opt = LocoPropOptimizer(model, variant="M", lr=lr, activation_lr=gamma, local_iters=3, inner="sgd",
                            inner_schedule="constant", parallel=parallel)  # fmt: skip
    ((model(x) - y) ** 2).sum().backward()
    opt.step()
    assert opt.units[1].transfer.name == "softmax(dim=1)"
    torch.testing.assert_close(model.score.weight.detach(), weight.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.score.bias.detach(), bias.detach(), rtol=1e-10, atol=1e-12)


def test_a_softmax_module_over_the_last_dimension_written_as_a_positive_dim_is_the_softmax():
    """``nn.Softmax(dim=2)`` on a unit's B × L × d output is its softmax over the last dimension (the batched
    kernels raised IndexError for "softmax(dim=2)" on the output's rows)."""
    torch.manual_seed(0)
    positive = nn.Sequential(nn.Linear(5, 4), nn.Softmax(dim=2), nn.Linear(4, 3)).double()
    last = copy.deepcopy(positive)
    last[1] = nn.Softmax(dim=-1)
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    for model in (positive, last):
        opt = LocoPropOptimizer(model, variant="M", lr=0.1, activation_lr=1.0, local_iters=3, inner="sgd")
        model(x).square().sum().backward()
        opt.step()
        assert opt.units[0].transfer.name == "softmax"
    assert_same_params(positive, dict(last.named_parameters()))


def test_a_softmax_without_a_dimension_is_over_the_dimension_torch_picks():
    """``F.softmax(a)`` and ``nn.Softmax()`` without ``dim`` take torch's implicit one: 0 for a 3-D input."""
    for softmax in (lambda a: F.softmax(a), nn.Softmax()):
        model = nn.Sequential(nn.Linear(4, 3), softmax if isinstance(softmax, nn.Module) else _Call(softmax))
        opt = LocoPropOptimizer(model, variant="M")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch warns that the implicit dimension is deprecated)
            model(torch.randn(2, 5, 4)).sum().backward()
        assert opt.units[0].transfer.name == "softmax(dim=0)"


def test_a_softmax_of_a_scalar_is_read_without_error():
    """(A 0-D input has no dimension to take: discovery raised ZeroDivisionError inside the model's forward.)"""
    model = nn.Sequential(nn.Linear(4, 1), _Call(lambda a: F.softmax(a.squeeze())))
    opt = LocoPropOptimizer(model, variant="M")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(torch.randn(1, 4)).backward()
    assert opt.units[0].transfer.name == "softmax of a reshaped output"  # (squeezed: M takes the S target)


class _Call(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def test_a_hook_that_logs_a_unit_output_does_not_change_its_transfer():
    """A forward hook that reads a unit's output out of the graph (detach, item: activation logging) is no
    consumer: the unit keeps its tanh, and one step is still the backprop SGD step of M."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    logged = []
    model[0].register_forward_hook(lambda module, args, output: logged.append(output.detach().abs().mean().item()))

    def loss_fn(m):
        return m(x).pow(2).sum()

    expected = backprop_sgd_step(model, loss_fn, ETA * GAMMA)
    opt = LocoPropOptimizer(model, lr=ETA, activation_lr=GAMMA, local_iters=1, inner="sgd", variant="M")
    loss_fn(model).backward()
    assert [(u.name, u.transfer.name) for u in opt.units] == [("0", "tanh"), ("2", "identity")] and logged
    opt.step()
    assert_same_params(model, expected, rtol=1e-10, atol=1e-12)


class _Checkpointed(nn.Module):
    """A tanh block (the activation called in the block's forward, not by a module) under activation
    checkpointing, then a head."""

    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.block, self.head, self.reentrant = nn.Linear(4, 5), nn.Linear(5, 2), reentrant

    def run_block(self, x):
        return torch.tanh(self.block(x))

    def forward(self, x):
        if self.reentrant is None:
            return self.head(self.run_block(x))
        h = torch.utils.checkpoint.checkpoint(self.run_block, x, use_reentrant=self.reentrant)
        return self.head(h)


def test_activation_checkpointing_reentrant_or_not_takes_the_step_without_it():
    """Reentrant checkpointing runs the block without gradients in the forward and again in the backward
    pass, where only the linear layer's own forward is recorded: the tanh after it was read as the identity
    there, and M solved another problem. The transfer is read in the model's forward now."""
    torch.manual_seed(0)
    reference = _Checkpointed(None).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)  # (reentrant checkpointing needs an input
    results = {}  # that requires grad to backpropagate into the block)
    for reentrant in (None, False, True):
        model = copy.deepcopy(reference)
        model.reentrant = reentrant
        opt = LocoPropOptimizer(model, variant="M", lr=ETA, activation_lr=GAMMA, local_iters=3, inner="sgd")
        for _ in range(2):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
        assert [(u.name, u.transfer.name) for u in opt.units] == [("block", "tanh"), ("head", "identity")]
        results[reentrant] = [p.detach() for p in model.parameters()]
    for reentrant in (False, True):
        for got, expected in zip(results[reentrant], results[None]):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_the_output_unit_behind_a_reentrant_checkpoint_is_refused_not_guessed():
    """The walk back from the output met the checkpoint's node, not the head inside it, and gave the softmax to
    the unit before the checkpoint. Now the step is refused, naming the checkpoint, and changes nothing."""

    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(lambda h: self.head(torch.tanh(h)), self.fc(x), use_reentrant=True)

    model = Hidden().double()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="reentrant activation checkpoint.*use_reentrant=False"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_no_grad_use_inside_the_training_forward_does_not_change_the_transfer():
    """A stop-gradient branch with the same layer (its output read another way) is no consumer of the
    training use: fc keeps its tanh."""

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            with torch.no_grad():
                target = self.fc(x.flip(0)).abs()
            return self.head(torch.tanh(self.fc(x))), target

    model = Teacher().double()
    opt = LocoPropOptimizer(model, variant="M")
    out, target = model(torch.randn(5, 4, dtype=torch.float64))
    (out - target[:, :2]).square().sum().backward()
    assert [unit.transfer.name for unit in opt.units] == ["tanh", "identity"]


def test_a_unit_used_several_times_each_into_the_same_activation_takes_it():
    """A recurrent cell's weight used at every step, each output into tanh: the unit's transfer is tanh (it
    was the identity: several consumers), and its M step sums the tanh matching losses of every use, checked
    against one constant-lr SGD iteration after the first, written out with autograd."""

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = x
            for _ in range(3):
                h = torch.tanh(self.cell(h))
            return self.head(h)

    torch.manual_seed(0)
    model = Recurrent().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    inputs, h = [], x
    for _ in range(3):
        inputs.append(h)
        h = torch.tanh(model.cell(h)).detach()
    old = [p.detach().clone() for p in model.cell.parameters()]
    leaves = [p.clone().requires_grad_(True) for p in old]
    h = x
    for _ in range(3):
        h = torch.tanh(F.linear(h, *leaves))
    linear_term = torch.autograd.grad(model.head(h).square().sum(), leaves)
    theta = [p - ETA * GAMMA * g for p, g in zip(old, linear_term)]
    leaves = [p.clone().requires_grad_(True) for p in theta]
    divergence = sum(torch.log(torch.cosh(F.linear(u, *leaves))).sum()
                     - (torch.tanh(F.linear(u, *old)) * F.linear(u, *leaves)).sum() for u in inputs)  # fmt: skip
    grads = torch.autograd.grad(divergence, leaves)
    theta = [p - ETA * (g + GAMMA * G) for p, g, G in zip(theta, grads, linear_term)]

    opt = LocoPropOptimizer(model, variant="M", lr=ETA, activation_lr=GAMMA, local_iters=2, inner="sgd",
                            inner_schedule="constant")  # fmt: skip
    model(x).square().sum().backward()
    assert [unit.transfer.name for unit in opt.units] == ["tanh", "identity"]
    opt.step()
    for got, want in zip(model.cell.parameters(), theta):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


def test_an_evaluation_forward_without_gradients_leaves_the_transfer_to_the_training_forward():
    model = _Checkpointed(None).double()
    opt = LocoPropOptimizer(model, variant="M")
    with torch.no_grad():
        model(torch.randn(3, 4, dtype=torch.float64))
    assert all(unit.transfer_pending for unit in opt.units)
    model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    assert [unit.transfer.name for unit in opt.units] == ["tanh", "identity"]


def test_forwards_without_backward_are_ignored():
    """Evaluation forwards between backward and step do not change the step."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)

    def loss_fn(m):
        return m(x).pow(2).sum()

    expected = backprop_sgd_step(model, loss_fn, ETA * GAMMA)
    opt = LocoPropOptimizer(model, lr=ETA, activation_lr=GAMMA, local_iters=1, inner="sgd")
    loss_fn(model).backward()
    with torch.no_grad():
        model(torch.randn(3, 4, dtype=torch.float64))
    model(torch.randn(5, 4, dtype=torch.float64))  # grad enabled, never backpropagated
    opt.step()
    assert_same_params(model, expected, rtol=1e-10, atol=1e-12)
    assert all(not u.records for u in opt.units)


def test_step_keeps_the_users_backprop_gradients():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = LocoPropOptimizer(model, lr=1e-2, inner="adam")
    model(torch.randn(8, 4)).pow(2).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)


class _SqueezedPooling(nn.Module):
    """Attention pooling whose B × T × 1 scores are squeezed whole, ``squeeze()``: at one token the softmax reads
    the batch, at several the positions."""

    def __init__(self):
        super().__init__()
        self.enc, self.score, self.head = nn.Linear(5, 6), nn.Linear(6, 1), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        weights = torch.softmax(self.score(h).squeeze(), dim=-1)
        return self.head((weights.reshape(*h.shape[:2], 1) * h).sum(1))


def test_a_softmax_read_at_outputs_with_a_dimension_of_one_is_read_again_when_it_grows():
    """A first batch of one token: the softmax reads the batch, dimension 0 of the scores; the next batch's
    positions are dimension 1 (the first reading stuck, and M matched the wrong softmax from then on)."""
    model = _SqueezedPooling()
    opt = LocoPropOptimizer(model, variant="M")
    read = []
    for length in (1, 7, 7):
        opt.zero_grad()
        model(torch.randn(4, length, 5)).square().sum().backward()
        opt.step()
        read.append(opt.units[1].transfer.name)
        with torch.no_grad():  # (an evaluation of another length reads nothing)
            model(torch.randn(4, 3, 5))
    assert read == ["softmax(dim=0)", "softmax(dim=1)", "softmax(dim=1)"]
    assert opt.param_groups[1]["transfer"] == "softmax(dim=1)"


class _TwoShapedScores(nn.Module):
    """One scorer applied to B × T × d and to B × T × 2 × d inputs, each softmax over positions."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(4, 1)

    def forward(self, x):
        return (
            torch.softmax(self.score(x), dim=1).sum()
            + torch.softmax(self.score(x[:, :, None].repeat(1, 1, 2, 1)), 1).sum()
        )


def test_a_unit_read_from_outputs_of_two_shapes_is_read_again_once(monkeypatch):
    """(Only the first output's dimensions of one were kept: each forward, the other output asked for a new
    reading, and the recording mode read transfers, at the cost of every torch call, in every forward.)"""
    model = _TwoShapedScores()
    opt = LocoPropOptimizer(model, variant="M")
    readings = []
    read_again_for = type(opt.units[0]).read_again_for
    monkeypatch.setattr(type(opt.units[0]), "read_again_for",
                        lambda unit, output: readings.append(read_again_for(unit, output)) or readings[-1])  # fmt: skip
    for batch in (1, 3, 3, 3, 3):
        opt.zero_grad()
        model(torch.randn(batch, 5, 4)).backward()
        opt.step()
    assert opt.units[0].transfer.name == "softmax(dim=1)"
    assert readings.count(True) == 1


class _LogProbabilities(nn.Module):
    """A classifier returning log-probabilities (PyTorch's MNIST example: ``F.log_softmax(x, dim=1)`` and
    ``F.nll_loss``), by a function or an ``nn.LogSoftmax``, or its logits."""

    def __init__(self, ending: str):
        super().__init__()
        self.ending, self.hidden, self.out = ending, nn.Linear(6, 8), nn.Linear(8, 4)
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, x):
        logits = self.out(torch.relu(self.hidden(x)))
        if self.ending == "logits":
            return logits
        return F.log_softmax(logits, dim=1) if self.ending == "function" else self.log_softmax(logits)


@pytest.mark.parametrize("ending", ["function", "module"])
def test_a_unit_whose_output_the_model_turns_into_log_probabilities_takes_the_softmax(ending):
    """Negative log-likelihood of log_softmax(a) is cross-entropy of the logits a: the unit's M step is the
    logits model's with ``output_activation="softmax"`` (it took the identity, silently: S's step)."""
    torch.manual_seed(0)
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    model, logits = _LogProbabilities(ending).double(), _LogProbabilities("logits").double()
    logits.load_state_dict(model.state_dict())
    hparams = dict(variant="M", lr=0.05, activation_lr=1.0, local_iters=3)
    opt = LocoPropOptimizer(model, **hparams)
    reference = LocoPropOptimizer(logits, output_activation="softmax", **hparams)
    for _ in range(2):
        opt.zero_grad(), reference.zero_grad()
        F.nll_loss(model(x), y).backward()
        F.cross_entropy(logits(x), y).backward()
        opt.step(), reference.step()
    assert [unit.transfer.name for unit in opt.units] == ["relu", "softmax"]
    assert_same_params(model, dict(logits.named_parameters()), **CLOSE)
