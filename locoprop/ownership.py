"""Which param group updates each parameter of the model.

LocoPropOptimizer has one param group per unit and a last one for the
parameters outside every unit. A parameter can be used by more than one
unit, or by a unit and something else:

- shared by units (tied weights): it belongs to the first unit's group; its
  local gradient sums the units' divergences, with its linear term γ·⟨G, θ⟩
  once (:mod:`locoprop.local`);
- held by a module outside every unit too (an embedding tied to the output
  layer), or used by a function call: nothing more is needed, since G, its
  whole gradient, includes that use; when its units take no part in a loss,
  it takes one inner step on γ·G like the parameters outside units.
"""

from __future__ import annotations

from torch import Tensor, nn

from locoprop.units import Unit

__all__ = ["ParameterOwnership"]


class ParameterOwnership:
    """The units and modules that use each parameter, and the param groups that follow.

    Attributes:
        users: unit parameter -> the units that use it, in unit order.
        held_outside: unit parameter -> the name of a module outside every
            unit that also holds it.
        tied: parameter -> its units, for those used more than once
            (by several units, or by a unit and a module outside them).
    """

    def __init__(self, model: nn.Module, units: list[Unit]):
        self._names = {p: name for name, p in model.named_parameters()}
        self.users: dict[Tensor, list[Unit]] = {}
        for unit in units:
            for p in unit.params:
                self.users.setdefault(p, []).append(unit)
        unit_modules = {unit.module for unit in units}
        self.held_outside = {
            p: name or type(module).__name__
            for name, module in model.named_modules()
            if module not in unit_modules
            for p in module.parameters(recurse=False)
            if p in self.users
        }
        self.tied = {p: used_by for p, used_by in self.users.items() if len(used_by) > 1 or p in self.held_outside}
        self._others = [p for p in model.parameters() if p.requires_grad and p not in self.users]
        self._units = units

    @property
    def shared_by_units(self) -> dict[Tensor, list[Unit]]:
        """The parameters that two or more units use."""
        return {p: used_by for p, used_by in self.tied.items() if len(used_by) > 1}

    def check_solved_alone(self) -> None:
        """Refuse weights shared by units for the exact solve, whose closed form solves each unit alone."""
        if self.shared_by_units:
            raise ValueError(
                f"solve='exact' cannot update weights shared by units ({self.describe(self.shared_by_units)}): its "
                "closed form solves each unit alone; use solve='iterative'"
            )

    def param_groups(self) -> list[dict]:
        """One group per unit with the parameters it owns (a tied one goes to its first unit), then one with
        the parameters outside every unit, if any."""
        groups = [
            {"params": [p for p in unit.params if self.users[p][0] is unit], "unit": unit.name,
             "transfer": unit.transfer.name}
            for unit in self._units
        ]  # fmt: skip
        if self._others:
            groups.append({"params": self._others, "unit": None, "transfer": None})
        return groups

    def name(self, p: Tensor) -> str:
        return self._names.get(p, f"<param {id(p)}>")

    @property
    def names(self) -> dict[Tensor, str]:
        """Parameter -> its name in the model."""
        return self._names

    def roles(self, groups: list[tuple[list[Tensor], Unit | None]]) -> dict[str, str]:
        """Each parameter's name and the unit that updates it locally, or ``"backprop"``; a tied parameter
        lists all its uses (``"fc1 + fc2"``, ``"head + backprop"``). ``groups``: (params, unit) per group."""
        roles = {self.name(p): unit.name if unit else "backprop" for params, unit in groups for p in params}
        for p, used_by in self.tied.items():
            uses = [u.name for u in used_by] + (["backprop"] if p in self.held_outside else [])
            roles[self.name(p)] = " + ".join(uses)
        return roles

    def describe(self, tied: dict[Tensor, list[Unit]] | None = None) -> str:
        """The tied parameters and their users, for messages."""
        described = []
        for p, used_by in (self.tied if tied is None else tied).items():
            uses = [f"unit {u.name!r}" for u in used_by]
            if p in self.held_outside:
                uses.append(f"module {self.held_outside[p]!r}")
            described.append(f"{self._names.get(p, 'a parameter')!r} is shared by {' and '.join(uses)}")
        return "; ".join(described)
