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

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locoprop import LocoPropOptimizer


class Twin(nn.Module):
    """A linear layer, tanh, and a depthwise convolution, computed by the modules (``written=None``) or
    written out: ``"transposed"`` (x @ W.T), ``"left"`` ((W @ xᵀ)ᵀ)."""

    def __init__(self, written: str | None):
        super().__init__()
        self.written = written
        self.fc = nn.Linear(6, 4, bias=False)  # (a bias added after the product is an add: not the map's)
        self.conv = nn.Conv1d(4, 4, 3, groups=4, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: batch × length × 6
        if self.written is None:
            h = self.fc(x)
        elif self.written == "transposed":
            h = x @ self.fc.weight.T
        else:
            h = (self.fc.weight @ x.transpose(1, 2)).transpose(1, 2)
        h = torch.tanh(h).transpose(1, 2)
        if self.written is None:
            h = self.conv(h)
        else:  # (Mamba's causal_conv1d_fn: the weight squeezed and unsqueezed again)
            h = F.conv1d(h, self.conv.weight.squeeze(1).unsqueeze(1), self.conv.bias, padding=1, groups=4)
        return self.head(torch.sigmoid(h).transpose(1, 2))


@pytest.mark.parametrize("written", ["transposed", "left"])
def test_a_map_written_out_takes_its_modules_steps(written):
    torch.manual_seed(0)
    modules = Twin(None).double()
    twin = copy.deepcopy(modules)
    twin.written = written
    x = torch.randn(5, 7, 6, dtype=torch.float64)
    target = torch.randn(5, 7, 3, dtype=torch.float64)
    kinds = {}
    for model in (modules, twin):
        opt = LocoPropOptimizer(model, variant="M", lr=0.05, activation_lr=2.0, local_iters=3, inner="sgd")
        for _ in range(2):
            opt.zero_grad()
            (model(x) - target).square().sum().backward()
            opt.step()
        kinds[model.written] = [(row.unit, row.kind, row.transfer) for row in opt.describe().rows]
        assert opt.describe().local_share == 1.0
    fc_kind = "left_matmul" if written == "left" else "linear"
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
