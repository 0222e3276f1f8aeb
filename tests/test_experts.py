"""A mixture of experts' stacked weights as units (SPEC §2: a unit is the use, not the module class).

Hugging Face's MoE layers (Mixtral, Qwen3-MoE, GPT-OSS) keep every expert's
matrix in one stacked parameter (E × d_out × d_in, ``gate_up_proj``) and run
expert e on its tokens either one expert at a time, ``F.linear(x_e, W[e])``
("eager"), or all at once, ``torch._grouped_mm(x_sorted, Wᵀ, offs)`` (their
default where torch has it). Either way each expert's use is a linear map of
its own matrix of the unit's weight. The step is checked against SPEC §2's S
objective written out with autograd on per-expert maps: targets
â_e = a_e − γ·g_e, K plain gradient steps on ½Σ_e‖x_e·θ[e]ᵀ − â_e‖².
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from locoprop import LocoPropOptimizer
from locoprop.layers import Block

transformers.logging.set_verbosity_error()

EXPERTS, D_IN, D_OUT, TOKENS = 4, 8, 12, 20


class Experts(nn.Module):
    """Stacked experts routed by a fixed assignment: "eager" (F.linear per expert), "grouped"
    (torch._grouped_mm on tokens sorted by expert), "addmm" (x·W[e] + b[e] with a stacked E × d_in × d_out
    weight and its bias, as a matmul) or "added" (x @ W[e] + b[e], GPT-OSS's eager experts: the bias added
    right after the product)."""

    def __init__(self, kind: str, dtype):
        super().__init__()
        self.kind = kind
        matmul = kind in ("addmm", "added")
        shape = (EXPERTS, D_IN, D_OUT) if matmul else (EXPERTS, D_OUT, D_IN)
        self.proj = nn.Parameter(torch.randn(shape, dtype=dtype) / D_IN**0.5)
        self.proj_bias = nn.Parameter(torch.randn(EXPERTS, D_OUT, dtype=dtype)) if matmul else None

    def forward(self, x, expert_of_token):
        order = torch.argsort(expert_of_token, stable=True)
        x = x[order]
        counts = torch.bincount(expert_of_token, minlength=EXPERTS)
        if self.kind == "grouped":
            out = torch._grouped_mm(x, self.proj.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
        else:
            parts, start = [], 0
            for e, count in enumerate(counts.tolist()):
                rows = x[start : start + count]
                if self.kind == "eager":
                    parts.append(F.linear(rows, self.proj[e]))
                elif self.kind == "added":
                    parts.append(rows @ self.proj[e] + self.proj_bias[e])
                else:
                    parts.append(torch.addmm(self.proj_bias[e], rows, self.proj[e]))
                start += count
            out = torch.cat(parts)
        return torch.tanh(out[torch.argsort(order)])  # (after the tokens are put back in order: no transfer)


def _batch(dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(TOKENS, D_IN, generator=generator, dtype=dtype)
    experts = torch.tensor([0, 2, 2, 1, 0, 2, 0, 0, 1, 2, 2, 0, 1, 2, 0, 0, 2, 1, 0, 2])  # expert 3: no token
    target = torch.randn(TOKENS, D_OUT, generator=generator, dtype=dtype)
    return x, experts, target


def _loss(model, x, experts, target):
    return (model(x, experts) - target).square().sum() / 2


def _expected(model, x, experts, target, gamma, eta, iters):
    """θ after K gradient steps of size η on SPEC §2's S objective of the stacked unit: one use per expert
    with tokens, a_e = x_e·W[e]ᵀ (or x_e·W[e] + b[e]), targets â_e = a_e − γ·g_e from autograd."""
    params = [p.detach().clone().requires_grad_() for p in (model.proj, model.proj_bias) if p is not None]

    def maps(theta):
        uses = []
        for e in range(EXPERTS):
            rows = x[experts == e]
            if len(rows):
                a = F.linear(rows, theta[0][e]) if len(theta) == 1 else rows @ theta[0][e] + theta[1][e]
                uses.append(a)
        return uses

    uses = maps(params)
    out = torch.zeros(TOKENS, D_OUT, dtype=x.dtype)
    for e, a in zip([e for e in range(EXPERTS) if (experts == e).any()], uses):
        out = out.index_put((torch.nonzero(experts == e)[:, 0],), a)
    loss = (torch.tanh(out) - target).square().sum() / 2
    torch.testing.assert_close(loss, _loss(model, x, experts, target))  # the hand-written forward is the model's
    grads = torch.autograd.grad(loss, uses)
    targets = [(a - gamma * g).detach() for a, g in zip(uses, grads)]
    theta = [p.detach().clone().requires_grad_() for p in params]
    for _ in range(iters):
        objective = sum(0.5 * (a - t).square().sum() for a, t in zip(maps(theta), targets))
        steps = torch.autograd.grad(objective, theta)
        theta = [(p - eta * s).detach().requires_grad_() for p, s in zip(theta, steps)]
    return [p.detach() for p in theta]


CASES = [
    ("eager", torch.float64, 1e-12),
    ("addmm", torch.float64, 1e-12),
    ("added", torch.float64, 1e-12),
    ("grouped", torch.float32, 2e-5),
]


@pytest.mark.parametrize(("kind", "dtype", "tolerance"), CASES, ids=[c[0] for c in CASES])
def test_each_experts_use_is_recorded_with_its_tokens_and_matrix(kind, dtype, tolerance):
    torch.manual_seed(0)
    model = Experts(kind, dtype)
    x, experts, target = _batch(dtype)
    opt = LocoPropOptimizer(model, variant="M")
    _loss(model, x, experts, target).backward()
    (unit,) = opt.units
    uses = sorted((use for record in unit.records for use in unit.by_group(record)), key=lambda use: use.block)
    rows = D_IN if model.proj_bias is not None else D_OUT  # (the rows of each expert's matrix)
    assert [use.block for use in uses] == [Block((e,), 0, rows) for e in range(3)]  # expert 3 had no token
    for e, use in enumerate(uses):
        torch.testing.assert_close(use.x, x[experts == e], rtol=0, atol=0)
        matmul = model.proj_bias is not None
        weight = model.proj[e].T if matmul else model.proj[e]
        expected = F.linear(x[experts == e], weight, model.proj_bias[e] if matmul else None)
        torch.testing.assert_close(use.a, expected.detach(), rtol=tolerance, atol=tolerance)
    assert unit.transfer.name == "identity"  # the tanh comes after the tokens are put back in order
    assert opt.describe().local_share == 1.0


@pytest.mark.parametrize(("kind", "dtype", "tolerance"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("variant", ["S", "M"])
def test_the_step_solves_every_experts_objective(kind, dtype, tolerance, variant):
    gamma, eta, iters = 0.5, 0.05, 4
    torch.manual_seed(0)
    model = Experts(kind, dtype)
    x, experts, target = _batch(dtype)
    expected = _expected(model, x, experts, target, gamma, eta, iters)
    opt = LocoPropOptimizer(model, variant=variant, lr=eta, activation_lr=gamma, local_iters=iters, inner="sgd",
                            inner_schedule="constant")  # fmt: skip
    old = model.proj.detach().clone()
    _loss(model, x, experts, target).backward()
    plain = old - iters * eta * gamma * model.proj.grad  # K steps on γ·G alone
    opt.step()
    torch.testing.assert_close(model.proj.detach(), expected[0], rtol=tolerance, atol=tolerance)
    if model.proj_bias is not None:
        torch.testing.assert_close(model.proj_bias.detach(), expected[1], rtol=tolerance, atol=tolerance)
    assert (expected[0] - plain).abs().max() > 1e-3  # the experts' divergences act
    torch.testing.assert_close(model.proj[3].detach(), old[3], rtol=0, atol=0)  # no token: no gradient, no step


def _mixtral(experts_implementation: str) -> nn.Module:
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=16,
                                        experts_implementation=experts_implementation)  # fmt: skip
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_mixtral_experts_are_local_under_either_kernel(implementation):
    """Hugging Face's Mixtral: its stacked experts were no candidates (not named *weight) and took plain
    steps, 20% of the model local; each kernel's uses are recorded now, and both take one step alike, to float32
    rounding: the kernels' products differ by it (gradients by 2e-7 of their norm), and the steps by as much with
    inner SGD (Adam's first steps, about lr·sign(g), magnified it where a gradient is near zero: 3.8e-6 against
    steps of 1.8e-3 on an AMD EPYC, beyond the tolerance)."""
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    model = _mixtral(implementation)
    kwargs = dict(variant="M", lr=0.01, activation_lr=1.0, local_iters=3, inner="sgd", inner_schedule="constant")
    opt = LocoPropOptimizer(model, **kwargs)
    model(input_ids=ids, labels=ids).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (nothing said: no share warning, no fallback to S)
        opt.step()
    rows = {row.unit: row for row in opt.describe().rows}
    assert rows["model.layers.0.mlp.experts.gate_up_proj"].kind == "linear"
    assert rows["model.layers.0.mlp.experts.down_proj"].kind == "linear"
    assert opt.describe().local_share > 0.99
    reference = _mixtral("eager")
    before = [p.detach().clone() for p in reference.parameters()]
    ref_opt = LocoPropOptimizer(reference, **kwargs)
    reference(input_ids=ids, labels=ids).loss.backward()
    ref_opt.step()
    for (name, got), expected, start in zip(model.named_parameters(), reference.parameters(), before):
        step = expected.detach() - start
        assert step.norm() > 0, name
        assert (got.detach() - start - step).norm() <= 1e-4 * step.norm(), name


class FixedCapacity(nn.Module):
    """Experts with a fixed capacity, written by hand: torch.bmm(x, W) over a stacked E × d_in × d_out weight
    (``stacked``), or expert by expert, x[e] @ W[e] (one block use each)."""

    def __init__(self, stacked: bool):
        super().__init__()
        self.stacked = stacked
        self.w = nn.Parameter(torch.randn(EXPERTS, D_IN, D_OUT, dtype=torch.float64) / D_IN**0.5)

    def forward(self, x):  # x: E × capacity × d_in
        if self.stacked:
            return torch.bmm(x, self.w)
        return torch.stack([x[e] @ self.w[e] for e in range(EXPERTS)])


def _two_steps(model: nn.Module, x, target, variant: str, squash=lambda a: a) -> LocoPropOptimizer:
    """Two LocoProp steps (K = 3, inner SGD) on Σ(squash(model(x)) − target)²; the optimizer, to describe them."""
    opt = LocoPropOptimizer(model, variant=variant, lr=0.05, activation_lr=0.5, local_iters=3, inner="sgd")
    for _ in range(2):
        opt.zero_grad()
        (squash(model(x)) - target).square().sum().backward()
        opt.step()
    return opt


def _twins(seed: int, make, target=torch.randn) -> tuple:
    """A batch x (E × 6 × d_in) and its target from ``seed``, and two models, ``make(True)`` and ``make(False)``,
    with the same parameters."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(EXPERTS, 6, D_IN, generator=generator, dtype=torch.float64)
    y = target(EXPERTS, 6, D_OUT, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    first, second = make(True), make(False)
    second.load_state_dict(first.state_dict())
    return x, y, first, second


def test_a_batched_matmul_over_stacked_experts_takes_the_step_of_its_experts_one_by_one():
    x, target, stacked, one_by_one = _twins(5, FixedCapacity)
    for model in (stacked, one_by_one):
        opt = _two_steps(model, x, target, "S", squash=torch.tanh)
        assert opt.describe().rows[0].kind == ("stacked_matmul" if model.stacked else "matmul")
    torch.testing.assert_close(stacked.w.detach(), one_by_one.w.detach(), rtol=1e-10, atol=1e-12)


class FlatExperts(nn.Module):
    """DBRX's layout: the experts' matrices in one flat E·d_out × d_in weight, expert e's rows viewed as
    ``w.view(E, d_out, d_in)[e]`` and applied as ``F.linear(x, w_e)`` or written out, ``x @ w_e.T``."""

    def __init__(self, written: bool):
        super().__init__()
        self.written = written
        self.w = nn.Parameter(torch.randn(EXPERTS * D_OUT, D_IN, dtype=torch.float64) / D_IN**0.5)

    def forward(self, x):  # x: E × capacity × d_in
        experts = self.w.view(EXPERTS, D_OUT, D_IN)
        if self.written:
            return torch.stack([torch.tanh(x[e] @ experts[e].T) for e in range(EXPERTS)])
        return torch.stack([torch.tanh(F.linear(x[e], experts[e])) for e in range(EXPERTS)])


@pytest.mark.parametrize("variant", ["M", "S"])
def test_an_experts_block_applied_transposed_is_its_linear_use(variant):
    """``x @ w_e.T`` with w_e a block of rows of a weight is ``F.linear(x, w_e)`` written out: the unit takes the
    same steps (it was not seen: DBRX's w1 and v1 took plain steps)."""
    x, target, written, functional = _twins(6, FlatExperts)
    for model in (functional, written):
        opt = _two_steps(model, x, target, variant)
        assert [(row.kind, row.transfer) for row in opt.describe().rows] == [("linear", "tanh")]
    torch.testing.assert_close(written.w.detach(), functional.w.detach(), rtol=1e-10, atol=1e-12)


def test_a_flattened_stack_is_no_block_of_one_matrix():
    """W.view(E * d_out, d_in) of a stacked weight was read as rows 0:E·d_out of matrix 0 (S solved a wrong
    problem, M crashed mid-step). It is no block: the unit takes plain steps on γ·G, as one SGD step shows."""

    class Flattened(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Parameter(torch.randn(3, 4, 4, dtype=torch.float64))

        def forward(self, x):
            return torch.tanh(F.linear(x, self.qkv.view(12, 4)))

    model = Flattened()
    x = torch.randn(5, 4, dtype=torch.float64)
    opt = LocoPropOptimizer(model, variant="M", lr=0.1, activation_lr=0.5, local_iters=3, inner="sgd",
                            inner_schedule="constant")  # fmt: skip
    old = model.qkv.detach().clone()
    model(x).square().sum().backward()
    assert opt.units[0].records == []
    expected = old - 0.1 * 0.5 * model.qkv.grad  # (a plain step is one inner step on γ·G)
    opt.step()
    torch.testing.assert_close(model.qkv.detach(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("kind", "variant"), [("eager", "M"), ("added", "M"), ("addmm", "S")])
def test_bf16_local_solves_of_experts_stay_at_bf16_precision(kind, variant):
    """local_dtype="bfloat16": each expert's two products in bfloat16 on centred rows, against the float64
    objective's step, within 0.5% of the step (bf16 rounds at 0.4%; measured 0.06%)."""
    gamma, eta, iters = 0.5, 0.05, 4
    torch.manual_seed(0)
    model = Experts(kind, torch.float64)
    x, experts, target = _batch(torch.float64)
    x = x + 3.0  # (a mean far from zero: rounding x itself, uncentred, would lose the step)
    expected = _expected(model, x, experts, target, gamma, eta, iters)
    old = [p.detach().clone() for p in (model.proj, model.proj_bias) if p is not None]
    opt = LocoPropOptimizer(model, variant=variant, lr=eta, activation_lr=gamma, local_iters=iters, inner="sgd",
                            inner_schedule="constant", local_dtype="bfloat16")  # fmt: skip
    _loss(model, x, experts, target).backward()
    opt.step()
    for got, want, before in zip([p for p in (model.proj, model.proj_bias) if p is not None], expected, old):
        error = (got.detach() - want).norm() / (want - before).norm()
        assert error < 5e-3, error


class BlockDiagonal(nn.Module):
    """RecurrentGemma's gate: per head e, b[e] + x[e]·W[e] over a stacked weight, in one ``torch.baddbmm``
    (``fused``) or head by head with the bias block added (the form whose uses are checked above)."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.gate_weight = nn.Parameter(torch.randn(EXPERTS, D_IN, D_OUT, dtype=torch.float64) / D_IN**0.5)
        self.gate_bias = nn.Parameter(torch.randn(EXPERTS, D_OUT, dtype=torch.float64) * 0.1)

    def forward(self, x):  # x: E × n × d_in
        if self.fused:
            return torch.sigmoid(torch.baddbmm(self.gate_bias[:, None, :], x, self.gate_weight))
        return torch.stack([torch.sigmoid(x[e] @ self.gate_weight[e] + self.gate_bias[e]) for e in range(EXPERTS)])


@pytest.mark.parametrize("variant", ["M", "S"])
def test_a_batched_matmul_added_to_a_stacked_bias_is_one_unit_with_its_bias(variant):
    """``torch.baddbmm(b[:, None, :], x, W)`` is the stacked map with its bias (RecurrentGemma's gates were not
    seen): the steps of the head-by-head form."""
    x, target, fused, by_head = _twins(7, BlockDiagonal, target=torch.rand)
    for model in (fused, by_head):
        opt = _two_steps(model, x, target, variant)
        assert [row.transfer for row in opt.describe().rows] == ["sigmoid"]
        assert opt.parameter_roles()["gate_bias"] == "BlockDiagonal.gate"
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.detach(), getattr(by_head, name).detach(), rtol=1e-10, atol=1e-12, msg=name)
