"""What a ``LocoPropOptimizer`` solves locally: one row per unit, and the share of the model it covers.

``opt.describe()`` gives a :class:`Description`: for every unit its kind of
map (``linear``, ``matmul``, ``conv2d``, ``embedding``, …, or ``unseen``
while no forward pass has used its weight in a linear map; such a unit
counts as local only until some forward pass has run), weight shape, transfer
function, the variant its local problem takes, and its share of the
model's trainable parameters; then the parameters that are not local (they
take plain inner steps on γ·G), largest first. ``print(opt.describe())``
prints it as a table.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import warnings

import torch
from torch import Tensor

__all__ = [
    "Description",
    "UnitRow",
    "callers_level",
    "describe",
    "warn_fallbacks",
    "warn_if_mostly_not_local",
    "warn_unheld",
]


@dataclasses.dataclass(frozen=True)
class UnitRow:
    """One unit: its name, kind of map, weight shape, transfer function, variant and parameter count."""

    unit: str
    kind: str
    shape: tuple[int, ...]
    transfer: str
    variant: str
    parameters: int
    share: float


@dataclasses.dataclass(frozen=True)
class Description:
    """The units, the share of trainable parameters they hold, and the largest parameters outside them."""

    rows: list[UnitRow]
    local_share: float
    outside: list[tuple[str, int]]  # (parameter name, numbers), largest first

    def __str__(self) -> str:
        header = ("unit", "kind", "shape", "transfer", "variant", "share")
        lines = [header] + [(r.unit, r.kind, "×".join(map(str, r.shape)), r.transfer, r.variant, f"{r.share:.1%}")
                            for r in self.rows]  # fmt: skip
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
        text.append(f"local: {self.local_share:.1%} of the trainable parameters")
        if self.outside:
            largest = ", ".join(f"{name} ({count:,})" for name, count in self.outside[:5])
            text.append(f"not local (plain inner steps on γ·G): {largest}{' …' if len(self.outside) > 5 else ''}")
        return "\n".join(text)


def describe(units: list, variant_of, names: dict[Tensor, str], trainable: list[Tensor], seen_any: bool) -> Description:
    """The description of ``units`` within the ``trainable`` parameters (``names``: parameter -> name).

    ``variant_of(unit)`` is the variant its problem takes. Before any forward
    pass (``seen_any`` false) every unit counts as local; after one, a unit
    whose weight no linear map used is not.
    """
    total = sum(p.numel() for p in trainable) or 1
    local: set[Tensor] = set()
    rows = []
    for unit in units:
        is_local = unit.adapter is not None or not seen_any
        if is_local:
            local.update(unit.params)
        count = sum(p.numel() for p in unit.params)
        rows.append(UnitRow(unit=unit.name, kind=unit.adapter.kind if unit.adapter is not None else "unseen",
                            shape=tuple(unit.weight.shape), transfer=unit.transfer.name,
                            variant=variant_of(unit) if is_local else "-", parameters=count,
                            share=count / total if is_local else 0.0))  # fmt: skip
    outside = sorted(((names.get(p, "?"), p.numel()) for p in trainable if p not in local), key=lambda item: -item[1])
    return Description(rows, sum(p.numel() for p in local) / total, outside)


# The packages whose frames a warning of the step skips: torch's and this one.
_INSIDE = tuple(str(pathlib.Path(file).parent) + os.sep for file in (torch.__file__, __file__))


def callers_level() -> int:
    """The ``stacklevel`` of the first frame outside torch and locoprop, seen from the function that warns:
    the user's ``opt.step()`` line, whatever wraps the step (torch.no_grad, torch's step hooks, an lr
    scheduler's counter)."""
    frame, level = sys._getframe(1), 1  # (the function that warns: level 1)
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_mostly_not_local(description: Description) -> None:
    """Warn (at the first step) when less than half of the trainable parameters are local."""
    if description.local_share < 0.5:
        largest = ", ".join(f"{name} ({count:,})" for name, count in description.outside[:3])
        warnings.warn(
            f"Only {description.local_share:.0%} of the model's trainable parameters are solved locally by "
            f"LocoProp; the rest take plain inner steps, the largest being {largest}. print(opt.describe()) "
            "lists the units",
            stacklevel=callers_level(),
        )


def warn_fallbacks(fallen: list, said: set[str]) -> None:
    """Warn once per unit (``said`` keeps their names) that variant M takes the S target for it: its transfer
    function has no convex integral."""
    new = [unit for unit in fallen if unit.name not in said]
    if new:
        said.update(unit.name for unit in new)
        described = ", ".join(f"{unit.name!r} ({unit.transfer.name})" for unit in new)
        warnings.warn(
            f"Variant M takes the S target (pre-activation) for unit(s) {described}: their transfer function "
            "has no convex integral (not monotone, or unknown to locoprop). opt.describe() lists each unit's "
            "variant; pass units=[(layer, transfer), ...] to choose the transfers yourself",
            stacklevel=callers_level(),
        )


def warn_unheld(frozen_at_build: dict[Tensor, str], groups: list[dict], said: set[str]) -> None:
    """Warn once per parameter of ``frozen_at_build`` (parameter -> name: those that did not require grad when
    the optimizer was built, so no param group held them) that has a gradient but is still in no param group:
    unfrozen since, it is never updated."""
    with_grad = {p: name for p, name in frozen_at_build.items() if p.grad is not None and name not in said}
    if not with_grad:
        return
    held = {id(p) for group in groups for p in group["params"]}  # (add_param_group may have taken some)
    new = [name for p, name in with_grad.items() if id(p) not in held]
    if new:
        said.update(new)
        warnings.warn(
            f"Parameter(s) {', '.join(map(repr, new))} have gradients but are in no param group of this optimizer "
            "(they did not require grad when it was built), so they are not updated; build the optimizer after "
            "unfreezing them",
            stacklevel=callers_level(),
        )
