"""The iterative solve: K lockstep inner-optimizer iterations over all units.

Iteration t hands the inner optimizer ∇ℓ = Σ Jᵀr + γ·G + λΔθ per unit
(:mod:`locoprop.local`) in ``p.grad``: at t = 0 that is γ·G, with nothing to
compute; for t ≥ 1 the plan (:class:`~locoprop.local_gradients.LocalGradients`)
gives Σ Jᵀr + γ·G. The inner learning rate of iteration t is
η_t = η·max(1 − t/K, 0.25) ("linear-floor") or η ("constant"). A parameter
tied between units sums its units' gradients; one whose ``.grad`` is None
takes no step, as in torch.optim. The parameters outside every unit take
one iteration, on γ·G.
"""

from __future__ import annotations

import torch
from torch import Tensor

from locoprop.distributed import Communicator
from locoprop.inner import inner_lr
from locoprop.local import add_prox_grad_
from locoprop.local_gradients import LocalGradients
from locoprop.problem import LocalProblem

__all__ = ["solve_iterative"]


def solve_iterative(
    problems: list[LocalProblem],
    param_groups: list[dict],
    inner: torch.optim.Optimizer,
    mode: str,
    comm: Communicator,
    tied: set[Tensor],
    compute_dtype: torch.dtype | None = None,
    fused: bool = False,
) -> None:
    """Run the local solves of ``problems`` with ``inner`` (its param groups mirror ``param_groups``).

    ``tied``: the parameters shared between units; ``compute_dtype``: the dtype of the units' matmuls
    (bfloat16; None: the parameters'); ``fused``: the linear kernels' residuals in one compiled pass
    (:mod:`locoprop.fused`). Callers get back the ``.grad`` they handed over.
    """
    if not problems:
        return
    saved_grads = {p: p.grad for group in param_groups for p in group["params"]}
    iterations = {problem: _iterations(problem, param_groups) for problem in problems}
    unit_problems = [problem for problem in problems if problem.unit is not None]
    plan = LocalGradients(unit_problems, mode, comm, compute_dtype, fused)
    # The inner lr of each group that steps: a tied parameter steps in its own group.
    schedules = {problem.group_index: iterations[problem] for problem in problems}
    for p in {p for problem in unit_problems for p in problem.params if p in tied}:
        index = next(i for i, group in enumerate(param_groups) if any(p is q for q in group["params"]))
        schedules.setdefault(index, param_groups[index]["local_iters"])
    try:
        for p in saved_grads:
            p.grad = None
        for t in range(max(iterations.values())):
            active = [problem for problem in problems if t < iterations[problem]]
            planned = plan({problem for problem in active if problem.unit is not None}) if t else {}
            totals: dict[Tensor, Tensor] = {}
            for problem in active:
                for p, grad in zip(problem.params, _local_gradient(problem, planned.get(problem), param_groups)):
                    if grad is not None:
                        totals[p] = totals[p] + grad if p in totals else grad
            for p, handed_over in saved_grads.items():
                p.grad = totals.get(p) if handed_over is not None else None
            for index, local_iters in schedules.items():
                group = param_groups[index]
                inner.param_groups[index]["lr"] = inner_lr(group["inner_schedule"], group["lr"], t, local_iters)
            inner.step()
    finally:
        for p, grad in saved_grads.items():
            p.grad = grad


def _iterations(problem: LocalProblem, param_groups: list[dict]) -> int:
    # Parameters outside units have no local problem: one step on γ·G.
    return param_groups[problem.group_index]["local_iters"] if problem.unit is not None else 1


def _local_gradient(problem: LocalProblem, planned: list[Tensor] | None, param_groups: list[dict]):
    """∇ℓ of ``problem``: γ·G at the first inner iteration (Δθ = 0, nothing ``planned``), later the plan's
    Σ Jᵀr + γ·G plus λΔθ; None for a parameter that gets no gradient from this problem."""
    if planned is None:
        return [term * problem.activation_lr if term is not None else None for term in problem.linear_term]
    prox = param_groups[problem.group_index]["prox"]
    if prox:
        add_prox_grad_(planned, problem.params, problem.old_params, prox)
    return planned
