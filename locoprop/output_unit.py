"""The unit that produces the model's output, and the transfer function it gets.

A model usually returns logits and folds the last transfer function into
the loss; ``output_activation`` names it (SPEC §2). Registration order does
not tell which unit produces the output (a module may define its head
before its body), so :class:`OutputUnitFinder` finds it from the first
forward pass, and :class:`OutputActivation` moves the transfer function to
it.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

from torch import Tensor, nn

from locoprop.describe import callers_level
from locoprop.hooks import WeakHook, remove_when_gone
from locoprop.transfer import Transfer, regrouped, softmax, transfer_by_name
from locoprop.units import Unit
from locoprop.views import dimension_through_views

__all__ = ["OutputActivation", "OutputUnitFinder"]


# What the model's output shows of the output unit's, besides a dimension of it (see OutputUnitFinder.read):
_OWN = "own"  # its own output, as far as anything tells (the model's forward never ran)
_REGROUPED = "regrouped"  # a softmax over no whole dimension of it


class OutputActivation:
    """``output_activation`` as the transfer function of the unit that produces the model's output.

    Until the first forward pass shows which unit that is, the last unit
    holds it. When the pass shows another one, that unit gets it and the
    previous holder gets back its discovered transfer; ``on_change(units)``
    then lets the optimizer update its param groups and check the units,
    and an error it raises (or an ambiguous forward: two heads added)
    refuses the steps that follow (:meth:`check`).
    """

    def __init__(self, units: list[Unit], name: str):
        self.transfer = transfer_by_name(name)
        self._units = units
        self._holder = units[-1]
        self._displaced = (self._holder.transfer, self._holder.transfer_pending)
        self._holder.given(self._for(self._holder))
        self._on_change: weakref.WeakMethod | None = None
        self._error: Exception | None = None
        self._finder: OutputUnitFinder | None = None

    def _for(self, unit: Unit, read=_OWN) -> Transfer:
        """The output activation as ``unit``'s transfer function, given the dimension of the unit's output that
        the model's output shows the loss's softmax over (``read``, see :meth:`OutputUnitFinder.read`): its
        last dimension, or a convolution's channels, as ``F.cross_entropy`` takes a segmentation head's
        per-pixel logits, is the softmax the output activation names; another whole dimension (a
        question-answering head's positions, after the model splits its two columns) is the softmax over that
        dimension; none whole (a multiple-choice head's scores, regrouped from its rows) has no integral of the
        unit's output. An output computed from the unit's by more than views (pooled, biased) reads it as the
        output activation names it."""
        if self.transfer.softmax_dim is None or read is None:
            return self.transfer
        if read is _REGROUPED:
            return regrouped(self.transfer)
        conv = (unit.kind or "").startswith("conv")
        if read is _OWN or read == (1 if conv else -1):
            return softmax(dim=1) if conv else self.transfer
        return softmax(dim=read)

    def attach(self, model: nn.Module, on_change: Callable[[list[Unit]], None]) -> None:
        """Watch ``model``'s first forward pass (which unit's output the model's is, and how). Attach
        it before the recorder, so that the output unit is known before the recorder reads the other
        units' transfer functions.

        ``on_change``, a bound method, is called through a weak reference: the
        hooks that the model keeps do not keep its object alive."""
        self._on_change = weakref.WeakMethod(on_change)
        # (also for one unit: the forward shows whether the model's output is that unit's own, or a tied head's)
        self._finder = OutputUnitFinder(model, self._found)

    def note(self, unit: Unit | None, output: Tensor, computed: list[Tensor] = ()) -> None:
        """A recorded use of ``unit`` gave ``output`` (the recorder's callback; see :meth:`OutputUnitFinder.note`)."""
        if self._finder is not None:
            self._finder.note(unit, output, computed)

    @property
    def pending(self) -> bool:
        """Whether the output unit is still to be found (a unit may yet get its own transfer back)."""
        return self._finder is not None and self._finder.pending

    def check(self) -> None:
        """Refuse a step when the output unit could not be given the transfer function."""
        if self._finder is not None:
            self._finder.decide_now()  # the model's own forward never ran: the last unit to run
        if self._error is not None:
            raise type(self._error)(*self._error.args)

    def remove(self) -> None:
        if self._finder is not None:
            self._finder.remove()
            self._finder = None

    def _found(self, reached: list[Unit], hidden: bool = False, unrecorded: bool = False,
               reads: dict | None = None) -> None:  # fmt: skip
        if unrecorded and reached:
            names = [u.name for u in self._units if u in reached]
            self._error = RuntimeError(
                f"output_activation={self.transfer.name!r} is the transfer function of the unit that produces the "
                f"model's output, but units {names} and a linear map that is no unit (a weight tied to a unit of "
                "another kind, frozen, or computed: weight or spectral norm) all reach it. Pass units=[(layer, "
                "transfer), ...] naming every unit's transfer function instead of output_activation"
            )
            return
        if unrecorded:
            # The output layer is a map no unit records: the softmax folded into the loss is no unit's, and the
            # last unit, which held it until now, gets back its own transfer (still to be read, if it was).
            previous = self._holder
            previous.transfer, previous.transfer_pending = self._displaced
            warnings.warn(
                f"output_activation={self.transfer.name!r}: the model's output comes from a linear map that no unit "
                "records (a weight tied to a unit of another kind, such as F.linear(h, embedding.weight), a frozen "
                "one, or one computed from parameters: weight or spectral norm); no unit takes the output activation",
                stacklevel=callers_level(),
            )
            self._changed([previous])
            return
        if len(self._units) == 1 and (hidden or not reached):
            return  # (one unit: it holds the output activation, whatever comes after it)
        if hidden:
            self._error = RuntimeError(
                f"output_activation={self.transfer.name!r} is the transfer function of the unit that produces the "
                "model's output, but the output comes through a reentrant activation checkpoint "
                "(torch.utils.checkpoint with use_reentrant=True), whose block runs without a graph in the forward "
                "pass, so the unit cannot be told. Checkpoint with use_reentrant=False, or pass units=[(layer, "
                "transfer), ...] instead of output_activation"
            )
            return
        if len(reached) != 1:
            names = [u.name for u in self._units if u in reached]
            where = f"units {names} all reach it" if reached else "no unit reaches it"
            self._error = RuntimeError(
                f"output_activation={self.transfer.name!r} is the transfer function of the unit that produces "
                f"the model's output, but the forward pass does not tell which unit that is: {where}. Pass "
                "units=[(layer, transfer), ...] naming every unit's transfer function instead of output_activation"
            )
            return
        unit, previous = reached[0], self._holder
        if unit is previous:
            transfer = self._for(unit, (reads or {}).get(unit))
            changed = transfer.name != unit.transfer.name  # (its kind, or where its output goes, is known now)
            unit.given(transfer)
            if changed:
                self._changed([unit])
            return
        # The previous holder gets back what it had (its transfer still to be read, if it was).
        (previous.transfer, previous.transfer_pending), self._displaced = (
            self._displaced,
            (unit.transfer, unit.transfer_pending),
        )
        unit.given(self._for(unit, (reads or {}).get(unit)))
        self._holder = unit
        self._changed([previous, unit])

    def _changed(self, units: list[Unit]) -> None:
        """Let the optimizer update the param groups of ``units`` and check them; an error refuses the steps."""
        on_change = self._on_change()
        try:
            if on_change is not None:
                on_change(units)
        except ValueError as err:
            self._error = err


class OutputUnitFinder:
    """Finds the unit that produces the model's output, from a forward pass.

    Registration order does not tell it (a module may define its head before
    its body). At the end of the model's first forward pass with autograd,
    the graph is walked back from the model's output tensors, stopping at the
    outputs of units: the units met are those whose output reaches the model's
    output through no other unit. One unit met is the output unit; several
    (two heads added, several outputs none computed from another) or none
    leave it ambiguous; an output computed from another (the hidden state a
    head reads, also returned) is not walked from. When the
    model's own forward never runs (the caller calls its submodules), the
    last unit to run in the forward pass is taken instead (:meth:`decide_now`).

    The units' outputs come from the recorder (:meth:`note`, called by
    :class:`~locoprop.recording.ForwardRecorder` for every recorded use).
    ``on_decided(units)`` is called once, with the units met, and the hooks
    are removed: after that the finder costs nothing.
    """

    def __init__(self, model: nn.Module, on_decided):
        self._on_decided = on_decided
        self._output_nodes: dict = {}  # grad_fn of a unit output in this model forward -> unit
        self._shapes: dict = {}  # unit -> the shape of its last output
        self._depth = 0
        self.last_run: Unit | None = None
        self.pending = True
        self._handles = [
            model.register_forward_pre_hook(WeakHook(self._enter)),
            model.register_forward_hook(WeakHook(self._leave), always_call=True),
        ]
        remove_when_gone(self, self._handles)

    def _enter(self, module: nn.Module, inputs: tuple) -> None:
        self._depth += 1

    def note(self, unit: Unit | None, output: Tensor, computed: list[Tensor] = ()) -> None:
        """A recorded use of ``unit`` gave ``output`` (None: a map of a unit's weight that no unit records, or,
        with ``computed`` operands, a product that is no unit's map when one is computed from parameters alone)."""
        if not self.pending or output.grad_fn is None:
            return
        if computed and not any(_of_parameters(operand, self._output_nodes) for operand in computed):
            return
        if unit is not None:
            self.last_run = unit
            self._shapes[unit] = tuple(output.shape)
        if self._depth:  # only inside the model's forward: a node keeps its graph alive
            self._output_nodes[output.grad_fn] = unit if unit is not None else _UNRECORDED

    def _leave(self, module: nn.Module, inputs: tuple, output) -> None:
        self._depth -= 1
        if self._depth or not self._output_nodes:
            return
        tensors = {t.grad_fn: t for t in _tensors(output) if t.grad_fn is not None}
        roots = _final(list(tensors), self._output_nodes)
        if roots:
            reached, hidden, unrecorded = _units_reaching(roots, self._output_nodes)
            self._decide(reached, hidden, unrecorded, {unit: self.read(unit, roots, tensors) for unit in reached})
        self._output_nodes.clear()

    def read(self, unit: Unit, roots: list, tensors: dict):
        """The dimension of ``unit``'s output over which the model's outputs show the loss's softmax, from the
        outputs that are ``unit``'s own through views, slices and casts. The loss reads an output's last
        dimension (a language model's classes, after its logits are flattened) or, of three or more, its second
        (``F.cross_entropy``'s classes of a segmentation head's N × C × H × W): one that is the unit's classes
        (its last dimension, a convolution's channels) is read; else the last of an output of one or two
        dimensions, as a whole dimension of the unit's output (a question-answering head's positions, after
        the model splits its two columns); else ``_REGROUPED``: none whole (a multiple-choice head's scores,
        regrouped from its rows), a dimension of one output (over which a softmax is 1, so that the loss's is
        not over it), or an output of three or more dimensions none of which is the classes (a heat map's
        B × H × W, which the loss may read over H, W or both). -1 is the last dimension of a unit other than a
        convolution; None: no output shows ``unit``'s (they are computed from it: pooled, biased)."""
        shape, conv = self._shapes[unit], (unit.kind or "").startswith("conv")
        classes = 1 if conv else len(shape) - 1
        found = set()
        for root in roots:
            view = tensors[root].shape
            if not view:
                continue
            node, last = dimension_through_views(root, view, len(view) - 1, self._output_nodes)
            if self._output_nodes.get(node) is not unit:
                continue
            second = dimension_through_views(root, view, 1, self._output_nodes)[1] if len(view) > 2 else None
            if classes in (last, second):
                found.add(classes)
            else:  # (of three or more dimensions, which the loss reads, the last or the second, is not told)
                found.add(last if last is not None and len(view) < 3 else _REGROUPED)
        if not found:
            found = {None}
        elif classes in found:  # (the logits beside views of them: the classes)
            found = {classes}
        read = found.pop() if len(found) == 1 else _REGROUPED
        if read is not _REGROUPED and shape and shape[classes if read is None else read] == 1:
            return _REGROUPED  # (a softmax over one output is 1: the loss's is over several of the unit's rows)
        return -1 if read == len(shape) - 1 and not conv else read

    def decide_now(self) -> None:
        """Decide from the last unit that ran, if the model's forward never did."""
        if self.pending and self.last_run is not None:
            self._decide([self.last_run], reads={self.last_run: _OWN})

    def _decide(self, units: list[Unit], hidden: bool = False, unrecorded: bool = False,
                reads: dict | None = None) -> None:  # fmt: skip
        self.remove()
        self._on_decided(units, hidden, unrecorded, reads)

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


_UNRECORDED = object()  # the output node of a map of a unit's weight that no unit records


def _final(roots: list, output_nodes: dict) -> list:
    """The output nodes from which no other output is computed, and those that show a unit's own output other
    than an embedding's. Beside its logits a model may return tensors that the logits are computed from (an
    encoder-decoder's ``encoder_last_hidden_state``, the hidden states and attention maps of
    ``output_hidden_states`` and ``output_attentions``, Llama's first hidden state being its embedding's own
    output): those are not where the model's output comes from. Logits returned beside an auxiliary head's
    output computed from them (at the top, or nested as DETR's auxiliary outputs) still are: two units reach the
    outputs, which stays ambiguous. One walk of the graph from the roots' inputs meets every root that another
    root is computed from."""
    if len(roots) < 2:
        return roots
    inside: set = set()
    stack = [next_node for root in roots for next_node, _ in root.next_functions]
    while stack:
        node = stack.pop()
        if node is None or node in inside:
            continue
        inside.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return [root for root in roots if root not in inside or _a_head_shown(root, output_nodes)]


def _a_head_shown(node, output_nodes: dict) -> bool:
    """Whether ``node`` shows the output of a unit that may be a head: any map but an embedding's lookup."""
    unit = output_nodes.get(_shown(node, output_nodes))
    return unit is not None and (unit is _UNRECORDED or unit.kind != "embedding")


def _shown(node, output_nodes: dict):
    """The unit output node that ``node`` is, or shows through views, slices and casts; else None."""
    return dimension_through_views(node, None, None, output_nodes)[0]


def _of_parameters(tensor: Tensor, output_nodes: dict, limit: int = 64) -> bool:
    """Whether ``tensor`` is computed from parameters alone: its graph reaches parameters and no unit's output
    (a weight-normed layer's g·v/‖v‖, MobileBERT's decoder concatenated from two weights), not an activation
    (attention's keys, a hypernetwork's weights). A graph of more than ``limit`` nodes counts as an
    activation's."""
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node in output_nodes or len(seen) >= limit:
            return False
        seen.add(node)
        leaf = getattr(node, "variable", None)  # (AccumulateGrad: a leaf that requires gradients)
        if leaf is not None and not isinstance(leaf, nn.Parameter):
            return False
        stack.extend(next_node for next_node, _ in node.next_functions)
    return bool(seen)


def _units_reaching(roots: list, output_nodes: dict) -> tuple[list[Unit], bool, bool]:
    """The units whose output node is reached from ``roots`` through no other unit's output; whether a
    reentrant activation checkpoint was reached on the way (its block ran without a graph, so the units inside
    it are not among the output nodes); whether the output of a map no unit records was (a weight tied to a
    unit of another kind, such as a head F.linear(h, embedding.weight))."""
    reached: list[Unit] = []
    seen, hidden, unrecorded = set(), False, False
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        unit = output_nodes.get(node)
        hidden = hidden or (unit is None and type(node).__name__ == "CheckpointFunctionBackward")
        if unit is _UNRECORDED:
            unrecorded = True
        elif unit is None:
            stack.extend(next_node for next_node, _ in node.next_functions)
        elif unit not in reached:
            reached.append(unit)
    return reached, hidden, unrecorded
