"""The local problem of one parameter group in one step: a typed record.

The optimizer collects one :class:`LocalProblem` per unit that took part in
the loss (and one for the parameters outside every unit), fills it in as the
step proceeds (records → anchors → local gradients) and drops it at the end
of the step; :mod:`locoprop.local_gradients` reads it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from locoprop.layers import Block, LayerAdapter, LayerRecord
from locoprop.units import Unit

__all__ = ["LocalProblem"]


@dataclasses.dataclass(eq=False)
class LocalProblem:
    """What one parameter group solves in this step.

    For a unit: its recorded inputs, the anchors of its pre-activations (M),
    the gradient G handed over and γ (:mod:`locoprop.local` gives the
    objective). For the parameters outside every unit: their gradients G.

    Attributes:
        group_index: the optimizer's param group it belongs to.
        params: the parameters it updates (a unit's weight[, bias]).
        unit: the unit, or None for parameters that take plain inner steps
            on γ·G (outside every unit, or a unit's never used in a linear map).
        variant: the unit's variant: the optimizer's, except that variant M
            takes the S target for a unit whose transfer function has no
            convex integral (GELU, SiLU, …).
        linear_term: G per parameter: its ``.grad`` as the user left it (the
            mean over ranks on several ranks); None where this problem adds
            no linear term (``.grad`` is None, or a tied parameter whose term
            another unit's problem carries).
        inputs: x per recorded use, in the parameters' dtype.
        blocks: per recorded use, the part of the weight its map took
            (:attr:`~locoprop.recording.UseRecord.block`; None: the whole weight).
        anchors: per recorded use, :meth:`~locoprop.transfer.Transfer.anchor_at`
            of its pre-activation a^old (variant M; empty tuples for S).
        activation_lr: γ of its group.
        gram_form: variant S solved in its Gram form.
        records: the unit's records, until its anchors are set.
        old_params: θ^old, a copy of the parameters at the start of the step
            (the iterative solve's; the exact solve needs none).
        exact_direction: Δ per parameter of the exact solve's step
            θ* = θ^old − γ·Δ; −Δ is its sensitivity ∂θ/∂γ, for the next
            step's hypergradient.
    """

    group_index: int
    params: list[Tensor]
    unit: Unit | None = None
    variant: str = "S"
    linear_term: list[Tensor | None] = dataclasses.field(default_factory=list)
    inputs: list[Tensor] = dataclasses.field(default_factory=list)
    blocks: list[Block | None] = dataclasses.field(default_factory=list)
    anchors: list[tuple[Tensor, ...]] = dataclasses.field(default_factory=list)
    activation_lr: float = 0.0
    gram_form: bool = False
    records: list[LayerRecord] = dataclasses.field(default_factory=list)
    old_params: list[Tensor] | None = None
    exact_direction: list[Tensor] | None = None

    @property
    def uses(self) -> list[tuple[Tensor, tuple[Tensor, ...]]]:
        """(x, anchor) per recorded use."""
        return list(zip(self.inputs, self.anchors))

    @property
    def by_blocks(self) -> bool:
        """Whether some use took a block of the weight (its uses are not all of one map)."""
        return any(block is not None for block in self.blocks)

    def uses_by_map(self) -> list[tuple[LayerAdapter, list[tuple[Tensor, tuple[Tensor, ...]]]]]:
        """The recorded uses grouped by their map: (map, its (x, anchor) pairs)."""
        groups: dict = {}
        for block, use in zip(self.blocks or [None] * len(self.inputs), self.uses):
            groups.setdefault(block, []).append(use)
        return [(self.unit.map_of(block), uses) for block, uses in groups.items()]

    def linear_terms(self) -> list[Tensor]:
        """G per parameter, zeros where the problem carries none."""
        return [g if g is not None else torch.zeros_like(p) for p, g in zip(self.params, self.linear_term)]
