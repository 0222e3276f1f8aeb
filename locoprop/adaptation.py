"""γ adapted online by hypergradient descent, as stages of ``LocoPropOptimizer.step`` (SPEC §12).

At every step, for each unit whose group has β = ``hypergrad_lr`` > 0:
``adapt`` forms h = ⟨∇L, ∂θ/∂γ⟩ from the sensitivity that the unit's last
solve left in ``state[p]["gamma_sensitivity"]`` and moves γ by the
optimizer's ``hypergrad_rule``: to γ·exp(−β·h·γ) ("plain",
:func:`locoprop.hypergrad.adapted_activation_lr`) or by an Adam step on
log γ whose moments live in the unit weight's ``state["log_gamma_moments"]``
("normalized", :func:`locoprop.hypergrad.normalized_activation_lr`), each unit
by its own h or, with ``hypergrad_scope="shared"``, all by one factor whose
log-gradient is Σ_m h_m·γ_m (moments with the first adapting unit); after the
solve, ``record_sensitivities`` stores the new ∂θ/∂γ (closed form for the
exact solve, "implicit", "unrolled" or "gradient" for the iterative one, from
:mod:`locoprop.hypergrad`). Each function takes the optimizer and reads its
param groups, inner optimizer and state.
"""

from __future__ import annotations

import math

import torch

from locoprop.hypergrad import (
    adapted_activation_lr,
    implicit_sensitivity,
    in_gamma_range,
    inner_tangent,
    normalized_activation_lr,
    unrolled_sensitivity,
)
from locoprop.inner import inner_lr
from locoprop.problem import LocalProblem
from locoprop.relative_gamma import STARTED

__all__ = [
    "adapt",
    "adapting_problems",
    "before_solve",
    "check_supported",
    "record_sensitivities",
    "restore",
    "saved",
]


def check_supported(opt) -> None:
    """Refuse β > 0 where the sensitivities are not computed yet: several ranks, tied weights, "gradient" with
    the plain rule, and (for "unrolled") inner optimizers whose update rule :mod:`locoprop.hypergrad` does not
    know."""
    if not any(group["hypergrad_lr"] > 0 for group, unit in zip(opt.param_groups, opt.unit_of_group) if unit):
        return
    if opt.comm.distributed:
        raise ValueError(
            f"hypergrad_lr > 0 is not supported on {opt.comm.world_size} ranks yet: the sensitivities need the "
            "global batch's local problems; train with hypergrad_lr=0 or in one process"
        )
    if opt.ownership.tied:
        raise ValueError(
            f"hypergrad_lr > 0 is not supported with tied weights ({opt.ownership.describe()}): a tied parameter's "
            "update depends on several units' γ"
        )
    if opt.hypergrad == "gradient" and opt.solve == "iterative" and opt.hypergrad_rule != "normalized":
        raise ValueError(
            f"hypergrad='gradient' with hypergrad_rule={opt.hypergrad_rule!r}: its h = −⟨∇L, G⟩ has no step length, "
            "so the plain step β·h·γ has no meaningful scale; use hypergrad_rule='normalized'"
        )
    if opt.hypergrad == "unrolled" and opt.solve == "iterative":
        for index, unit in enumerate(opt.unit_of_group):
            if unit is not None:
                inner_tangent(opt.inner, index)


def adapting_problems(opt, problems: list[LocalProblem]) -> list[LocalProblem]:
    """The units' problems whose γ adapts (β > 0) in this step."""
    adapting = [p for p in problems if p.unit is not None and opt.param_groups[p.group_index]["hypergrad_lr"] > 0]
    if adapting:
        check_supported(opt)  # β may have been raised in param_groups since construction
    blocks = [repr(p.unit.name) for p in adapting if p.by_blocks]
    if blocks and opt.solve == "iterative" and opt.hypergrad in ("implicit", "unrolled"):
        raise ValueError(
            f"hypergrad={opt.hypergrad!r} is not supported yet for unit(s) {', '.join(blocks)}, whose uses took "
            "blocks of the weight (nn.MultiheadAttention's cross-attention, a mixture of experts' stacked "
            "weights); use hypergrad='gradient' with hypergrad_rule='normalized', or hypergrad_lr=0 for them"
        )
    return adapting


def saved(opt, adapting: list[LocalProblem]) -> tuple[list[tuple[float, bool]], dict]:
    """What :func:`adapt` and :func:`locoprop.relative_gamma.start` change, for :func:`restore`: every group's
    γ and whether ρ set it, and the adapting units' moments."""
    moments = {}
    for problem in adapting:
        state = opt.state[problem.params[0]]
        moments[problem.params[0]] = list(state["log_gamma_moments"]) if "log_gamma_moments" in state else None
    return [(group["activation_lr"], group.get(STARTED)) for group in opt.param_groups], moments


def restore(opt, before: tuple[list[tuple[float, bool]], dict]) -> None:
    """Undo :func:`adapt` and the relative start (a refused or skipped step changes nothing)."""
    gammas, moments = before
    for group, (gamma, started) in zip(opt.param_groups, gammas):
        group["activation_lr"] = gamma
        if started is None:
            group.pop(STARTED, None)
        else:
            group[STARTED] = started
    for param, values in moments.items():
        if values is None:
            opt.state[param].pop("log_gamma_moments", None)
        else:
            opt.state[param]["log_gamma_moments"] = values


def adapt(opt, adapting: list[LocalProblem]) -> dict[str, float]:
    """h = ⟨∇L, ∂θ/∂γ⟩ of each adapting unit that has a sensitivity from its last solve; its group's γ
    moves by the optimizer's ``hypergrad_rule`` (clipped) if every h is finite, by its own h or, with
    ``hypergrad_scope="shared"``, by one factor for all. One device sync."""
    measured = []
    for problem in adapting:
        pairs = [(p.grad, opt.state[p].get("gamma_sensitivity")) for p in problem.params if p.grad is not None]
        if pairs and all(s is not None for _, s in pairs):
            measured.append((problem, sum(torch.vdot(g.reshape(-1), s.reshape(-1)) for g, s in pairs)))
    if not measured:
        return {}
    values = torch.stack([h for _, h in measured]).tolist()
    hypergradients = {problem.unit.name: h for (problem, _), h in zip(measured, values)}
    if not all(map(math.isfinite, values)):
        return hypergradients  # the step refuses itself (LocoPropOptimizer.step): no γ moves
    if opt.hypergrad_scope == "shared":
        _adapt_shared(opt, adapting, [problem for problem, _ in measured], values)
        return hypergradients
    for (problem, _), h in zip(measured, values):
        group = opt.param_groups[problem.group_index]
        group["activation_lr"] = _moved_by_rule(opt, group["activation_lr"], h, group["hypergrad_lr"], problem)
    return hypergradients


def _moved_by_rule(opt, gamma: float, h: float, beta: float, owner: LocalProblem) -> float:
    """γ moved by the optimizer's ``hypergrad_rule`` with hypergradient h; the normalized rule's moments live in
    the state of ``owner``'s first parameter."""
    if opt.hypergrad_rule == "normalized":
        moments = opt.state[owner.params[0]].setdefault("log_gamma_moments", [0.0, 0.0, 0])
        return normalized_activation_lr(gamma, h, beta, moments)
    return adapted_activation_lr(gamma, h, beta)


def _adapt_shared(opt, adapting: list[LocalProblem], measured: list[LocalProblem], values: list[float]) -> None:
    """Every measured unit's γ times one factor c, moved by the rule with log-gradient u = Σ_m h_m·γ_m (the rule
    applied to c = 1); the moments live with the first adapting unit, whichever units were measured."""
    groups = [opt.param_groups[problem.group_index] for problem in measured]
    betas = {group["hypergrad_lr"] for group in groups}
    if len(betas) > 1:
        raise ValueError(
            f"hypergrad_scope='shared' moves every unit's γ by one factor, but the units' hypergrad_lr differ: "
            f"{sorted(betas)}; give them one β"
        )
    (beta,) = betas
    u = sum(h * group["activation_lr"] for h, group in zip(values, groups))
    factor = _moved_by_rule(opt, 1.0, u, beta, adapting[0])
    for group in groups:
        group["activation_lr"] = in_gamma_range(group["activation_lr"] * factor)


def before_solve(opt, adapting: list[LocalProblem]) -> dict[LocalProblem, dict]:
    """What the sensitivities need from before the solve changes it: the recorded uses and G, and for
    "unrolled" the inner state and the K inner learning rates."""
    before = {}
    for problem in adapting:
        saved = {"uses": problem.uses, "linear_term": problem.linear_terms()}
        if opt.solve == "iterative" and opt.hypergrad == "unrolled":
            group, index = opt.param_groups[problem.group_index], problem.group_index
            rule = inner_tangent(opt.inner, index)
            k = group["local_iters"]
            saved.update(
                rule=rule,
                states=[rule.start(opt.inner.state.get(p, {}), p) for p in problem.params],
                lrs=[inner_lr(group["inner_schedule"], group["lr"], t, k) for t in range(k)],
            )
        before[problem] = saved
    return before


def record_sensitivities(opt, adapting: list[LocalProblem], before: dict[LocalProblem, dict]) -> None:
    """∂θ/∂γ of this step's solve for every adapting unit, into ``state[p]["gamma_sensitivity"]``; the
    other parameters lose theirs (their θ did not move with γ)."""
    for state in opt.state.values():
        state.pop("gamma_sensitivity", None)
    for problem in adapting:
        group, unit, saved = opt.param_groups[problem.group_index], problem.unit, before[problem]
        linear = unit.kind == "linear"
        if opt.solve == "exact":
            sensitivity = [-d for d in problem.exact_direction]  # θ* = θ^old − γ·Δ
        elif opt.hypergrad == "gradient":
            sensitivity = [-g for g in saved["linear_term"]]
        elif opt.hypergrad == "implicit":
            params = [p.detach() for p in problem.params]
            inputs = [x for x, _ in saved["uses"]]
            sensitivity = implicit_sensitivity(problem.variant, unit.transfer, unit.adapter.forward, params, inputs,
                                               saved["linear_term"], group["prox"], opt.hypergrad_iters,
                                               linear)  # fmt: skip
        else:
            sensitivity, _ = unrolled_sensitivity(
                problem.variant, unit.transfer, unit.adapter.forward, problem.old_params, saved["uses"],
                saved["linear_term"], problem.activation_lr, group["prox"], saved["rule"], saved["states"],
                saved["lrs"], linear,
            )  # fmt: skip
        for p, s in zip(problem.params, sensitivity):
            opt.state[p]["gamma_sensitivity"] = s.reshape(p.shape)
