"""Gathering a step's local problems, with every refusal before anything changes.

:func:`collect_problems` reads what the backward passes left: each unit
that took part in the loss gets a :class:`~locoprop.problem.LocalProblem`
with its recorded inputs and, as its linear term G, the gradients the user
handed over in ``.grad``; the parameters outside every unit get one with
their gradients. :func:`prepare_solves` then adds what the solves need
(γ, θ^old, the anchors of the recorded pre-activations, the Gram form's
choice) and releases the records.
"""

from __future__ import annotations

from collections.abc import Container

import torch
from torch import Tensor

from locoprop.distributed import Communicator
from locoprop.layers import no_backward_error, unrecorded_gradient_error
from locoprop.local_gradients import uses_gram_form
from locoprop.ownership import ParameterOwnership
from locoprop.problem import LocalProblem
from locoprop.units import Unit

__all__ = ["all_finite", "collect_problems", "prepare_solves", "unit_variant"]


def collect_problems(
    param_groups: list[dict],
    unit_of_group: list[Unit | None],
    ownership: ParameterOwnership,
    comm: Communicator,
    grads_averaged: Container[Tensor],
    variant: str,
    solve: str,
    takes_sparse: bool = False,
) -> list[LocalProblem]:
    """The step's problems, one per param group that has something to step.

    A parameter tied between units carries its linear term in the first
    problem that holds it, so that the sum of their objectives has it once.
    A unit's parameters that no recorded linear map used (a candidate weight
    never seen in one, a bias the map does not add) take plain steps on γ·G.
    Refuses (RuntimeError) a unit whose parameters have a nonzero gradient
    that no recorded backward pass explains (zeros, left by
    ``zero_grad(set_to_none=False)`` on a unit this loss did not use, mean
    it took no part), a map the exact solve cannot take, a sparse gradient
    unless the inner optimizer ``takes_sparse`` (:func:`~locoprop.inner.takes_sparse`),
    and a step with nothing to step. On W ranks G becomes the mean of the
    ranks' ``.grad``, but for the parameters whose gradients DDP averaged already (``grads_averaged``).
    """
    problems, carried = [], set()
    for index, unit in enumerate(unit_of_group):
        records = unit.backpropagated_records() if unit is not None else []
        if not records:
            continue
        unit.seen = True
        for record in records:
            unit.check_record(record)
        records = [use for record in records for use in unit.by_group(record)]
        linear_term = [p.grad if p not in carried else None for p in unit.params]
        carried.update(unit.params)
        # x in the parameters' dtype: records of a forward under autocast are in a lower precision.
        inputs = [r.x.to(unit.weight.dtype) if r.x.is_floating_point() else r.x for r in records]
        problems.append(LocalProblem(index, unit.params, unit=unit, variant=unit_variant(variant, unit),
                                     records=records, linear_term=linear_term, inputs=inputs,
                                     blocks=[r.block for r in records]))  # fmt: skip
    for index, (group, unit) in enumerate(zip(param_groups, unit_of_group)):
        plain = [p for p in group["params"] if p.grad is not None and p not in carried]
        if unit is not None and unit.seen:  # (and no records this step)
            plain = _without_unused_unit(plain, unit, ownership)
        if plain:
            problems.append(LocalProblem(index, plain, linear_term=[p.grad for p in plain]))
    if not problems:
        raise no_backward_error("LocoPropOptimizer")
    if not takes_sparse:
        _refuse_sparse(problems, ownership)
    if solve == "exact":
        _check_exact_maps([problem for problem in problems if problem.unit is not None])
    if comm.distributed:
        _average_linear_terms(problems, comm, grads_averaged)
    return problems


def _without_unused_unit(plain: list[Tensor], unit: Unit, ownership: ParameterOwnership) -> list[Tensor]:
    """``plain`` without the parameters of ``unit``, which took part in earlier steps but has no record in
    this one: zeros left by ``zero_grad(set_to_none=False)`` mean it took no part in this loss; anything else
    is a gradient that no recorded forward explains (refused)."""
    mine = {id(p) for p in unit.params if p not in ownership.held_outside}
    unexplained = [p for p in plain if id(p) in mine]
    if any(p.grad.any() for p in unexplained):
        raise unrecorded_gradient_error("Unit", unit.name)
    return [p for p in plain if id(p) not in mine]


def _refuse_sparse(problems: list[LocalProblem], ownership: ParameterOwnership) -> None:
    sparse = [ownership.name(p) for problem in problems for p, g in zip(problem.params, problem.linear_term)
              if g is not None and g.is_sparse]  # fmt: skip
    if sparse:
        raise RuntimeError(
            f"Parameter(s) {', '.join(map(repr, sparse))} have sparse gradients (nn.Embedding(sparse=True)), which "
            "this inner optimizer does not take; use dense gradients (sparse=False), or inner='sgd', 'momentum', "
            "'nesterov' or 'adagrad' without weight decay"
        )


def unit_variant(variant: str, unit: Unit) -> str:
    """The variant a unit's local problem takes: variant M needs a transfer function with a convex
    integral, so a unit followed by GELU, SiLU or an unknown activation takes the S target."""
    return "S" if variant == "M" and not unit.transfer.supports_matching_loss else variant


def _check_exact_maps(problems: list[LocalProblem]) -> None:
    other = [f"{p.unit.name!r} ({p.unit.kind})" for p in problems if p.unit.kind != "linear"]
    if other:
        raise RuntimeError(
            f"solve='exact' solves units whose map is F.linear (nn.Linear) only; unit(s) {', '.join(other)} are "
            "other maps. Use solve='iterative', or pass units= without them; no parameter was changed"
        )
    blocks = [repr(p.unit.name) for p in problems if p.by_blocks]
    if blocks:
        raise RuntimeError(
            f"solve='exact' solves a unit whose every use is its whole map; unit(s) {', '.join(blocks)} were used by "
            "blocks of their weight (nn.MultiheadAttention's cross-attention projects the query and the key and "
            "value with separate blocks of rows of in_proj_weight; a mixture of experts uses one matrix of a stacked "
            "weight per expert) or without their bias beside uses with it. Use solve='iterative'; no parameter was "
            "changed"
        )


def _average_linear_terms(problems: list[LocalProblem], comm: Communicator, done: Container[Tensor]) -> None:
    """G as the mean over ranks of each rank's ``.grad`` (copies: ``.grad`` stays the user's), but for the
    parameters in ``done``, whose ``.grad`` DDP averaged. (Every rank leaves out the same ones: DDP wraps the
    same modules on each.)"""
    todo = [(problem, i) for problem in problems for i, (p, g) in enumerate(zip(problem.params, problem.linear_term))
            if g is not None and p not in done]  # fmt: skip
    means = [problem.linear_term[i].clone() for problem, i in todo]
    comm.mean_(means)
    for (problem, i), mean in zip(todo, means):
        problem.linear_term = list(problem.linear_term)
        problem.linear_term[i] = mean


def prepare_solves(
    problems: list[LocalProblem], param_groups: list[dict], solve: str, mode: str, world_size: int
) -> None:
    """Each problem's γ; each unit's θ^old, the anchors of its recorded pre-activations (variant M; the S
    residual Δa needs none) and whether S takes its Gram form.

    A unit's records are released as soon as its anchors exist, so that its
    pre-activations do not outlive their use.
    """
    for problem in problems:
        group = param_groups[problem.group_index]
        problem.activation_lr = group["activation_lr"]
        unit = problem.unit
        if unit is None:
            continue
        if solve == "iterative":  # the exact solve and its closed-form sensitivity need no copy of θ^old
            problem.old_params = [p.detach().clone() for p in problem.params]
        if problem.variant == "M":
            problem.anchors = [unit.transfer.anchor_at(unit.output(r)) for r in problem.records]
        else:
            problem.anchors = [() for _ in problem.records]
        problem.gram_form = solve == "iterative" and uses_gram_form(problem, mode, group["local_iters"], world_size)
        problem.records = []
        unit.records.clear()


def all_finite(problems: list[LocalProblem]) -> bool:
    """Whether every stored input, anchor and gradient G is finite.

    A sum is NaN or ±inf as soon as one term is, and costs one fast pass
    (``isfinite().all()`` takes several, about 20× longer); only sums beyond
    the float range (values near 1e32 and more) would count a finite batch as
    non-finite, and such a batch is lost anyway.
    """
    tensors: list[Tensor] = [x for pr in problems for x in pr.inputs if x.is_floating_point()]
    tensors += [t for pr in problems for anchor in pr.anchors for t in anchor]
    tensors += [g for pr in problems for g in pr.linear_term if g is not None]
    return bool(torch.stack([t.sum() for t in tensors]).isfinite().all())
