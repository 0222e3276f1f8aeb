"""Units: a recorded layer (nn.Linear, nn.Conv2d) and its transfer function.

A unit is a :class:`~locoprop.layers.RecordedLayer` (its input x, its
pre-activation a and the backprop gradient g = dL/da of every recorded use)
with the transfer function f that follows it. Units are found by walking
the model: every trainable nn.Linear / nn.Conv2d is a unit, and its transfer
function is the activation module that follows it inside an
``nn.Sequential`` (identity otherwise). The LocoProp math
(``locoprop.local``) never looks at module types.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from torch import nn

from locoprop.layers import RecordedLayer, adapter_for, find_layers
from locoprop.transfer import Transfer, transfer_by_name, transfer_from_module

__all__ = ["Unit", "discover_units"]


@dataclasses.dataclass(eq=False)
class Unit(RecordedLayer):
    """A recorded layer and its transfer function f (LocoProp's unit, SPEC §2).

    Attributes (beside :class:`~locoprop.layers.RecordedLayer`'s):
        transfer: the transfer function f applied to the layer's output.
    """

    transfer: Transfer = dataclasses.field(kw_only=True)

    def __repr__(self) -> str:
        return f"Unit({self.name!r}, {type(self.module).__name__}, transfer={self.transfer.name!r})"


def _is_activation(module: nn.Module) -> bool:
    # Parameter-free modules from torch.nn.modules.activation (this excludes
    # MultiheadAttention, which lives there too), plus nn.Identity.
    if isinstance(module, nn.Identity):
        return True
    return type(module).__module__ == "torch.nn.modules.activation" and not any(True for _ in module.parameters())


def _following_transfer(model: nn.Module) -> dict[nn.Module, Transfer]:
    """Transfer of every layer directly followed by an activation in a Sequential."""
    found: dict[nn.Module, Transfer] = {}
    for container in model.modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.children())
        for layer, following in itertools.pairwise(children):
            if adapter_for(layer) is not None and _is_activation(following):
                found[layer] = transfer_from_module(following)
    return found


def _as_transfer(spec: str | nn.Module | Transfer, unit_name: str) -> Transfer:
    if isinstance(spec, Transfer):
        return spec
    if isinstance(spec, nn.Module):
        return transfer_from_module(spec)
    if isinstance(spec, str):
        return transfer_by_name(spec)
    raise ValueError(f"Invalid transfer function for unit {unit_name!r}: {spec!r}")


def discover_units(
    model: nn.Module,
    units: Sequence[tuple[nn.Module, str | nn.Module]] | None = None,
) -> list[Unit]:
    """The units of ``model``, in module registration order.

    Args:
        model: any nn.Module.
        units: explicit ``[(layer, transfer), ...]`` pairs replacing discovery;
            a transfer is a name (``"tanh"``) or an activation module.
    """
    if units is None:
        following = _following_transfer(model)
        identity = transfer_by_name("identity")
        # A layer with a frozen weight or bias has no local problem of its own
        # (find_layers leaves it out): its trainable parameters are updated on their ordinary gradient.
        found = [
            Unit(
                name=layer.name,
                module=layer.module,
                adapter=layer.adapter,
                transfer=following.get(layer.module, identity),
            )
            for layer in find_layers(model)
        ]
    else:
        found = _listed_units(model, units)
    if not found:
        raise ValueError(
            f"The model has no trainable nn.Linear or nn.Conv2d layers to use as units: {type(model).__name__}"
        )
    return found


def _listed_units(model: nn.Module, units: Sequence[tuple[nn.Module, str | nn.Module]]) -> list[Unit]:
    """The units of an explicit ``[(layer, transfer), ...]`` list, checked."""
    names = {module: name for name, module in model.named_modules()}
    found = []
    for item in units:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"Invalid unit {item!r}: expected a (module, transfer) pair")
        layer, spec = item
        if not isinstance(layer, nn.Module) or layer not in names:
            raise ValueError(f"Unit layer {layer!r} is not a submodule of the model")
        adapter = adapter_for(layer)
        name = names[layer] or type(layer).__name__
        if adapter is None:
            raise ValueError(
                f"Unit {name!r} is a {type(layer).__name__}; only nn.Linear and nn.Conv2d layers can be units"
            )
        found.append(Unit(name=name, module=layer, adapter=adapter, transfer=_as_transfer(spec, names[layer])))
    seen = [unit.module for unit in found]
    duplicates = {names[m] for m in seen if seen.count(m) > 1}
    if duplicates:
        raise ValueError(f"Units listed more than once: {sorted(duplicates)}")
    frozen = [unit.name for unit in found if not unit.trainable]
    if frozen:
        raise ValueError(f"Units with frozen parameters (requires_grad=False): {frozen}")
    return found
