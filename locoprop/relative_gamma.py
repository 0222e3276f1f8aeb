"""γ from a scale-free start: ``relative_activation_lr`` ρ and ``max_relative_activation_lr`` ρ̄, a stage of
``LocoPropOptimizer.step``.

The activation learning rate γ sets how far the targets a − γ·g move from
the pre-activations a (g = ∂L/∂a). Its right value depends on the loss's
scale: summed over 784 pixels or averaged over classes, averaged over the
batch or over every position of a sequence. A γ given in absolute terms is
off by orders of magnitude from one workload to the next (the default 10 is
about right for the reference autoencoder's summed BCE and 10 to 100 times
too small for a mean cross-entropy).

With ρ given, the first step a param group takes part in sets its γ to

    γ = ρ · ‖a‖ / ‖g‖,

the norms over every unit's recorded pre-activations and their gradients in
that step (every recorded use of every unit, one γ for all, as in the paper).
The S targets then move the pre-activations by a share ρ of their size,
‖γ·g‖ = ρ·‖a‖, whatever the loss's scale (L → cL gives γ → γ/c) and,
for a loss averaged over the batch, whatever the batch size (‖g‖ shrinks as
‖a‖ grows). With ρ̄ given instead (or as well), the first step only caps γ:

    γ ← min(γ, ρ̄ · ‖a‖ / ‖g‖),

so that a γ given far too large cannot move the pre-activations by more than
a share ρ̄ of their size, while a smaller γ stays as it is. Either is a start
for hypergradients: the first steps at a γ far too large do damage that the
rest of a run does not undo (a 100× start diverged before the first
hypergradient existed), and adaptation from a γ far too small climbs by about
e^β per step, a large share of a short run (so ``ADAPTIVE_GAMMA`` sets
γ with ρ rather than capping it with ρ̄).

From then on γ is an ordinary value: fixed, or adapted by
hypergradients (:mod:`locoprop.adaptation`), and kept in ``state_dict``.

With a ceiling ρ_max (``relative_activation_lr_ceiling``), every step
then keeps each unit's γ below the same kind of bound, per unit:

    γ_m ← min(γ_m, ρ_max · ‖a_m‖ / ‖g_m‖),

after the hypergradients have moved it. A proxy hypergradient (the
"gradient" sensitivity, or "implicit" at few inner steps) does not see that
a γ far past the point where the targets saturate changes nothing, and
keeps asking for more: on the ResNet and the transformer every unit's γ
drifted to the top of its range (10⁸). The ceiling stops that drift where
the targets move the pre-activations by a share ρ_max of their size. It
costs two reductions per recorded use and one device sync per step.

On W ranks the norms are those of the global batch: ‖a‖² is summed over the
ranks and g is taken on the footing of the global mean loss (each rank's g
divided by W, as :mod:`locoprop.distributed` does for G), so W ranks choose
the γ that one process would choose on the concatenated batch.

A step with no gradient (‖g‖ = 0) or no finite norms tells nothing about the
scale: it keeps ``activation_lr`` and the start waits for the next step.
"""

from __future__ import annotations

import math

import torch

from locoprop.problem import LocalProblem
from locoprop.recording import squared_norm

__all__ = [
    "CEILING",
    "STARTED",
    "apply_ceiling",
    "chooses_gamma",
    "measures",
    "pending_groups",
    "sets_gamma",
    "start",
]

# The param-group key that says ρ has set the group's γ (it then stays as it is).
STARTED = "relative_activation_lr_started"
# The param-group key of the ceiling ρ_max: at every step γ_m ≤ ρ_max·‖a_m‖/‖g_m‖, per unit.
CEILING = "relative_activation_lr_ceiling"


def sets_gamma(group: dict) -> bool:
    """Whether the group's first step sets (ρ) or caps (ρ̄) its γ."""
    return group.get("relative_activation_lr") is not None or group.get("max_relative_activation_lr") is not None


def chooses_gamma(group: dict) -> bool:
    """Whether the group's γ is set, capped or bounded from the norms (ρ, ρ̄ or a ceiling)."""
    return sets_gamma(group) or group.get(CEILING) is not None


def measures(param_groups: list[dict]) -> bool:
    """Whether the next forward passes must keep ‖g‖²: a start is pending or a group has a ceiling."""
    return bool(pending_groups(param_groups)) or any(g.get(CEILING) is not None for g in param_groups)


def pending_groups(param_groups: list[dict]) -> list[dict]:
    """The groups whose γ ρ has yet to set or ρ̄ has yet to cap."""
    return [g for g in param_groups if sets_gamma(g) and not g.get(STARTED, False)]


def start(opt, problems: list[LocalProblem]) -> None:
    """Set γ = ρ·‖a‖/‖g‖, then cap it at ρ̄·‖a‖/‖g‖, in every pending group, from this step's records (before
    anchors release them).

    One device sync, at the first step only."""
    groups = pending_groups(opt.param_groups)
    units = [problem for problem in problems if problem.unit is not None]
    if not groups or not _measured(units):
        return  # nothing pending, or recorded before ρ was pending (a group added since): the next step measures
    ratio = _ratio(*_unit_squares(opt, units).sum(0).tolist(), opt.comm.world_size)
    if ratio is None:
        return
    for group in groups:
        if group.get("relative_activation_lr") is not None:
            group["activation_lr"] = group["relative_activation_lr"] * ratio
        if group.get("max_relative_activation_lr") is not None:
            group["activation_lr"] = min(group["activation_lr"], group["max_relative_activation_lr"] * ratio)
        group[STARTED] = True


def apply_ceiling(opt, problems: list[LocalProblem]) -> None:
    """γ_m ← min(γ_m, ρ_max·‖a_m‖/‖g_m‖) for every unit whose group has a ceiling, with the norms over that unit's
    records of this step (global over the ranks, as for the start). One device sync per step."""
    capped = [
        problem
        for problem in problems
        if problem.unit is not None and opt.param_groups[problem.group_index].get(CEILING) is not None
    ]
    if not _measured(capped):
        return  # nothing to cap, or recorded before the ceiling was set: the next step measures
    for problem, squares in zip(capped, _unit_squares(opt, capped).tolist()):
        ratio, group = _ratio(*squares, opt.comm.world_size), opt.param_groups[problem.group_index]
        if ratio is not None:
            group["activation_lr"] = min(group["activation_lr"], group[CEILING] * ratio)


def _measured(problems: list[LocalProblem]) -> bool:
    """Whether the units' records of this step exist and all carry ‖g‖²."""
    records = [record for problem in problems for record in problem.records]
    return bool(records) and all(record.gradient_square is not None for record in records)


def _unit_squares(opt, problems: list[LocalProblem]) -> torch.Tensor:
    """Per unit, [‖a‖², ‖g‖²] in float64 over its records of this step (pre-activations and their gradients),
    summed over the ranks."""
    device = problems[0].unit.weight.device
    rows = []
    for problem in problems:
        row = torch.zeros(2, dtype=torch.float64, device=device)
        for record in problem.records:
            a_square = squared_norm(problem.unit.output(record).detach()).to(device)
            row = row + torch.stack([a_square, record.gradient_square.to(device)])
        rows.append(row)
    squares = torch.stack(rows)
    opt.comm.sum_([squares])
    return squares


def _ratio(a_square: float, g_square: float, world_size: int) -> float | None:
    """‖a‖/‖g‖ with g on the footing of the global mean loss (each rank's g is W times it), or None where the
    norms tell nothing about the scale (‖g‖ = 0, or not finite)."""
    a_norm, g_norm = math.sqrt(a_square), math.sqrt(g_square) / world_size
    if not (math.isfinite(a_norm) and math.isfinite(g_norm) and a_norm > 0 and g_norm > 0):
        return None
    return a_norm / g_norm
