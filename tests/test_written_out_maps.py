"""Linear maps written out by hand are units like the modules they replace (SPEC §2: a unit is the use).

Falcon's ``FalconLinear`` computes ``x @ W.T + b``, Mamba's time step
``dt_proj.weight @ xᵀ`` and its convolution reads ``conv1d.weight.squeeze(1)
.unsqueeze(1)``: each is the map of an ``nn.Linear``/``nn.Conv1d`` written
another way, and took plain steps. Each model here must take the steps of its
twin built from the modules (whose units are checked against SPEC's
objectives elsewhere), over several M iterations, with its units of the same
kind.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locoprop import LocoPropOptimizer


class Twin(nn.Module):
    """A linear layer, tanh, and a depthwise convolution, computed by the modules (``written=None``) or
    written out: ``"transposed"`` (x @ W.T + b: the bias added right after is folded into the map),
    ``"left"`` ((W @ xᵀ)ᵀ, without a bias)."""

    def __init__(self, written: str | None, bias: bool = True):
        super().__init__()
        self.written = written
        self.fc = nn.Linear(6, 4, bias=bias)
        self.conv = nn.Conv1d(4, 4, 3, groups=4, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: batch × length × 6
        if self.written is None:
            h = self.fc(x)
        elif self.written == "transposed":
            h = x @ self.fc.weight.T + self.fc.bias  # (the bias added right after: folded into the map)
        elif self.written == "in place":
            h = torch.matmul(x, self.fc.weight.T)
            h += self.fc.bias
        else:
            h = (self.fc.weight @ x.transpose(1, 2)).transpose(1, 2)  # (no bias: added after the transpose)
        h = torch.tanh(h).transpose(1, 2)
        if self.written is None:
            h = self.conv(h)
        else:  # (Mamba's causal_conv1d_fn: the weight squeezed and unsqueezed again)
            h = F.conv1d(h, self.conv.weight.squeeze(1).unsqueeze(1), self.conv.bias, padding=1, groups=4)
        return self.head(torch.sigmoid(h).transpose(1, 2))


@pytest.mark.parametrize("evaluated_first", [False, True], ids=["", "no_grad-forward-first"])
@pytest.mark.parametrize("written", ["transposed", "in place", "left"])
def test_a_map_written_out_takes_its_modules_steps(written, evaluated_first):
    """(An evaluation forward under no_grad first, as the training loop runs one, records nothing, so it shows
    nothing about the bias: the fold of the first training forward decides.)"""
    torch.manual_seed(0)
    modules = Twin(None, bias=written != "left").double()
    twin = copy.deepcopy(modules)
    twin.written = written
    x = torch.randn(5, 7, 6, dtype=torch.float64)
    target = torch.randn(5, 7, 3, dtype=torch.float64)
    kinds = {}
    for model in (modules, twin):
        opt = LocoPropOptimizer(model, variant="M", lr=0.05, activation_lr=2.0, local_iters=3, inner="sgd")
        if evaluated_first:
            with torch.no_grad():
                model(x)
        for _ in range(2):
            opt.zero_grad()
            (model(x) - target).square().sum().backward()
            opt.step()
        kinds[model.written] = [(row.unit, row.kind, row.transfer) for row in opt.describe().rows]
        assert opt.describe().local_share == 1.0
    fc_kind = "left_matmul" if written == "left" else "linear"
    if written != "left":
        assert opt.parameter_roles()["fc.bias"] == "fc"
    assert kinds[written] == [("fc", fc_kind, "tanh"), ("conv", "conv1d", "sigmoid"), ("head", "linear", "identity")]
    for (name, got), expected in zip(twin.named_parameters(), modules.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=name)


def test_a_matrix_that_no_linear_map_uses_takes_plain_steps_and_says_so():
    """Every parameter of two or more dimensions is a candidate unit; a position embedding added to the input
    is used by no linear map, so it takes plain steps, and describe() and parameter_roles() agree."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.positions = nn.Parameter(torch.randn(7, 6, dtype=torch.float64))
            self.fc = nn.Linear(6, 3).double()

        def forward(self, x):
            return self.fc(x + self.positions)

    model = Positions()
    opt = LocoPropOptimizer(model, variant="S")
    assert opt.parameter_roles()["positions"] == "Positions.positions"  # (before a forward: a candidate unit)
    model(torch.randn(5, 7, 6, dtype=torch.float64)).square().sum().backward()
    opt.step()
    assert opt.parameter_roles() == {"positions": "backprop", "fc.weight": "fc", "fc.bias": "fc"}
    description = opt.describe()
    assert description.rows[0].kind == "unseen" and ("positions", 42) in description.outside


def test_a_use_without_the_bias_beside_a_use_with_it_is_its_own_map():
    """A layer used whole, F.linear(x1, W, b), and without its bias, x2 @ W.T: the second use was dropped (its
    map differs from the unit's). Both are uses now; three constant-lr SGD iterations on SPEC §2's S objective
    ½‖x1·θ_Wᵀ + θ_b − â1‖² + ½‖x2·θ_Wᵀ − â2‖², â = a − γ·g, written out with autograd."""

    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x1, x2):
            return torch.tanh(self.fc(x1)).sum() + (x2 @ self.fc.weight.T).square().sum()

    torch.manual_seed(0)
    model = TwoUses().double()
    x1, x2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    eta, gamma = 0.05, 0.5
    old = [p.detach().clone().requires_grad_() for p in model.fc.parameters()]
    a1, a2 = F.linear(x1, *old), x2 @ old[0].T
    g1, g2 = torch.autograd.grad(torch.tanh(a1).sum() + a2.square().sum(), [a1, a2])
    targets = [(a1 - gamma * g1).detach(), (a2 - gamma * g2).detach()]
    theta = [p.detach().clone().requires_grad_() for p in old]
    for _ in range(3):
        objective = 0.5 * ((F.linear(x1, *theta) - targets[0]).square().sum()
                           + (x2 @ theta[0].T - targets[1]).square().sum())  # fmt: skip
        theta = [(p - eta * g).detach().requires_grad_() for p, g in zip(theta, torch.autograd.grad(objective, theta))]

    opt = LocoPropOptimizer(model, variant="S", lr=eta, activation_lr=gamma, local_iters=3, inner="sgd",
                            inner_schedule="constant")  # fmt: skip
    model(x1, x2).backward()
    assert len(opt.units[0].records) == 2
    opt.step()
    for got, want in zip(model.fc.parameters(), theta):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)


def test_a_frozen_bias_added_after_the_product_is_a_constant_of_the_map():
    """x @ W.T + b with b frozen: the addition is folded into the map as its constant, so the transfer that
    consumes the sum is read (tanh), and the step is the module form's."""
    torch.manual_seed(0)
    modules = Twin(None).double()
    modules.fc.bias.requires_grad_(False)
    twin = copy.deepcopy(modules)
    twin.written = "transposed"
    x, target = torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 7, 3, dtype=torch.float64)
    for model in (modules, twin):
        opt = LocoPropOptimizer(model, variant="M", lr=0.05, activation_lr=2.0, local_iters=3, inner="sgd")
        (model(x) - target).square().sum().backward()
        opt.step()
        assert opt.units[0].transfer.name == "tanh"
    for got, expected in zip(twin.parameters(), modules.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_bias_that_the_map_does_not_add_takes_plain_steps_and_says_so():
    """A layer's weight used as x @ W.T with its bias added elsewhere (after a tanh): the map has no bias, so
    the bias takes plain steps; parameter_roles() said it was the unit's."""

    class Elsewhere(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3).double()

        def forward(self, x):
            return torch.tanh(x @ self.fc.weight.T) + self.fc.bias

    model = Elsewhere()
    opt = LocoPropOptimizer(model, variant="S")
    model(torch.randn(5, 4, dtype=torch.float64)).square().sum().backward()
    opt.step()
    assert opt.parameter_roles() == {"fc.weight": "fc", "fc.bias": "backprop"}
    assert ("fc.bias", 3) in opt.describe().outside


def test_a_block_without_the_bias_first_and_one_with_it_later_keep_the_bias_in_the_map():
    """F.linear(x, W[:4]) and then F.linear(x, W[4:], b[4:]) in one forward: the first use took the bias
    provisionally and, seeing no addition, settled the map without it, though the second use adds its part
    (the bias then stepped half as far as SPEC's). One SGD iteration is the backprop step for every entry."""

    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 8).double()

        def forward(self, x):
            top = F.linear(x, self.fc.weight[:4])
            bottom = F.linear(x, self.fc.weight[4:], self.fc.bias[4:])
            return torch.tanh(top).sum() + torch.tanh(bottom).square().sum()

    model = Halves()
    x = torch.randn(5, 3, dtype=torch.float64)
    opt = LocoPropOptimizer(model, variant="S", lr=0.1, activation_lr=0.5, local_iters=1, inner="sgd")
    old = [p.detach().clone() for p in model.parameters()]
    model(x).backward()
    expected = [p - 0.1 * 0.5 * q.grad for p, q in zip(old, model.parameters())]
    opt.step()
    assert opt.units[0].uses_bias and opt.parameter_roles()["fc.bias"] == "fc"
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-14)


class EinsumTwin(nn.Module):
    """A projection to 2 heads of 2, tanh, and a head: by ``nn.Linear`` (``written=None``) or as XLNet writes it,
    ``torch.einsum("blh,hnd->blnd", x, q)`` with a 3-D weight q (the weight second, first, or the operands as a
    list)."""

    def __init__(self, written: str | None):
        super().__init__()
        self.written = written
        self.fc = nn.Linear(6, 4, bias=False)
        self.q = nn.Parameter(self.fc.weight.detach().T.reshape(6, 2, 2).clone())
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: batch × length × 6
        if self.written is None:
            h = self.fc(x)
        elif self.written == "second":
            h = torch.einsum("blh,hnd->blnd", x, self.q).flatten(2)
        elif self.written == "first":
            h = torch.einsum("hnd,blh->blnd", self.q, x).flatten(2)
        else:
            h = torch.einsum("blh,hnd->blnd", [x, self.q]).flatten(2)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("variant", ["M", "S"])
@pytest.mark.parametrize("written", ["second", "first", "list"])
def test_a_weight_in_an_einstein_sum_is_a_unit_that_takes_the_linear_layers_steps(written, variant):
    """The 3-D weight of an Einstein sum is a unit (its map is linear in it) and takes, entry for entry, the
    steps of the nn.Linear whose weight it holds reshaped (it took plain steps: XLNet was half local)."""
    torch.manual_seed(0)
    modules = EinsumTwin(None).double()
    twin = copy.deepcopy(modules)
    twin.written = written
    x = torch.randn(5, 7, 6, dtype=torch.float64)
    target = torch.randn(5, 7, 3, dtype=torch.float64)
    for model, unit in ((modules, "fc"), (twin, "EinsumTwin.q")):
        opt = LocoPropOptimizer(model, variant=variant, lr=0.05, activation_lr=2.0, local_iters=3, inner="sgd")
        for _ in range(2):
            opt.zero_grad()
            (model(x) - target).square().sum().backward()
            opt.step()
        rows = {row.unit: (row.kind, row.transfer) for row in opt.describe().rows if row.kind != "unseen"}
        assert rows[unit] == ("linear" if unit == "fc" else "einsum", "tanh")
    torch.testing.assert_close(twin.q.reshape(6, 4).T, modules.fc.weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(twin.head.weight, modules.head.weight, rtol=1e-10, atol=1e-12)
    assert not torch.equal(twin.q.reshape(6, 4).T, EinsumTwin(None).double().fc.weight)


def test_an_einstein_sum_of_activations_or_of_two_weights_is_no_unit():
    """Attention's einsum of two activations is no map of a weight; a weight factorised into two parameters
    (``einsum("ij,jk->ik", A, B)``) names no single weight of the map: neither is a unit (both take plain steps)."""
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3, 4))
    model = nn.Linear(4, 4)
    model.a, model.b = a, b
    opt = LocoPropOptimizer(model)
    x = torch.randn(5, 4)
    scores = torch.einsum("id,jd->ij", model(x), x)
    (torch.einsum("ij,jk->ik", a, b).sum() + torch.einsum("ij,jk->ik", scores, model(x)).sum()).backward()
    rows = {row.unit: row.kind for row in opt.describe().rows}
    assert rows["Linear.a"] == rows["Linear.b"] == "unseen" and rows["Linear"] == "linear"


class _Scaled(nn.Module):
    """A head, then a learned 1-D scale of its logits by an Einstein sum."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return torch.einsum("bc,c->bc", self.head(torch.tanh(self.fc(x))), self.scale)


def test_an_einstein_sum_with_a_one_dimensional_parameter_is_no_map_of_a_weight():
    """A 1-D parameter is no unit candidate: its einsum is an operation like ``*`` (it was taken as a map that no
    unit records, so the head lost output_activation)."""
    model = _Scaled()
    opt = LocoPropOptimizer(model, variant="M", output_activation="softmax")
    F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,))).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert [(u.name, u.transfer.name) for u in opt.units] == [("fc", "tanh"), ("head", "softmax")]


class _InputMajorLinear(nn.Linear):
    """An nn.Linear subclass keeping its weight d_in × d_out and computing x @ W + b (ports from TF/JAX)."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)

    def forward(self, x):
        return x @ self.weight + self.bias


def test_a_linear_subclass_that_uses_its_weight_its_own_way_is_a_unit_of_that_map():
    model = nn.Sequential(_InputMajorLinear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = LocoPropOptimizer(model)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert [(row.unit, row.kind, row.transfer) for row in opt.describe().rows] == [
        ("0", "matmul", "tanh"), ("2", "linear", "identity")]  # fmt: skip
