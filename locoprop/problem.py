"""The local problem of one parameter group in one step: a typed record.

The optimizer collects one :class:`LocalProblem` per unit that took part in
the loss (and one for the parameters outside every unit), fills it in as the
step proceeds (records → targets → local gradients) and drops it at the end
of the step; :mod:`locoprop.local_gradients` reads it.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from locoprop.layers import LayerRecord
from locoprop.units import Unit

__all__ = ["LocalProblem"]


@dataclasses.dataclass(eq=False)
class LocalProblem:
    """What one parameter group solves in this step.

    For a unit: its recorded (x, g) pairs, γ, and for the iterative solve
    its (x, target) pairs. For the parameters outside every unit: their
    ordinary gradients.

    Attributes:
        group_index: the optimizer's param group it belongs to.
        params: the parameters it updates (a unit's weight[, bias]).
        unit: the unit, or None for the parameters outside every unit.
        backprop: (x, g) per recorded use, in the parameters' dtype.
        param_grads: each parameter's ``.grad`` at the start of the step.
        activation_lr: γ of its group.
        gram_form: variant S solved in its Gram form (no targets needed).
        batches: (x, target) per recorded use, for the iterative solve.
        grads: the ordinary gradients of parameters outside units.
        records: the unit's records, until its targets are set.
        old_params: θ^old, kept when the proximal term needs it.
        outside_uses: indices in ``params`` of parameters also used outside
            every unit's records (tied weights, function calls).
        outside_grads: (index in ``params``, γ·gradient of those uses).
        grads_are_backprop: ``param_grads`` were checked to equal the
            backprop gradient [gᵀx, Σg] (the plan's randomised check).
        exact_direction: Δ per parameter of the exact solve's step
            θ* = θ^old − γ·Δ; −Δ is its sensitivity ∂θ/∂γ, for the next
            step's hypergradient.
    """

    group_index: int
    params: list[Tensor]
    unit: Unit | None = None
    backprop: list[tuple[Tensor, Tensor]] = dataclasses.field(default_factory=list)
    param_grads: list[Tensor | None] = dataclasses.field(default_factory=list)
    activation_lr: float = 0.0
    gram_form: bool = False  # variant S in its Gram form: no targets
    batches: list[tuple[Tensor, Tensor]] = dataclasses.field(default_factory=list)
    grads: list[Tensor] = dataclasses.field(default_factory=list)
    records: list[LayerRecord] = dataclasses.field(default_factory=list)
    old_params: list[Tensor] | None = None
    outside_uses: list[int] = dataclasses.field(default_factory=list)
    outside_grads: list[tuple[int, Tensor]] = dataclasses.field(default_factory=list)
    grads_are_backprop: bool = False
    exact_direction: list[Tensor] | None = None
