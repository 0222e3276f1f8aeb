"""Recording, in the forward pass, every use of a unit's weight in a linear map, however the model calls it.

SPEC §2: a unit is the use of a parameter in a linear map, not a module
class. :class:`ForwardRecorder` is a ``TorchFunctionMode`` that a forward
pre-hook of the model (and of every module that owns a unit weight, for
code that calls submodules directly) enters and the matching forward hook
leaves. While it is active it sees the torch functions the forward calls:

- a linear map whose weight is a unit's weight: ``F.linear``
  (``nn.Linear``), ``torch.addmm(b, x, W)``, ``torch.matmul``/``mm`` with
  W on the right (Hugging Face's ``Conv1D``), ``F.conv1d/2d/3d`` (grouped
  and depthwise too), ``F.conv_transpose1d/2d/3d``, ``F.embedding``,
  ``x @ W.T`` (F.linear written out; the unit's bias added right after is
  folded into the map), ``W @ x`` (a parameter on the left),
  ``torch.bmm(x, W)`` with a stacked E × d_in × d_out parameter; the matrix maps also with a
  :class:`~locoprop.layers.Block` of a unit weight (and the matching part
  of its bias), a view such as ``W.split(...)`` (rows) or ``W[e]`` (a
  matrix of a stacked weight) gives, and ``torch._grouped_mm`` over a
  stacked weight (a mixture of experts: one use per group of rows, split
  at the step). ``F.multi_head_attention_forward`` is run with the
  recorder inside, so that ``nn.MultiheadAttention``'s projections are
  seen as the linear maps they are: the packed ``in_proj_weight`` whole in
  self-attention, by row blocks (query; key and value) in cross-attention,
  and ``out_proj``. Each use gets a :class:`UseRecord` (its input x,
  output a and, for a block, which part); the backward pass marks it when
  it reaches a. A use the recorder does not see needs nothing: the
  gradient G of the unit's local problem, ``p.grad``, includes it
  (:mod:`locoprop.local`).
- what consumes each unit output, until the unit's transfer function is
  known (:meth:`ForwardRecorder.decide_transfers`): an elementwise
  activation that is its only consumer, called as a function
  (``torch.tanh``, ``F.gelu``, ``a.relu()``) or applied by an activation
  module (``nn.Tanh``, Hugging Face's ``NewGELUActivation``), is the
  transfer function; views and reshapes in between are followed; anything
  else makes it the identity.

The mode adds a Python call per torch function of the forward, about a
microsecond each.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from locoprop.hooks import WeakHook, remove_when_gone
from locoprop.layers import (
    MATRIX_KINDS,
    Block,
    ConvAdapter,
    ConvTransposeAdapter,
    EinsumAdapter,
    EmbeddingAdapter,
    LayerAdapter,
    LeftMatmulAdapter,
    LinearAdapter,
    MatmulAdapter,
    StackedMatmulAdapter,
)
from locoprop.transfer import (
    Transfer,
    is_activation_module,
    regrouped,
    softmax,
    transfer_from_call,
    transfer_from_module,
)
from locoprop.views import dimension_through_views

__all__ = ["ForwardRecorder", "UseRecord", "squared_norm"]


@dataclasses.dataclass(eq=False)
class UseRecord:
    """One recorded use of a unit's weight: input x, output (pre-activation) a.

    ``versions`` are the version counters of x, a and the unit's parameters
    when the forward ran: an in-place operation after the map (such as
    ``nn.ReLU(inplace=True)``) overwrites the memory that ``a`` shares with
    the output, and the counters tell. ``backpropagated`` is set when the
    backward pass reaches a.
    """

    x: Tensor
    a: Tensor
    versions: tuple[int, ...]
    backpropagated: bool = False
    # The part of the weight (and of the bias) that the use's map took; None: all of it.
    block: Block | None = None
    # A grouped matmul's group ends: rows offsets[g-1]:offsets[g] of x went through matrix g of the weight.
    offsets: Tensor | None = None
    # ‖g‖² of g = ∂L/∂a (float64), kept only while the recorder's ``measure_gradients`` is set
    # (:mod:`locoprop.relative_gamma` needs it at a ρ start's first step, and at every step with a ceiling).
    gradient_square: Tensor | None = None


def squared_norm(t: Tensor) -> Tensor:
    """‖t‖², accumulated in float64 without a float64 copy of t (it runs at every step that measures)."""
    return torch.linalg.vector_norm(t, dtype=torch.float64).square()


def _marking_hook(record: UseRecord, backpropagated: list[UseRecord], measure: bool = False):
    """The gradient hook of one recorded use: it marks ``record`` and hands it to ``backpropagated`` (the
    unit's list). Until then the record lives only in this hook, that is in the autograd graph: a forward
    that is never backpropagated frees its record with its graph. Once handed over, the hook keeps only a
    weak reference, so that a graph the user keeps does not keep x and a alive past the step. With
    ``measure`` it also adds ‖g‖² to the record's ``gradient_square``."""
    pending = [record]
    ref = weakref.ref(record)

    def mark(grad: Tensor) -> None:
        if pending:
            backpropagated.append(pending.pop())
        alive = ref()
        if alive is not None:
            alive.backpropagated = True
            if measure:  # a graph backpropagated twice (retain_graph) adds, as .grad does
                square = squared_norm(grad.detach())
                alive.gradient_square = square if alive.gradient_square is None else alive.gradient_square + square

    return mark


# Ops that only look at a tensor's metadata, or read its numbers out of the graph (a forward hook that logs
# activations detaches them): never consumers, so a unit watched by such a hook keeps its transfer function.
_NOT_CONSUMERS = {Tensor.size, Tensor.dim, Tensor.numel, Tensor.stride, Tensor.is_contiguous, Tensor.__len__,
                  Tensor.detach, torch.detach, Tensor.item, Tensor.tolist, Tensor.numpy, Tensor.untyped_storage,
                  Tensor.data_ptr}  # fmt: skip
# Ops whose output is the same numbers rearranged: an elementwise function after them applies to the unit
# output itself, so they are followed.
_VIEWS = {Tensor.view, Tensor.reshape, torch.reshape, Tensor.flatten, torch.flatten, Tensor.contiguous,
          Tensor.unflatten, Tensor.squeeze, Tensor.unsqueeze, torch.squeeze, torch.unsqueeze, Tensor.transpose,
          torch.transpose, Tensor.permute, torch.permute, Tensor.movedim, torch.movedim}  # fmt: skip


class ForwardRecorder(TorchFunctionMode):
    """The recording mode of a model's units (see the module docstring).

    Args:
        units: the units; each gets its uses in ``unit.records`` (once backpropagated).
        on_output: called with (unit, output) for every recorded use (the output unit's finder listens), with
            (None, output) for a parameter's linear map that no unit records, and with (None, output, operands)
            for a map of computed operands (while the output unit is pending).
        on_transfers: a bound method, called through a weak reference with the units whose transfer
            functions a forward pass decided.
        output_pending: whether the output unit is still to be found; until then every unit's outputs are
            followed (the finder may hand a unit back its own transfer), after it only pending units'.
    """

    def __init__(self, units: list, on_output: Callable | None = None, on_transfers: Callable | None = None,
                 output_pending: Callable[[], bool] | None = None):  # fmt: skip
        super().__init__()
        self.output_pending = output_pending if output_pending is not None else lambda: False
        self._on_transfers = weakref.WeakMethod(on_transfers) if on_transfers is not None else None
        self._by_weight: dict[Tensor, list] = {}
        for unit in units:
            self._by_weight.setdefault(unit.weight, []).append(unit)
        self.on_output = on_output
        # Keep ‖g‖² in each record (set by the optimizer while a relative γ start is pending).
        self.measure_gradients = False
        self._depth = 0
        self._unbiased: dict[int, _Unbiased] = {}  # output id -> a use without its unit's bias, in this forward
        # Units whose map takes its bias until a forward with uses of theirs shows whether the bias is added;
        # unit -> whether it was in the forward running.
        self._bias_undecided: dict = {}
        self._training_forward = False  # whether the outermost forward began with gradients enabled
        # Whether a forward with gradients has run: after one, a unit that no linear map used is not local.
        self.trained_forward_seen = False
        # The DistributedDataParallel modules that ran a forward with gradients since the last step: they average
        # their parameters' gradients themselves (a trainer wraps the model after the optimizer was given it:
        # Lightning's DDP strategy; or a DDP wraps only a part of it).
        self._ddp_ran: weakref.WeakSet = weakref.WeakSet()
        self._handles: list = []
        # Transfer discovery, while a unit's is pending: output tensor id -> (_SeenUse, output), and each
        # followed use's consumers.
        self._units = units
        self.discovering = any(unit.transfer_pending for unit in units)
        self._outputs: dict[int, tuple] = {}
        self._seen: dict = {}  # the units recorded in this forward, in order
        self._consumers: dict = {}
        self._activation_depth = 0

    # --------------------------------------------------------- entering
    def attach(self, model: nn.Module) -> None:
        """Enter the mode around the model's forward, every module that holds a unit weight and every module
        that contains one: a forward may call a part of the model rather than the model (a LightningModule
        given as the model, its network called as ``self.net(x)``), and the mode must then span that part's
        forward, where the units' transfer functions are applied, not only each unit's own module."""
        for module in _containers_of(model, set(self._by_weight), self._units):
            self._handles.append(module.register_forward_pre_hook(WeakHook(self._enter)))
            self._handles.append(module.register_forward_hook(WeakHook(self._leave), always_call=True))
        for module in model.modules():
            if is_activation_module(module):
                self._handles.append(module.register_forward_pre_hook(WeakHook(self._activation_enter)))
                self._handles.append(module.register_forward_hook(WeakHook(self._activation_leave), always_call=True))
        for unit in self._units:
            if unit.weight.requires_grad:
                self._handles.append(unit.weight.register_hook(WeakHook(unit.gradient_arriving)))
        remove_when_gone(self, self._handles)

    def averaged_by_ddp(self) -> set[Tensor]:
        """The parameters whose gradients a DistributedDataParallel averaged in this step's forwards; the next
        step starts afresh (:meth:`step_done`)."""
        return {p for ddp in self._ddp_ran for p in _averaged_by(ddp)}

    def step_done(self) -> None:
        self._ddp_ran = weakref.WeakSet()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _enter(self, module: nn.Module, args) -> None:
        ddp = _active_ddp()
        if ddp is not None and torch.is_grad_enabled():
            self._ddp_ran.add(ddp)
        if self._depth == 0:
            # A forward run by the backward pass (reentrant activation checkpointing recomputes a block, calling
            # only the modules inside it) sees a unit's map without what the model applies to its output.
            # (While the output unit is to be found, its holder may get its own transfer back: read it too.)
            pending = any(unit.transfer_pending for unit in self._units) or self.output_pending()
            self.discovering = pending and not _in_backward()
            self._training_forward = torch.is_grad_enabled()
            self.__enter__()
        self._depth += 1

    def _leave(self, module: nn.Module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.__exit__(None, None, None)
            self.trained_forward_seen = self.trained_forward_seen or self._training_forward
            self._settle_biases()
            if self.discovering and self._seen:
                self.decide_transfers()

    # ---------------------------------------------------------- the mode
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            with self:  # its projections are F.linear calls inside it
                return _mha_forward_inside()(*args, **kwargs)
        if self.discovering and func not in _NOT_CONSUMERS and getattr(func, "__name__", "") != "__get__":
            self._note_consumer(func, args, kwargs)
        output = func(*args, **kwargs)
        folded = bool(self._unbiased) and func in _ADDITIONS and self._fold_bias(func, args, kwargs, output)
        if self.discovering and isinstance(output, Tensor) and not folded:
            if func in _VIEWS:
                self._follow(args[0] if args else None, output)
            elif self._tracked(output) is not None:  # changed in place: what consumes it now consumes f(a)
                del self._outputs[id(output)]
        use = _linear_use(func, args, kwargs)
        if use is not None and isinstance(output, Tensor):
            self._record(use, output)
        elif (
            self.discovering
            and func in _MAPS
            and self.on_output is not None
            and self.output_pending()
            and isinstance(output, Tensor)
        ):
            computed = _computed_operands(func, args, kwargs)
            if computed:  # (the finder tells whether one is computed from parameters alone: weight norm)
                self.on_output(None, output, computed)
        return output

    def _record(self, use: _Use, output: Tensor) -> None:
        unit, adds_bias = self._unit_for(use.weight, use.bias, use.adapter)
        if unit is None:
            if self.on_output is not None and output.requires_grad:
                self.on_output(None, output)  # a parameter's map that no unit records (tied to another kind, frozen)
            return
        if unit.read_at_ones is not None and self._training_forward and not _in_backward():
            # (a forward that reads transfers: with gradients, not the backward pass's recomputation)
            self.discovering = unit.read_again_for(output) or self.discovering
        if not (torch.is_grad_enabled() and output.requires_grad):
            # A use without a graph inside a forward that has one: reentrant activation checkpointing runs
            # its block without gradients and again in the backward pass, where the use is recorded; the
            # transfer function is read here, in the model's forward.
            if self.discovering and self._training_forward and (unit.transfer_pending or self.output_pending()):
                self._discover(unit, output, with_graph=False)
                if unit.uses_bias and not adds_bias and unit.kind in MATRIX_KINDS:
                    self._unbiased[id(output)] = _Unbiased(None, unit, output, use.block)  # (to follow a + b)
            return
        if output.numel() == 0:
            return  # (an expert without tokens: nothing to match)
        x = use.x.detach()
        versions = (x._version, output._version, *unit.param_versions())
        block = use.block
        if unit.uses_bias and not adds_bias:  # (the whole weight or its block, without the bias)
            block = dataclasses.replace(block or Block((), 0, unit.weight.shape[0]), bias=False)
        record = UseRecord(x=x, a=output.detach(), versions=versions, block=block, offsets=use.offsets)
        if block is not None and not block.bias and use.offsets is None and unit.kind in MATRIX_KINDS:
            self._unbiased[id(output)] = _Unbiased(record, unit, output, use.block)
        output.register_hook(_marking_hook(record, unit.records, self.measure_gradients))
        if self.on_output is not None:
            self.on_output(unit, output)
        if self.discovering and (unit.transfer_pending or self.output_pending()):
            # (while the output unit is to be found, every unit's: the finder may hand a unit its transfer back)
            self._discover(unit, output, with_graph=True)

    def _discover(self, unit, output: Tensor, with_graph: bool) -> None:
        """Follow ``output``'s consumers until the forward ends, to read ``unit``'s transfer function."""
        use = _SeenUse(unit, with_graph, tuple(output.shape))
        # Held (not weakly) until the forward ends, so that no later tensor can take its id.
        self._outputs[id(output)] = (use, output, output)  # (use, the tensor followed, the unit's output)
        self._seen.setdefault(unit, []).append(use)

    def _unit_for(self, weight: Tensor, bias, adapter: LayerAdapter) -> tuple:
        """(unit, whether the use adds the unit's bias): the unit whose map this is (same kind and bias); a
        use of another kind (a tied embedding table read by F.embedding and by F.linear) belongs to the unit of
        that kind. A use without the bias of a unit whose map adds it is that map without its bias (until a
        bias addition right after folds it in, :meth:`_fold_bias`); a use with the bias of a unit whose map
        has none adds a constant. A matrix unit with a bias partner whose first use has no bias takes the bias
        until a forward with a graph shows whether it is added (:meth:`_settle_biases`): x @ W.T + b is
        F.linear written out."""
        candidates = self._by_weight.get(weight, ())
        unit_bias = bias is not None and any(bias is unit.bias for unit in candidates)
        for unit in candidates:
            same_bias = bias is unit.bias if unit.uses_bias else not unit_bias
            if unit.adapter is not None and unit.adapter.kind == adapter.kind and same_bias:
                if unit.uses_bias and unit in self._bias_undecided:
                    self._bias_undecided[unit] = True  # (a use with the bias: the map adds it)
                return (unit if unit.same_map(adapter) else None), unit.uses_bias
        for unit in candidates:
            if unit.adapter is None and unit.expects(adapter.kind) and (not unit_bias or bias is unit.bias):
                unit.adapter, unit.uses_bias = adapter, unit_bias
                if bias is None and adapter.kind in MATRIX_KINDS and unit.bias is not None:
                    unit.uses_bias = True  # (until settled)
                    self._bias_undecided[unit] = False
                return unit, unit_bias
        for unit in candidates:
            if unit.adapter is not None and unit.adapter.kind == adapter.kind and (bias is None or bias is unit.bias):
                return (unit if unit.same_map(adapter) else None), False
        return None, False

    def _fold_bias(self, func, args: tuple, kwargs: dict, output) -> bool:
        """Whether ``output`` = a + b (``a + b``, ``b + a``, ``torch.add``, ``a += b``) was folded into a use:
        a the output of a use without its unit's bias, unchanged since, and b that bias (or the part of it the
        use's block takes). The use becomes the map with its bias, ``output`` its pre-activation."""
        in_place = func in _IN_PLACE_ADDITIONS
        first, second = _arguments(args, kwargs, ("input", "other"), ())
        if kwargs.get("alpha", 1) != 1 or not isinstance(output, Tensor):
            return False
        for awaited, other in ((first, second),) if in_place else ((first, second), (second, first)):
            use = self._unbiased.get(id(awaited)) if isinstance(awaited, Tensor) else None
            if use is None or use.output is not awaited:
                continue
            version = awaited._version - in_place
            if not use.adds(other) or (use.record is not None and version != use.record.versions[1]):
                return False  # (another addend than the bias, or changed in place before)
            del self._unbiased[id(awaited)]
            if use.record is not None:  # (None: a use without a graph, followed only to read the transfer)
                use.record.a, use.record.block = output.detach(), use.block
                use.record.versions = (use.record.versions[0], output._version, *use.record.versions[2:])
                if use.unit in self._bias_undecided:
                    self._bias_undecided[use.unit] = True
            if self.discovering:  # (the addition is no consumer: what consumes the sum, the unit's output, is)
                self._follow(awaited, output, unit_output=True)
            return True
        return False

    def _settle_biases(self) -> None:
        """At the end of a forward: a unit whose map took its bias until a forward showed whether it is added
        keeps it if a use of this forward had the bias folded in, and has a map without it if its uses (with a
        graph) had none; those uses become plain uses of that map. A forward that recorded no use of the unit
        (under no_grad, a reentrant checkpoint's block) shows nothing."""
        for unit, folded in list(self._bias_undecided.items()):
            unbiased = [use for use in self._unbiased.values() if use.unit is unit and use.record is not None]
            if not folded and unbiased:
                unit.uses_bias = False
                for use in unbiased:
                    use.record.block = use.block
            if folded or unbiased:
                del self._bias_undecided[unit]
        self._unbiased.clear()

    # --------------------------------------------------- transfer discovery
    def _tracked(self, value) -> tuple | None:
        if isinstance(value, Tensor):
            entry = self._outputs.get(id(value))
            if entry is not None and entry[1] is value:
                return entry
        return None

    def _note_consumer(self, func, args, kwargs) -> None:
        if self._activation_depth:
            return  # inside an activation module: the module is the consumer
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                entry = self._tracked(item)
                if entry is not None:
                    transfer = _as_read_through(item, entry[2], transfer_from_call(func, args, kwargs))
                    self._consumers.setdefault(entry[0], []).append(transfer)

    def _follow(self, source, output: Tensor, unit_output: bool = False) -> None:
        """Follow ``output``, a view of ``source`` (or, ``unit_output``, the unit's output with its bias added)."""
        entry = self._tracked(source)
        if entry is not None:
            consumers = self._consumers.get(entry[0], [])
            consumers.pop()  # the view is no consumer: what consumes it is
            self._outputs[id(output)] = (entry[0], output, output if unit_output else entry[2])

    def _activation_enter(self, module: nn.Module, args) -> None:
        # (counted first: what this hook calls, with the mode active, is no consumer)
        self._activation_depth += 1
        if self.discovering and self._depth and self._activation_depth == 1:
            for value in args:
                entry = self._tracked(value)
                if entry is not None:
                    transfer = _as_read_through(value, entry[2], transfer_from_module(module, value.dim()))
                    self._consumers.setdefault(entry[0], []).append(transfer)

    def _activation_leave(self, module: nn.Module, args, output) -> None:
        self._activation_depth -= 1

    def decide_transfers(self) -> None:
        """Give each unit seen in this forward its transfer function: the elementwise activation that is the
        only consumer of each of its outputs (one function for all), or the identity. Uses without a graph
        count only for a unit that had no other (a reentrant checkpoint's block, not a ``no_grad`` island)."""
        seen = [unit for unit in self._seen if unit.transfer_pending]
        for unit in seen:
            uses = [use for use in self._seen[unit] if use.with_graph] or self._seen[unit]
            found = [self._consumers.get(use, []) for use in uses]
            transfers = [consumers[0] for consumers in found if len(consumers) == 1 and consumers[0] is not None]
            same = len(transfers) == len(found) and len({transfer.name for transfer in transfers}) == 1
            unit.discovered(transfers[0] if same else None, [use.shape for use in uses])
        on_transfers = self._on_transfers() if self._on_transfers is not None else None
        if on_transfers is not None and seen:
            on_transfers(seen)
        self.discovering = any(unit.transfer_pending for unit in self._units)
        self._outputs.clear()
        self._consumers.clear()
        self._seen.clear()


def _as_read_through(view: Tensor, output: Tensor, transfer: Transfer | None) -> Transfer | None:
    """The transfer function of the unit whose ``output`` ``transfer`` consumes through ``view`` (views of it,
    or the output itself): an elementwise function whatever the views; a softmax over the dimension of the
    unit's output that its dimension of the view is (attention pooling's scores, squeezed: their softmax over
    positions is ``softmax(dim=1)`` of the B × T × 1 scores); over none whole (a softmax per group of the
    outputs: Deformable DETR's per-head attention weights), none that variant M has an integral for."""
    if transfer is None or transfer.softmax_dim is None or view is output:
        return transfer
    if not view.dim():  # (a softmax of a scalar is 1 whatever it is made of)
        return regrouped(transfer)
    dim = transfer.softmax_dim % view.dim()
    if view.grad_fn is not None and output.grad_fn is not None:
        node, read = dimension_through_views(view.grad_fn, view.shape, dim, (output.grad_fn,))
        read = read if node is output.grad_fn else None
    else:  # (a forward without gradients: a reentrant checkpoint's block)
        read = _dimension_by_strides(view, output, dim)
    if read is None:
        return regrouped(transfer)
    return softmax() if read == output.dim() - 1 else softmax(read)


def _dimension_by_strides(view: Tensor, output: Tensor, dim: int) -> int | None:
    """The dimension of ``output`` that ``dim`` of ``view``, which shares its memory, is: the only one of its
    size and stride. None for a copy, a dimension of one, or strides that several dimensions share."""
    shared = view.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
    if view.shape[dim] == 1 or not shared:
        return None
    size, stride = view.shape[dim], view.stride(dim)
    found = [d for d in range(output.dim()) if (output.shape[d], output.stride(d)) == (size, stride)]
    return found[0] if len(found) == 1 else None


# The DistributedDataParallel whose forward is running, if any (looked up once: it runs in every module's hook).
_active_ddp = getattr(nn.parallel.DistributedDataParallel, "_get_active_ddp_module", lambda: None)


def _averaged_by(ddp: nn.Module) -> list[Tensor]:
    """The parameters whose gradients ``ddp`` averages over the ranks: its module's that require gradients,
    less those it ignores. (DDP takes those that required them when it was built: a parameter unfrozen after
    wrapping, which DDP's documentation rules out, would be taken for averaged.)"""
    ignored = getattr(ddp, "parameters_to_ignore", set())
    return [p for name, p in ddp.module.named_parameters() if p.requires_grad and name not in ignored]


def _containers_of(model: nn.Module, weights: set, units: list) -> list[nn.Module]:
    """``model``, each unit's module, each module holding a unit weight as its own parameter, and every module
    that contains one of those, in ``model.modules()`` order."""
    holders = {unit.module for unit in units if unit.module is not None}
    paths = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(module, []).append(name)
        if any(p in weights for p in module.parameters(recurse=False)):
            holders.add(module)
    prefixes = {""}
    for module in holders:
        for name in paths.get(module, []):
            parts = name.split(".") if name else []
            prefixes.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    containers = [module for module, names in paths.items() if any(name in prefixes for name in names)]
    return containers + [module for module in holders if module not in paths]


@dataclasses.dataclass(eq=False)
class _Unbiased:
    """A use without its unit's bias (a Block with bias=False), until its forward ends: an addition of that bias
    to ``output`` may follow, which folds it into the use's map (:meth:`ForwardRecorder._fold_bias`)."""

    record: UseRecord | None  # (None: a use without a graph, whose consumers transfer discovery follows)
    unit: object
    output: Tensor
    block: Block | None  # the use's part of the weight (None: all of it)

    def adds(self, addend) -> bool:
        """Whether ``addend`` is the unit's bias, or the part of it that the use's block takes."""
        if self.block is None:
            return _parameter_of(addend) is self.unit.bias
        found = _block_of(addend) if isinstance(addend, Tensor) and addend.dim() == 1 else None
        return (
            found is not None
            and found[0] is self.unit.bias
            and found[1] == self.block.bias_block(self.unit.kind, addend.shape[-1])
        )


@dataclasses.dataclass(eq=False)
class _SeenUse:
    """One use of a unit whose consumers transfer discovery follows (keyed by identity)."""

    unit: object
    with_graph: bool
    shape: tuple = ()


def _in_backward() -> bool:
    """Whether the calling thread runs inside an autograd backward pass."""
    return torch._C._current_graph_task_id() != -1


@dataclasses.dataclass
class _Use:
    """A linear map of a parameter seen in the forward: its weight and bias parameters, input and map; with
    ``block`` the map took that part of them, with ``offsets`` it was a grouped matmul."""

    weight: Tensor
    bias: Tensor | None
    x: Tensor
    adapter: LayerAdapter
    block: Block | None = None
    offsets: Tensor | None = None


def _linear_use(func, args: tuple, kwargs: dict) -> _Use | None:
    """The use when ``func(*args, **kwargs)`` is a linear map of a parameter (or of a block of one), else None."""
    if func is F.linear:
        x, weight, bias = _arguments(args, kwargs, ("input", "weight", "bias"), (None,))
        return _map_of(weight, bias, x, LinearAdapter())
    if func in (torch.addmm, Tensor.addmm):
        bias, x, weight = _arguments(args, kwargs, ("input", "mat1", "mat2"), ())
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
            return None
        return _map_of(weight, bias, x, MatmulAdapter())
    if func in (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm):
        x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
        return _map_of(weight, None, x, MatmulAdapter()) or _left_map_of(x, weight) or _stacked_map_of(x, weight)
    if func in (torch.bmm, Tensor.bmm):
        x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("mat2")
        return _stacked_map_of(x, weight)
    if func in (torch.baddbmm, Tensor.baddbmm):  # b[e] + x[e]·W[e]: RecurrentGemma's block-diagonal gates
        added, x, weight = _arguments(args, kwargs, ("input", "batch1", "batch2"), ())
        use = _stacked_map_of(x, weight)
        bias = _stacked_bias_of(added, use.weight) if use is not None else None
        if bias is None or kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
            return None  # (an addend that is no bias of the stacked weight: the output is no map of it)
        return dataclasses.replace(use, bias=bias)
    if func is torch._grouped_mm:
        return _grouped_use(*_arguments(args, kwargs, ("mat_a", "mat_b", "offs", "bias"), (None, None)))
    if func in _CONVOLUTIONS:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        x, weight, bias, stride, padding, dilation, groups = _arguments(args, kwargs, names, (None, 1, 0, 1, 1))
        weight, bias = _parameter_of(weight), _as_parameter(bias)
        if weight is None:
            return None
        # ('same'/'valid' padding: the adapter's F.conv call takes it as given)
        return _Use(weight, bias, x, ConvAdapter(_CONVOLUTIONS[func], stride, padding, dilation, groups))
    if func in _TRANSPOSED_CONVOLUTIONS:
        names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
        x, weight, bias, *options = _arguments(args, kwargs, names, (None, 1, 0, 0, 1, 1))
        weight, bias = _parameter_of(weight), _as_parameter(bias)
        if weight is None:
            return None
        return _Use(weight, bias, x, ConvTransposeAdapter(_TRANSPOSED_CONVOLUTIONS[func], *options))
    if func is torch.einsum:
        return _einsum_use(args)
    if func is F.embedding:
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        ids, weight, padding_idx, max_norm, _, by_frequency, sparse = _arguments(
            args, kwargs, names, (None, None, 2.0, False, False))  # fmt: skip
        # max_norm rewrites the table in place; sparse and by-frequency gradients are not the dense ∇L.
        if not isinstance(weight, nn.Parameter) or max_norm is not None or sparse or by_frequency:
            return None
        return _Use(weight, None, ids, EmbeddingAdapter(padding_idx))
    return None


def _einsum_use(args: tuple) -> _Use | None:
    """``torch.einsum(equation, x, W)`` or ``(equation, W, x)`` (operands also as one list) with W a parameter
    and x not one: a map linear in W. Einstein sums of activations alone (attention's) are none, and neither
    is a sum of two parameters (a factorised weight: which one would be the map's?)."""
    if len(args) < 2 or not isinstance(args[0], str):
        return None
    operands = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    if len(operands) != 2 or not all(isinstance(operand, Tensor) for operand in operands):
        return None
    is_weight = [isinstance(operand, nn.Parameter) for operand in operands]
    if is_weight.count(True) != 1 or isinstance(getattr(operands[is_weight.index(False)], "_base", None),
                                                 nn.Parameter):  # fmt: skip
        return None
    weight_first = is_weight[0]
    weight, x = operands if weight_first else operands[::-1]
    if weight.dim() < 2:
        return None  # (no candidate: a 1-D scale or bias, updated on its gradient)
    return _Use(weight, None, x, EinsumAdapter(args[0].replace(" ", ""), weight_first))


def _map_of(weight, bias, x, adapter: LayerAdapter) -> _Use | None:
    """The use of a matrix map a = x·Wᵀ + b (linear) or x·W + b (matmul) whose W is a 2-D parameter, or a
    :class:`Block` of one with the matching part of a bias parameter (:class:`BlockAdapter`)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    if not isinstance(weight, nn.Parameter) and not isinstance(getattr(weight, "_base", None), nn.Parameter):
        return None  # (the product of two activations, as attention's: checked first, on every such call)
    whole = _parameter_of(weight)
    if whole is not None:
        return _Use(whole, _as_parameter(bias), x, adapter)
    transposed = _parameter_of(weight.T)
    if transposed is not None and adapter.kind == "matmul":  # x @ W.T (+ b): F.linear written out (Falcon)
        return _Use(transposed, _as_parameter(bias), x, LinearAdapter())
    found = _block_of(weight)
    if found is None and adapter.kind == "matmul":  # x @ W[e].T: F.linear of a block written out (DBRX's experts)
        found, adapter = _block_of(weight.T), LinearAdapter()
    if found is None:
        return None
    base, block = found
    if bias is None:
        return _Use(base, None, x, adapter, block)
    found_bias = _block_of(bias) if isinstance(bias, Tensor) and bias.dim() == 1 else None
    if found_bias is None or found_bias[1] != block.bias_block(adapter.kind, weight.shape[1]):
        return None  # another part of the bias than of the weight: no map of the unit's parameters
    return _Use(base, found_bias[0], x, adapter, block)


def _left_map_of(weight, x) -> _Use | None:
    """The use of a = W·x with W a 2-D parameter on the left (Mamba's ``dt_proj.weight @ x``), else None."""
    weight = _parameter_of(weight)
    if weight is None or weight.dim() != 2 or not isinstance(x, Tensor) or x.dim() < 2:
        return None
    return _Use(weight, None, x, LeftMatmulAdapter())


def _stacked_map_of(x, weight) -> _Use | None:
    """The use of a[e] = x[e]·W[e] with W a stacked E × d_in × d_out parameter and x of shape E × n × d_in."""
    weight = _parameter_of(weight)
    if weight is None or weight.dim() != 3 or not isinstance(x, Tensor) or x.dim() != 3:
        return None
    return _Use(weight, None, x, StackedMatmulAdapter())


def _stacked_bias_of(added, weight: Tensor) -> nn.Parameter | None:
    """The E × d_out parameter b that ``added`` shows as b[:, None, :] (``b.unsqueeze(1)``), added to the
    products x[e]·W[e] of a stacked E × d_in × d_out ``weight``; else None."""
    base = getattr(added, "_base", None)
    if not isinstance(base, nn.Parameter) or base.shape != (weight.shape[0], weight.shape[2]):
        return None
    shown = added.shape == (base.shape[0], 1, base.shape[1]) and added.storage_offset() == base.storage_offset()
    return base if shown and (added.stride(0), added.stride(2)) == base.stride() else None


def _parameter_of(tensor) -> nn.Parameter | None:
    """``tensor`` if it is a parameter, or the parameter it shows whole and unchanged (a view such as Mamba's
    ``conv1d.weight.squeeze(1).unsqueeze(1)``); else None."""
    if isinstance(tensor, nn.Parameter):
        return tensor
    base = getattr(tensor, "_base", None)
    same = isinstance(base, nn.Parameter) and (tensor.shape, tensor.stride()) == (base.shape, base.stride())
    return base if same and tensor.storage_offset() == base.storage_offset() else None


def _as_parameter(tensor):
    """The parameter that ``tensor`` shows whole (:func:`_parameter_of`), else ``tensor`` itself."""
    parameter = _parameter_of(tensor)
    return tensor if parameter is None else parameter


def _block_of(view: Tensor) -> tuple[nn.Parameter, Block] | None:
    """(parameter, block) when ``view`` is ``parameter[selects][start:stop]`` of a contiguous parameter: as
    ``W.split``/``W.chunk`` give rows, ``W[e]`` a matrix of a stacked parameter; else None."""
    base = getattr(view, "_base", None)
    if not (isinstance(base, nn.Parameter) and base.is_contiguous() and 1 <= view.dim() <= base.dim()):
        return None
    leading = base.dim() - view.dim()
    if view.shape[1:] != base.shape[leading + 1 :] or view.stride() != base.stride()[leading:]:
        return None
    offset, selects = view.storage_offset() - base.storage_offset(), []
    for stride in base.stride()[:leading]:
        index, offset = divmod(offset, stride)
        selects.append(index)
    start, within = divmod(offset, base.stride(leading))
    stop = start + view.shape[0]
    if within or stop > base.shape[leading]:
        return None  # (a flattened stack, W.view(E * d_out, d_in), is no block of one matrix)
    return base, Block(tuple(selects), start, stop)


def _grouped_use(x, weight, offsets, bias) -> _Use | None:
    """A mixture of experts' grouped matmul (``torch._grouped_mm``, Hugging Face's default experts kernel): rows
    offsets[g−1]:offsets[g] of x times matrix g of a stacked parameter (E × d_in × d_out, a matmul), or of its
    transpose (E × d_out × d_in, a linear map)."""
    if offsets is None or bias is not None or not isinstance(weight, Tensor) or weight.dim() != 3 or x.dim() != 2:
        return None
    whole = _parameter_of(weight)
    if whole is not None:
        return _Use(whole, None, x, MatmulAdapter(), offsets=offsets)
    transposed = _parameter_of(weight.mT)  # (Hugging Face passes W.transpose(-2, -1) of an E × d_out × d_in W)
    return _Use(transposed, None, x, LinearAdapter(), offsets=offsets) if transposed is not None else None


_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_IN_PLACE_ADDITIONS = {Tensor.add_, Tensor.__iadd__}
_ADDITIONS = {torch.add, Tensor.add, Tensor.__add__, *_IN_PLACE_ADDITIONS}
_TRANSPOSED_CONVOLUTIONS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
# Linear maps by the positions of the arguments that may be their weight, whatever it is computed from.
_MAPS = {F.linear: (1,), **dict.fromkeys((*_CONVOLUTIONS, *_TRANSPOSED_CONVOLUTIONS), (1,)),
         **dict.fromkeys((torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm),
                         (0, 1)),
         **dict.fromkeys((torch.addmm, Tensor.addmm, torch.baddbmm, Tensor.baddbmm), (1, 2)),
         torch.einsum: (1, 2)}  # fmt: skip


def _computed_operands(func, args: tuple, kwargs: dict) -> list[Tensor]:
    """The operands of a ``_MAPS`` call that may be a weight computed from parameters (weight or spectral norm,
    a pruning mask applied, a concatenation of weights), whose map produces no unit's output: tensors computed
    with gradients, not parameters. (Positional operands only; an einsum's one by one or as one list.)"""
    if func is torch.einsum and len(args) == 2 and isinstance(args[1], (list, tuple)):
        return _computed_operands(func, (args[0], *args[1]), kwargs)
    operands = [args[i] for i in _MAPS[func] if i < len(args)]
    if func is F.linear and len(args) < 2:
        operands.append(kwargs.get("weight"))
    return [t for t in operands if isinstance(t, Tensor) and t.grad_fn is not None and _parameter_of(t) is None]


def _arguments(args: tuple, kwargs: dict, names: tuple, defaults: tuple) -> list:
    """The call's arguments by position or name; the last ``len(defaults)`` have defaults."""
    required = len(names) - len(defaults)
    values = []
    for i, name in enumerate(names):
        if i < len(args):
            values.append(args[i])
        else:
            values.append(kwargs.get(name, defaults[i - required] if i >= required else None))
    return values


_MHA_INSIDE = None


def _mha_forward_inside():
    """``F.multi_head_attention_forward`` without its own torch-function check, so that it runs inside the
    recorder instead of handing itself to it again; the functions it calls keep theirs."""
    global _MHA_INSIDE
    if _MHA_INSIDE is None:
        original = F.multi_head_attention_forward
        namespace = dict(original.__globals__)
        namespace["has_torch_function"] = lambda *_: False
        _MHA_INSIDE = types.FunctionType(original.__code__, namespace, original.__name__, original.__defaults__,
                                         original.__closure__)  # fmt: skip
        _MHA_INSIDE.__kwdefaults__ = original.__kwdefaults__
    return _MHA_INSIDE
