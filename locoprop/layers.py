"""Layer records: what an nn.Linear or nn.Conv2d layer saw in the forward pass
and received in the backward pass, shared by LocoProp and K-FAC.

Two things are kept apart here, as in kfac-pytorch: a *layer adapter* per
module type knows how to run the layer's forward with given parameters and
how to see it as an affine map of rows; the algorithms built on the records
(:mod:`locoprop.units` adds transfer functions; ``baselines.kfac`` its
curvature factors) never look at module types.

A :class:`RecordedLayer` records, with a forward hook, its input x and output
a, and with a tensor hook on a the backprop gradient g = dL/da. A record lives
as long as the autograd graph of its forward until its gradient arrives, then
until the optimizer's step.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from locoprop.hooks import WeakHook, remove_when_gone

__all__ = [
    "MATRIX_KINDS",
    "Block",
    "BlockAdapter",
    "ConvAdapter",
    "ConvTransposeAdapter",
    "EinsumAdapter",
    "EmbeddingAdapter",
    "LayerAdapter",
    "LayerRecord",
    "LeftMatmulAdapter",
    "LinearAdapter",
    "MatmulAdapter",
    "RecordedLayer",
    "StackedMatmulAdapter",
    "adapter_for",
    "find_layers",
    "no_backward_error",
    "unrecorded_gradient_error",
]


class LayerAdapter:
    """Shapes and tensor plumbing of one layer type.

    ``forward`` runs the layer as a pure function of its parameters. The
    layer is an affine map per *row*: ``input_rows(x)`` (one row per example
    and position: an unfolded patch for Conv2d) times the weight matrix
    ``weight.reshape(d_out, -1)`` gives ``output_rows(a)``. Curvature
    methods (K-FAC, the exact S solve) work on those rows. ``kind`` names the
    map (``"linear"``: a = x·Wᵀ + b, the only kind the stacked kernels and
    the exact solve take; uses of blocks of a "linear" or "matmul" weight
    have a kernel of their own; the others go through autograd).
    """

    kind = "layer"

    def __init__(self, module: nn.Module | None = None):
        self.module = module

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def input_rows(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def output_rows(self, a: Tensor) -> Tensor:
        raise NotImplementedError


# The kinds of map a = x·Wᵀ + b and a = x·W + b: their uses may take blocks of the weight, a bias added after
# the product folds into them, and their inputs are centred for low-precision products.
MATRIX_KINDS = ("linear", "matmul")


class LinearAdapter(LayerAdapter):
    """a = x·Wᵀ + b: ``nn.Linear``, ``F.linear``."""

    kind = "linear"

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def input_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, a: Tensor) -> Tensor:
        return a.reshape(-1, a.shape[-1])


class MatmulAdapter(LayerAdapter):
    """a = x·W (+ b) with W of shape d_in × d_out: ``torch.addmm(b, x, W)`` (Hugging Face's ``Conv1D``),
    ``x @ W``."""

    kind = "matmul"

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        a = torch.matmul(x, weight)
        return a + bias if bias is not None else a

    def input_rows(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, a: Tensor) -> Tensor:
        return a.reshape(-1, a.shape[-1])


@dataclasses.dataclass(frozen=True, order=True)
class Block:
    """The part of a parameter that one use's map took: ``parameter[selects][start:stop]``, a matrix of a stack
    of them (a mixture of experts' ``gate_up_proj[e]``) and a block of its rows (``in_proj_weight.split``)."""

    selects: tuple[int, ...]
    start: int
    stop: int
    # Whether the use's map adds the unit's bias (a use without it, beside uses with it, takes this block whole).
    bias: bool = True

    def matrix(self, parameter: Tensor) -> Tensor:
        """``parameter[selects]``: the whole matrix (or, for a bias, vector) the block lies in."""
        for index in self.selects:
            parameter = parameter[index]
        return parameter

    def of(self, parameter: Tensor) -> Tensor:
        return self.matrix(parameter)[self.start : self.stop]

    def bias_block(self, kind: str, outputs: int) -> Block:
        """The part of the bias that the map of this block of the weight adds: the same rows for a = x·Wᵀ + b
        (``kind`` "linear", rows are outputs), its matrix's whole vector of ``outputs`` entries for a = x·W + b."""
        return Block(self.selects, self.start, self.stop) if kind == "linear" else Block(self.selects, 0, outputs)


class BlockAdapter(LayerAdapter):
    """The map of ``adapter`` on a :class:`Block` of the unit's weight, and on the matching part of its bias:
    the same block for a = x·Wᵀ + b (``F.linear``, where rows are outputs), the same matrix for a = x·W + b
    (whose rows are inputs). ``nn.MultiheadAttention``'s cross-attention projects the query with rows 0:E of
    ``in_proj_weight`` and the key and value with the rest; a mixture of experts runs each expert's matrix of a
    stacked parameter on its tokens. Parameter gradients, by autograd, are zero outside the block."""

    def __init__(self, adapter: LayerAdapter, block: Block):
        super().__init__()
        self.kind = adapter.kind
        self.adapter, self.block = adapter, block

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        weight = self.block.of(weight)
        if bias is not None:
            bias = self.block.bias_block(self.kind, weight.shape[-1]).of(bias) if self.block.bias else None
        return self.adapter.forward(x, weight, bias)

    def input_rows(self, x: Tensor) -> Tensor:
        return self.adapter.input_rows(x)

    def output_rows(self, a: Tensor) -> Tensor:
        return self.adapter.output_rows(a)


class StackedMatmulAdapter(LayerAdapter):
    """a[e] = x[e]·W[e] for a stacked weight W of shape E × d_in × d_out and x of shape E × n × d_in:
    ``torch.bmm(x, W)``, a mixture of experts with a fixed capacity per expert written by hand."""

    kind = "stacked_matmul"

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        a = torch.matmul(x, weight)
        return a + bias.unsqueeze(-2) if bias is not None else a


class LeftMatmulAdapter(LayerAdapter):
    """a = W·x (+ b, down the columns) with W of shape d_out × d_in and x of shape … × d_in × n: ``W @ x``
    (Mamba's ``dt_proj.weight @ x``). Its rows are x's columns."""

    kind = "left_matmul"

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        a = torch.matmul(weight, x)
        return a + bias.unsqueeze(-1) if bias is not None else a

    def input_rows(self, x: Tensor) -> Tensor:
        return x.transpose(-1, -2).reshape(-1, x.shape[-2])

    def output_rows(self, a: Tensor) -> Tensor:
        return a.transpose(-1, -2).reshape(-1, a.shape[-2])


class EinsumAdapter(LayerAdapter):
    """a = einsum(equation, x, W) (or ``einsum(equation, W, x)``): a map linear in a weight of any number of
    dimensions that appears once, written as an Einstein sum (XLNet's ``torch.einsum("ibh,hnd->ibnd", h,
    self.q)``). Solved through autograd (the reference path), which needs no rows."""

    kind = "einsum"

    def __init__(self, equation: str, weight_first: bool):
        super().__init__()
        self._options = (equation, weight_first)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        equation, weight_first = self._options
        return torch.einsum(equation, weight, x) if weight_first else torch.einsum(equation, x, weight)


class ConvAdapter(LayerAdapter):
    """a = conv_W(x) + b for ``F.conv1d/2d/3d`` with the call's stride, padding, dilation and groups
    (grouped and depthwise convolutions included)."""

    def __init__(self, dims: int, stride, padding, dilation, groups: int):
        super().__init__()
        self.kind = f"conv{dims}d"
        self._conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        self._options = (stride, padding, dilation, groups)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv(x, weight, bias, *self._options)

    def output_rows(self, a: Tensor) -> Tensor:
        return a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1])


class ConvTransposeAdapter(LayerAdapter):
    """a = conv_transpose_W(x) + b for ``F.conv_transpose1d/2d/3d`` (``nn.ConvTranspose2d``: decoders, U-Nets,
    generators) with the call's stride, padding, output padding, groups and dilation; linear in (W, b) like a
    convolution, its gradient the convolution's."""

    def __init__(self, dims: int, stride, padding, output_padding, groups: int, dilation):
        super().__init__()
        self.kind = f"conv_transpose{dims}d"
        self._conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        self._options = (stride, padding, output_padding, groups, dilation)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv(x, weight, bias, *self._options)

    def output_rows(self, a: Tensor) -> Tensor:
        return a.flatten(2).transpose(1, 2).reshape(-1, a.shape[1])


class EmbeddingAdapter(LayerAdapter):
    """a = W[ids], the linear map of one-hot rows: ``F.embedding`` (its ``padding_idx`` row takes no gradient)."""

    kind = "embedding"

    def __init__(self, padding_idx: int | None):
        super().__init__()
        self.padding_idx = padding_idx

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.embedding(x, weight, self.padding_idx)

    def output_rows(self, a: Tensor) -> Tensor:
        return a.reshape(-1, a.shape[-1])


class Conv2dAdapter(LayerAdapter):
    kind = "conv2d"

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
class LayerRecord:
    """One recorded use of a unit: input x, pre-activation a, gradient g.

    ``versions`` are the version counters of x, a and the unit's parameters
    when the forward ran: an in-place operation after the layer (such as
    ``nn.ReLU(inplace=True)``) overwrites the memory that ``a`` shares with
    the layer's output, and the counters tell (see :meth:`RecordedLayer.output`).
    """

    x: Tensor
    a: Tensor
    versions: tuple[int, ...]
    g: Tensor | None = None

    def add_grad(self, grad: Tensor) -> None:
        # A graph backpropagated twice (retain_graph) sums, like .grad does.
        grad = grad.detach()
        self.g = grad if self.g is None else self.g + grad


def _recording_hook(record: LayerRecord, backpropagated: list[LayerRecord]):
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
class RecordedLayer:
    """A layer (nn.Linear or nn.Conv2d) with what its hooks recorded.

    Attributes:
        name: the layer's qualified name in the model (``"encoder.0"``).
        module: the layer.
        adapter: runs the layer as a pure function of (x, weight, bias).
        records: the recorded uses that received a gradient since the last
            step (a forward enters it when its backward pass reaches it).
    """

    name: str
    module: nn.Module
    adapter: LayerAdapter
    records: list[LayerRecord] = dataclasses.field(default_factory=list)
    _handle: torch.utils.hooks.RemovableHandle | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        """The unit's parameters θ: weight, then bias if the layer has one."""
        return [p for p in (self.module.weight, self.module.bias) if p is not None]

    @property
    def trainable(self) -> bool:
        return all(p.requires_grad for p in self.params)

    def attach(self) -> None:
        self._handle = self.module.register_forward_hook(WeakHook(self._record_forward))
        remove_when_gone(self, [self._handle])

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
        record = LayerRecord(x=x.detach(), a=output.detach(), versions=versions)
        output.register_hook(_recording_hook(record, self.records))

    def backpropagated_records(self) -> list[LayerRecord]:
        """Records since the last step that received a gradient."""
        return [r for r in self.records if r.g is not None]

    def check_record(self, record: LayerRecord) -> None:
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

    def output(self, record: LayerRecord) -> Tensor:
        """The output a = layer(x) of a recorded use (a unit's pre-activation).

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
        return f"RecordedLayer({self.name!r}, {type(self.module).__name__})"


def find_layers(model: nn.Module) -> list[RecordedLayer]:
    """Every trainable nn.Linear / nn.Conv2d of ``model``, in registration order (not yet attached)."""
    return [
        RecordedLayer(name=name or type(module).__name__, module=module, adapter=adapter)
        for name, module in model.named_modules()
        if (adapter := adapter_for(module)) is not None
        if all(p.requires_grad for p in module.parameters(recurse=False))
    ]


def unrecorded_gradient_error(kind: str, name: str) -> RuntimeError:
    """A layer whose parameters have a gradient that no recorded backward pass explains."""
    return RuntimeError(
        f"{kind} {name!r} has a gradient but no forward and backward pass was recorded since the last step(); "
        "run the forward pass and loss.backward() before each step() (forwards under torch.no_grad() are not "
        "recorded)"
    )


def no_backward_error(optimizer: str) -> RuntimeError:
    """``step()`` with nothing to step: no gradient, nothing recorded."""
    return RuntimeError(
        f"{optimizer}.step() called before any backward pass: no parameter has a gradient and no layer recorded "
        "one; call loss.backward() first"
    )
