"""Units: a parametrised layer (nn.Linear, nn.Conv2d) and its transfer function.

Two things are kept apart here, as in kfac-pytorch: a *layer adapter* per
module type knows how to run the layer's forward with given parameters;
the LocoProp math (``locoprop.local``) never looks at module types.

Units are found by walking the model: every nn.Linear / nn.Conv2d leaf is a
unit, and its transfer function is the activation module that follows it
inside an ``nn.Sequential`` (identity otherwise). Each unit records, with a
forward hook, its input x and pre-activation a, and with a tensor hook on a
the backprop gradient g = dL/da. A record lives as long as the autograd graph
of its forward until its gradient arrives, then until the optimizer's step.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from locoprop.fast import freivalds_direction, relative_mismatch
from locoprop.transfer import Transfer, transfer_by_name, transfer_from_module

__all__ = ["GradientSketch", "LayerAdapter", "OutputUnitFinder", "Unit", "adapter_for", "discover_units"]


class LayerAdapter:
    """Shapes and tensor plumbing of one layer type.

    ``forward`` runs the layer as a pure function of its parameters. The
    layer is an affine map per *row*: ``input_rows(x)`` (one row per example
    and position: an unfolded patch for Conv2d) times the weight matrix
    ``weight.reshape(d_out, -1)`` gives ``output_rows(a)``. Curvature
    methods (K-FAC, the exact S solve) work on those rows.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def input_rows(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def output_rows(self, a: Tensor) -> Tensor:
        raise NotImplementedError


class LinearAdapter(LayerAdapter):
    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def input_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, a: Tensor) -> Tensor:
        return a.reshape(-1, a.shape[-1])


class Conv2dAdapter(LayerAdapter):
    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        m = self.module
        if m.padding_mode != "zeros":
            return F.conv2d(self._pad(x), weight, bias, m.stride, 0, m.dilation, m.groups)
        return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    def input_rows(self, x: Tensor) -> Tensor:
        """Patches (N·positions, C_in·kh·kw), in the weight's flattening order."""
        m = self.module
        if m.groups != 1:
            raise ValueError(f"Grouped convolutions have no single patch matrix (groups={m.groups})")
        padding = 0 if m.padding_mode != "zeros" else m.padding
        if isinstance(padding, str):
            raise ValueError(f"padding={padding!r} has no unfold equivalent; give the padding as numbers")
        x = self._pad(x) if m.padding_mode != "zeros" else x
        patches = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def output_rows(self, a: Tensor) -> Tensor:
        return a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1])

    def _pad(self, x: Tensor) -> Tensor:
        # As nn.Conv2d does for non-zero padding modes: pad, then convolve unpadded.
        return F.pad(x, self.module._reversed_padding_repeated_twice, mode=self.module.padding_mode)


_ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
}


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module``'s layer type, or ``None`` if unsupported."""
    for layer_type, adapter in _ADAPTERS.items():
        if isinstance(module, layer_type):
            return adapter(module)
    return None


@dataclasses.dataclass(eq=False)
class _Record:
    """One recorded use of a unit: input x, pre-activation a, gradient g.

    ``versions`` are the version counters of x, a and the unit's parameters
    when the forward ran: an in-place operation after the layer (such as
    ``nn.ReLU(inplace=True)``) overwrites the memory that ``a`` shares with
    the layer's output, and the counters tell (see :meth:`Unit.preactivation`).
    """

    x: Tensor
    a: Tensor
    versions: tuple[int, ...]
    g: Tensor | None = None

    def add_grad(self, grad: Tensor) -> None:
        # A graph backpropagated twice (retain_graph) sums, like .grad does.
        grad = grad.detach()
        self.g = grad if self.g is None else self.g + grad


def _recording_hook(record: _Record, backpropagated: list[_Record]):
    """The gradient hook of one recorded forward: it stores g = dL/da in
    ``record`` and hands the record to ``backpropagated`` (the unit's list).

    Until its gradient arrives the record lives only in this hook, that is
    in the autograd graph: a forward that is never backpropagated frees its
    record with its graph, as plain PyTorch frees its saved tensors. Once
    handed over, the hook keeps only a weak reference: users keep the graph
    through ``loss`` until their next iteration, and a strong one would keep
    x, a and g alive past the step that consumed them.
    """
    pending = [record]  # the graph's strong reference, until the gradient arrives
    ref = weakref.ref(record)

    def add_grad(grad: Tensor) -> None:
        if pending:
            backpropagated.append(pending.pop())
        alive = ref()
        if alive is not None:
            alive.add_grad(grad)

    return add_grad


@dataclasses.dataclass(eq=False)
class Unit:
    """A layer and its transfer function, with what its hooks recorded.

    Attributes:
        name: the layer's qualified name in the model (``"encoder.0"``).
        module: the layer.
        transfer: the transfer function f applied to its output.
        adapter: runs the layer as a pure function of (x, weight, bias).
        records: the recorded uses that received a gradient since the last
            step (a forward enters it when its backward pass reaches it).
    """

    name: str
    module: nn.Module
    transfer: Transfer
    adapter: LayerAdapter
    records: list[_Record] = dataclasses.field(default_factory=list)
    _handle: torch.utils.hooks.RemovableHandle | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        """The unit's parameters θ: weight, then bias if the layer has one."""
        return [p for p in (self.module.weight, self.module.bias) if p is not None]

    @property
    def trainable(self) -> bool:
        return all(p.requires_grad for p in self.params)

    def attach(self) -> None:
        self._handle = self.module.register_forward_hook(self._record_forward)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record_forward(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        # Only forwards that can be backpropagated matter; evaluation under
        # torch.no_grad() records nothing.
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        x, bias = inputs[0], module.bias
        versions = (x._version, output._version, module.weight._version, *(() if bias is None else (bias._version,)))
        record = _Record(x=x.detach(), a=output.detach(), versions=versions)
        output.register_hook(_recording_hook(record, self.records))

    def backpropagated_records(self) -> list[_Record]:
        """Records since the last step that received a gradient."""
        return [r for r in self.records if r.g is not None]

    def check_record(self, record: _Record) -> None:
        """Refuse a record whose input, or whose overwritten pre-activation,
        cannot be restored as the forward pass saw it."""
        if record.x._version != record.versions[0]:
            raise RuntimeError(
                f"The input of unit {self.name!r} was modified in place after its forward pass; its local problem "
                "needs the input as the layer saw it. Make the operation that changed it out of place "
                "(for example inplace=False), or run it after opt.step()"
            )
        if record.a._version != record.versions[1] and self._param_versions() != record.versions[2:]:
            raise RuntimeError(
                f"The output of unit {self.name!r} was modified in place (an in-place operation such as "
                "nn.ReLU(inplace=True)) and its parameters changed after the forward pass, so its pre-activation "
                "cannot be recomputed; leave the parameters unchanged until opt.step(), or make the in-place "
                "operation out of place"
            )

    def preactivation(self, record: _Record) -> Tensor:
        """The pre-activation a = layer(x) of a recorded use.

        The recorded ``a`` shares memory with the layer's output. When an
        in-place operation after the layer (``nn.ReLU(inplace=True)``,
        ``out += skip``) has overwritten it, a is recomputed from the recorded
        input with the forward's parameters (unchanged: :meth:`check_record`),
        one forward of the layer. So it is after a forward under autocast: the
        local problems run in the parameters' dtype, and a rounded to bfloat16
        would put its rounding error into the first local gradient. Otherwise
        it is read as recorded, at no cost.
        """
        weight, bias = self.module.weight.detach(), self.module.bias
        if record.a._version == record.versions[1] and record.a.dtype == weight.dtype:
            return record.a
        return self.adapter.forward(record.x.to(weight.dtype), weight, bias.detach() if bias is not None else None)

    def _param_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.params)

    def __repr__(self) -> str:
        return f"Unit({self.name!r}, {type(self.module).__name__}, transfer={self.transfer.name!r})"


class GradientSketch:
    """The whole backward gradient of one unit parameter, sketched, to find
    uses of it that no unit recorded (``F.embedding(t, head.weight)``).

    A tensor hook on the parameter sees each backward pass's gradient before
    it reaches ``.grad`` (so before any clipping) and adds up its projection
    on a fixed random direction v: ∇W·v for a weight (d_out numbers, one
    matrix-vector product), ∇b itself for a bias. :meth:`mismatch` compares
    the sum with the same projection of the recorded uses' gradient,
    Σ gᵀ(x·v), obtained by running the layer with the one-row weight vᵀ, so a
    convolution needs no unfolded patches. A real difference shows as in
    Freivalds' check (:func:`locoprop.fast.backprop_gradient_mismatch`).

    The hook keeps only the sketch, never the gradient, which can be the very
    tensor that becomes ``.grad``. Grouped convolutions are not sketched.
    """

    def __init__(self, param: nn.Parameter):
        self.is_weight = param.dim() > 1
        self.direction = freivalds_direction(param[0].numel(), param) if self.is_weight else None
        self.total: Tensor | None = None
        self._handle = param.register_hook(self._add)

    @staticmethod
    def supports(unit: Unit) -> bool:
        return getattr(unit.module, "groups", 1) == 1

    def _add(self, grad: Tensor) -> None:
        if self.is_weight:
            sketch = torch.mv(grad.reshape(grad.shape[0], -1), self.direction.to(grad.device, grad.dtype))
        else:
            sketch = grad.detach().clone()  # grad may become .grad, which clipping changes in place
        self.total = sketch if self.total is None else self.total + sketch

    def through_records(self, unit: Unit, backprop: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """The sketch of the part of the gradient through ``unit``'s (x, g) pairs."""
        adapter, expected = unit.adapter, None
        for x, g in backprop:
            g_rows = adapter.output_rows(g)
            if self.is_weight:
                weight = self.direction.to(x.device, x.dtype).reshape(1, *unit.module.weight.shape[1:])
                part = g_rows.T @ adapter.output_rows(adapter.forward(x, weight, None))[:, 0]
            else:
                part = g_rows.sum(0)
            expected = part if expected is None else expected + part
        return expected

    def mismatch(self, expected: Tensor) -> Tensor:
        """The relative difference of the backward passes' sketch from ``expected``."""
        return relative_mismatch(self.total.to(expected.dtype), expected)

    def reset(self) -> None:
        self.total = None

    def remove(self) -> None:
        self._handle.remove()
        self.total = None


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
    names = {module: name for name, module in model.named_modules()}
    if units is None:
        following = _following_transfer(model)
        pairs: Iterable[tuple[nn.Module, Transfer]] = [
            (m, following.get(m) or transfer_by_name("identity")) for m in names if adapter_for(m) is not None
        ]
    else:
        pairs = []
        for item in units:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"Invalid unit {item!r}: expected a (module, transfer) pair")
            layer, spec = item
            if not isinstance(layer, nn.Module) or layer not in names:
                raise ValueError(f"Unit layer {layer!r} is not a submodule of the model")
            if adapter_for(layer) is None:
                raise ValueError(
                    f"Unit {names[layer] or type(layer).__name__!r} is a {type(layer).__name__}; "
                    "only nn.Linear and nn.Conv2d layers can be units"
                )
            pairs.append((layer, _as_transfer(spec, names[layer])))
        seen = [layer for layer, _ in pairs]
        duplicates = {names[m] for m in seen if seen.count(m) > 1}
        if duplicates:
            raise ValueError(f"Units listed more than once: {sorted(duplicates)}")

    found = [Unit(name=names[m] or type(m).__name__, module=m, transfer=t, adapter=adapter_for(m)) for m, t in pairs]
    # A layer with a frozen weight or bias has no local problem of its own:
    # its trainable parameters are updated on their ordinary gradient.
    frozen = [u.name for u in found if not u.trainable]
    if units is not None and frozen:
        raise ValueError(f"Units with frozen parameters (requires_grad=False): {frozen}")
    found = [u for u in found if u.trainable]
    if not found:
        raise ValueError(
            f"The model has no trainable nn.Linear or nn.Conv2d layers to use as units: {type(model).__name__}"
        )
    return found


class OutputUnitFinder:
    """Finds the unit that produces the model's output, from a forward pass.

    Registration order does not tell it (a module may define its head before
    its body). At the end of the model's first forward pass with autograd,
    the graph is walked back from the model's output tensors, stopping at the
    outputs of units: the units met are those whose output reaches the model's
    output through no other unit. One unit met is the output unit; several
    (two heads added, several outputs) or none leave it ambiguous. When the
    model's own forward never runs (the caller calls its submodules), the
    last unit to run in the forward pass is taken instead (:meth:`decide_now`).

    ``on_decided(units)`` is called once, with the units met, and the hooks
    are removed: after that the finder costs nothing.
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit], on_decided):
        self._on_decided = on_decided
        self._unit_of_module = {unit.module: unit for unit in units}
        self._output_nodes: dict = {}  # grad_fn of a unit output in this model forward -> unit
        self._depth = 0
        self.last_run: Unit | None = None
        self.pending = True
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._leave, always_call=True),
            *(unit.module.register_forward_hook(self._note) for unit in units),
        ]

    def _enter(self, module: nn.Module, inputs: tuple) -> None:
        self._depth += 1

    def _note(self, module: nn.Module, inputs: tuple, output) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.grad_fn is not None):
            return
        self.last_run = self._unit_of_module[module]
        if self._depth:  # only inside the model's forward: a node keeps its graph alive
            self._output_nodes[output.grad_fn] = self.last_run

    def _leave(self, module: nn.Module, inputs: tuple, output) -> None:
        self._depth -= 1
        if self._depth or not self._output_nodes:
            return
        roots = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        if roots:
            self._decide(_units_reaching(roots, self._output_nodes))
        self._output_nodes.clear()

    def decide_now(self) -> None:
        """Decide from the last unit that ran, if the model's forward never did."""
        if self.pending and self.last_run is not None:
            self._decide([self.last_run])

    def _decide(self, units: list[Unit]) -> None:
        self.remove()
        self._on_decided(units)

    def remove(self) -> None:
        self.pending = False
        self._output_nodes.clear()
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _tensors(value) -> list[Tensor]:
    """The tensors in a model's output: a tensor, or tuples, lists and dicts of them."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _units_reaching(roots: list, output_nodes: dict) -> list[Unit]:
    """The units whose output node is reached from ``roots`` through no other unit's output."""
    reached: list[Unit] = []
    seen = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        unit = output_nodes.get(node)
        if unit is None:
            stack.extend(next_node for next_node, _ in node.next_functions)
        elif unit not in reached:
            reached.append(unit)
    return reached
