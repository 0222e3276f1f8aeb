"""Cross-attention's packed in-projection as one unit used by row blocks (SPEC §2: every linear map a unit).

``nn.MultiheadAttention`` with a query other than its key projects the query
with rows 0:E of ``in_proj_weight`` and the key and value with the rest
(rows E:2E and 2E:3E when key and value differ too): each block's use is a
linear map of the unit's weight. The step is checked against SPEC §2's S
objective written out with autograd on a hand-written attention: targets
â = a − γ·g per use, K plain gradient steps on ½Σ‖layer_θ(x) − â‖².
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locoprop import LocoPropOptimizer
from locoprop.layers import Block

E, HEADS = 8, 2


def _attention(seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    attention = nn.MultiheadAttention(E, HEADS, batch_first=True).double()
    with torch.no_grad():
        attention.in_proj_bias.normal_()  # (zero at construction: a wrong bias block would go unseen)
    return attention


def _inputs(distinct_value: bool):
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(3, 5, E, generator=generator, dtype=torch.float64)
    memory = torch.randn(3, 7, E, generator=generator, dtype=torch.float64)
    value = torch.randn(3, 7, E, generator=generator, dtype=torch.float64) if distinct_value else memory
    target = torch.randn(3, 5, E, generator=generator, dtype=torch.float64)
    return query, memory, value, target


def _loss(output, target):
    return (output - target).square().sum() / 2


def _by_hand(attention, query, key, value, weight, bias):
    """The attention written out, with the in-projections as separate maps of row blocks of (weight, bias):
    (output, [(x, a) per projection, by row block])."""
    blocks = [(0, E), (E, 2 * E), (2 * E, 3 * E)] if key is not value else [(0, E), (E, 3 * E)]
    inputs = [query, key, value] if key is not value else [query, key]
    uses = [(x, F.linear(x, weight[i:j], bias[i:j])) for x, (i, j) in zip(inputs, blocks)]
    q, k, v = [uses[0][1], uses[1][1], uses[2][1]] if len(uses) == 3 else [uses[0][1], *uses[1][1].chunk(2, -1)]

    def heads(t):
        return t.unflatten(-1, (HEADS, E // HEADS)).transpose(1, 2)

    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(E // HEADS), -1)
    mixed = (weights @ heads(v)).transpose(1, 2).flatten(-2)
    return attention.out_proj(mixed), blocks, uses


def _expected_in_projection(attention, query, key, value, target, gamma, eta, iters):
    """θ after ``iters`` gradient steps of size η on SPEC §2's S objective of the in-projection unit, from
    θ^old; targets â = a − γ·g with g = dL/da of each block's use, by autograd."""
    weight, bias = (p.detach().requires_grad_() for p in (attention.in_proj_weight, attention.in_proj_bias))
    output, blocks, uses = _by_hand(attention, query, key, value, weight, bias)
    grads = torch.autograd.grad(_loss(output, target), [a for _, a in uses])
    targets = [(a - gamma * g).detach() for (_, a), g in zip(uses, grads)]
    theta = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    for _ in range(iters):
        objective = sum(0.5 * (F.linear(x, theta[0][i:j], theta[1][i:j]) - t).square().sum()
                        for (x, _), (i, j), t in zip(uses, blocks, targets))  # fmt: skip
        step = torch.autograd.grad(objective, theta)
        theta = [(p - eta * s).detach().requires_grad_() for p, s in zip(theta, step)]
    return [p.detach() for p in theta]


@pytest.mark.parametrize("distinct_value", [False, True], ids=["key-is-value", "three-inputs"])
def test_the_hand_written_attention_is_the_module(distinct_value):
    attention = _attention()
    query, key, value, _ = _inputs(distinct_value)
    expected = attention(query, key, value, need_weights=False)[0]
    got, _, _ = _by_hand(attention, query, key, value, attention.in_proj_weight, attention.in_proj_bias)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("distinct_value", [False, True], ids=["key-is-value", "three-inputs"])
def test_each_row_block_is_recorded_with_its_input_and_output(distinct_value):
    attention = _attention()
    query, key, value, target = _inputs(distinct_value)
    opt = LocoPropOptimizer(attention)
    _loss(attention(query, key, value, need_weights=False)[0], target).backward()
    (unit,) = [u for u in opt.units if u.name.endswith("in_proj")]
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    _, blocks, uses = _by_hand(attention, query, key, value, weight, bias)
    assert sorted(r.block for r in unit.records) == [Block((), *rows) for rows in blocks]
    for record in unit.records:  # (batch_first: the attention runs on sequence-first rows)
        x, a = uses[blocks.index((record.block.start, record.block.stop))]
        torch.testing.assert_close(record.x, x.transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(record.a, a.detach().transpose(0, 1), rtol=1e-12, atol=1e-12)
    assert opt.describe().local_share == 1.0  # in_proj and out_proj: every parameter is local


@pytest.mark.parametrize(
    ("variant", "parallel", "distinct_value"),
    [("S", "batched", False), ("M", "batched", False), ("S", "none", False), ("M", "batched", True),
     ("S", "none", True)],
)  # fmt: skip
def test_the_step_solves_the_objective_of_every_block(variant, parallel, distinct_value):
    """The in-projection's transfer is the identity (its outputs are reshaped, then multiplied), so M's
    matching loss is S's: both solve ½Σ‖layer_θ(x) − â‖² summed over the blocks' uses."""
    gamma, eta, iters = 0.7, 0.05, 4
    attention = _attention()
    query, key, value, target = _inputs(distinct_value)
    expected = _expected_in_projection(attention, query, key, value, target, gamma, eta, iters)
    opt = LocoPropOptimizer(attention, variant=variant, lr=eta, activation_lr=gamma, local_iters=iters, inner="sgd",
                            inner_schedule="constant", parallel=parallel)  # fmt: skip
    old = attention.in_proj_weight.detach().clone()
    _loss(attention(query, key, value, need_weights=False)[0], target).backward()
    plain = old - iters * eta * gamma * attention.in_proj_weight.grad  # K steps on γ·G alone
    opt.step()
    torch.testing.assert_close(attention.in_proj_weight.detach(), expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(attention.in_proj_bias.detach(), expected[1], rtol=0, atol=1e-12)
    assert (expected[0] - plain).abs().max() > 1e-3  # the blocks' divergences act


def test_bf16_local_solves_of_blocks_stay_at_bf16_precision():
    gamma, eta, iters = 0.7, 0.05, 4
    attention = _attention()
    query, key, value, target = _inputs(False)
    expected = _expected_in_projection(attention, query, key, value, target, gamma, eta, iters)
    old = attention.in_proj_weight.detach().clone()
    opt = LocoPropOptimizer(attention, variant="S", lr=eta, activation_lr=gamma, local_iters=iters, inner="sgd",
                            inner_schedule="constant", local_dtype="bfloat16")  # fmt: skip
    _loss(attention(query, key, value, need_weights=False)[0], target).backward()
    opt.step()
    error = (attention.in_proj_weight.detach() - expected[0]).norm() / (expected[0] - old).norm()
    assert error < 2e-2


def test_the_exact_solve_refuses_blocks_and_changes_nothing():
    attention = _attention()
    query, key, value, target = _inputs(False)
    opt = LocoPropOptimizer(attention, variant="S", solve="exact", prox=0.1)
    _loss(attention(query, key, value, need_weights=False)[0], target).backward()
    before = {n: p.detach().clone() for n, p in attention.named_parameters()}
    with pytest.raises(RuntimeError, match=r"in_proj'.*blocks of rows.*solve='iterative'"):
        opt.step()
    for n, p in attention.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)


def test_implicit_hypergradients_refuse_blocks_and_change_nothing():
    attention = _attention()
    query, key, value, target = _inputs(False)
    opt = LocoPropOptimizer(attention, variant="S", hypergrad_lr=0.01, hypergrad="implicit")
    _loss(attention(query, key, value, need_weights=False)[0], target).backward()
    before = {n: p.detach().clone() for n, p in attention.named_parameters()}
    gammas = [group["activation_lr"] for group in opt.param_groups]
    with pytest.raises(ValueError, match=r"hypergrad='implicit'.*in_proj'.*blocks"):
        opt.step()
    for n, p in attention.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
    assert [group["activation_lr"] for group in opt.param_groups] == gammas


class _Projection(nn.Module):
    """F.linear with rows ``weight_rows`` of a packed weight and entries ``bias_rows`` of its bias."""

    def __init__(self):
        super().__init__()
        self.packed_weight = nn.Parameter(torch.randn(3 * E, E, dtype=torch.float64))
        self.packed_bias = nn.Parameter(torch.randn(3 * E, dtype=torch.float64))

    def forward(self, x, weight_rows, bias_rows):
        return F.linear(x, self.packed_weight[weight_rows], self.packed_bias[bias_rows])


def test_a_bias_that_is_not_the_weights_block_is_no_use_of_the_unit():
    """F.linear with rows 0:E of the weight and another block of the bias is no map of the unit's parameters:
    the unit takes no record of it (its gradient still enters through G); with the same block it does."""
    projection = _Projection()
    query, _, _, target = _inputs(False)
    opt = LocoPropOptimizer(projection)
    (unit,) = opt.units
    _loss(projection(query, slice(0, E), slice(E, 2 * E)), target).backward()
    assert unit.records == []
    _loss(projection(query, slice(E, 2 * E), slice(E, 2 * E)), target).backward()
    assert [r.block for r in unit.records] == [Block((), E, 2 * E)]
    _loss(projection(query, slice(0, 2 * E, 2), slice(0, 2 * E, 2)), target).backward()  # every other row: no block
    assert [r.block for r in unit.records] == [Block((), E, 2 * E)]


def test_a_module_used_whole_and_by_blocks_solves_both_on_every_path():
    """One attention module used for self-attention (the whole in_proj_weight) and for cross-attention (its
    blocks) in one loss: the block kernel (parallel="batched") takes the steps of the autograd reference
    (parallel="none"), whose block uses are checked above against SPEC's objective."""
    results = []
    for parallel in ("none", "batched"):
        attention = _attention()
        query, memory, _, target = _inputs(False)
        opt = LocoPropOptimizer(attention, variant="M", lr=0.05, activation_lr=0.7, local_iters=4, inner="adam",
                                parallel=parallel)  # fmt: skip
        (unit,) = [u for u in opt.units if u.name.endswith("in_proj")]
        for _ in range(2):
            opt.zero_grad()
            hidden = attention(query, query, query, need_weights=False)[0]
            _loss(attention(hidden, memory, memory, need_weights=False)[0], target).backward()
            assert {r.block for r in unit.records} == {None, Block((), 0, E), Block((), E, 3 * E)}
            opt.step()
        results.append([p.detach().clone() for p in attention.parameters()])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
