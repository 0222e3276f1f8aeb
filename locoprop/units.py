"""Units: a weight used in a linear map, its bias, and the transfer function that follows (SPEC §2).

A unit is found where a trainable weight is: every parameter with two or
more dimensions (an ``nn.Linear``, ``nn.Conv1d/2d/3d``,
``nn.ConvTranspose1d/2d/3d``, ``nn.Embedding``, Hugging Face's ``Conv1D``,
``nn.MultiheadAttention``'s packed ``in_proj_weight``, a mixture of
experts' stacked ``gate_up_proj``, any module's own matrix), with its
``bias``/``*_bias`` partner. Which uses are linear maps, and what kind
(``F.linear``, ``addmm``, a (transposed) convolution, an embedding), the
forward pass shows (:mod:`locoprop.recording`): a candidate never used in
a linear map takes plain inner steps, like the parameters outside units.
The transfer function is first guessed from an ``nn.Sequential`` (the
activation module after the layer) and then read from the first forward
pass: the elementwise activation that is the unit output's only consumer,
or the identity. The LocoProp math (``locoprop.local``) never looks at
module types.

Normalisation parameters (LayerNorm, BatchNorm, RMSNorm) are one-dimensional
and stay outside the units: their local problem would be elementwise, and
their share of a model's parameters is small (:meth:`LocoPropOptimizer.describe`
says how small).
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Sequence

from torch import Tensor, nn

from locoprop.layers import Block, BlockAdapter, LayerAdapter
from locoprop.recording import UseRecord
from locoprop.transfer import Transfer, is_activation_module, transfer_by_name, transfer_from_module

__all__ = ["Unit", "discover_units"]

# The kind of linear map a module's weight is used in, where the module type tells.
_KINDS = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
          nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
          nn.ConvTranspose3d: "conv_transpose3d", nn.Embedding: "embedding",
          nn.MultiheadAttention: "linear"}  # fmt: skip


def _kind_of(module: nn.Module | None) -> str | None:
    """The kind of map of ``module``'s class or of the torch class it derives from (Hugging Face's
    BartScaledWordEmbedding is an nn.Embedding: its weight read by F.linear is a tied head's, not its own)."""
    for cls in type(module).__mro__ if module is not None else ():
        if cls in _KINDS:
            return _KINDS[cls]
    return None


@dataclasses.dataclass(eq=False)
class Unit:
    """A weight in a linear map, its bias and its transfer function f (LocoProp's unit, SPEC §2).

    Attributes:
        name: the unit's name: its module's qualified name (``"encoder.0"``),
            or ``module.prefix`` for a ``prefix_weight`` (``"attn.in_proj"``).
        weight, bias: its parameters (bias None when it has none).
        module: the module that holds the weight.
        transfer: the transfer function f applied to the map's output.
        transfer_pending: f is still to be read from a forward pass (it was
            not given by ``units=`` or ``output_activation``).
        adapter: the map, from the first recorded use (None until then).
        uses_bias: whether that map adds the bias.
        records: the recorded uses that the backward pass reached since the last step.
    """

    name: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    module: nn.Module | None
    transfer: Transfer
    transfer_pending: bool = False
    adapter: LayerAdapter | None = None
    uses_bias: bool = False
    records: list[UseRecord] = dataclasses.field(default_factory=list)
    seen: bool = False
    # Weak references to the records whose backward passes had reached weight.grad when it last received one.
    accumulated: list = dataclasses.field(default_factory=list, repr=False)
    # A bias frozen when the unit was found stays part of the map (a constant shift of a), not of θ.
    bias_frozen: bool = dataclasses.field(init=False)
    # A softmax read through views of outputs with dimensions of one (a first batch of one, or of one token):
    # per number of dimensions of the outputs it was read from, those of size one. An output larger there has the
    # transfer read again, since the views may group its elements otherwise (squeeze() of B × 1 × 1 scores reads
    # the batch). None: nothing to read again.
    read_at_ones: dict | None = None

    def __post_init__(self) -> None:
        self.bias_frozen = self.bias is not None and not self.bias.requires_grad

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters of the map θ: weight, then bias if the map adds it (or before any use, if any) and it
        was trainable when the unit was found."""
        if (self.adapter is not None and not self.uses_bias) or self.bias is None or self.bias_frozen:
            return [self.weight]
        return [self.weight, self.bias]

    @property
    def kind(self) -> str | None:
        """The kind of map (``"linear"``, ``"matmul"``, ``"conv2d"``, ``"embedding"``, …) once seen."""
        if self.adapter is not None:
            return self.adapter.kind
        return _kind_of(self.module)

    @property
    def trainable(self) -> bool:
        return self.weight.requires_grad

    def expects(self, kind: str) -> bool:
        """Whether a first use of this ``kind`` can be this unit's map (an nn.Embedding's weight read by
        F.linear, as a tied output layer does, belongs to that layer's unit instead)."""
        expected = _kind_of(self.module)
        if expected is None and type(self.module).__name__ == "Conv1D":
            expected = "matmul"  # Hugging Face's Conv1D: torch.addmm(b, x, W)
        # (W @ x is an nn.Linear's map on the transposed input: Mamba's dt_proj; an Einstein sum may write any)
        if expected is None or kind in (expected, "einsum") or (expected, kind) == ("linear", "left_matmul"):
            return True
        # A subclass's forward may use its weight its own way (x @ W), but only an embedding's looks rows up.
        return type(self.module) not in _KINDS and "embedding" not in (expected, kind)

    def same_map(self, adapter: LayerAdapter) -> bool:
        """Whether ``adapter`` is this unit's map (a convolution with other strides is not)."""
        return vars(adapter).get("_options") == vars(self.adapter).get("_options")

    def discovered(self, transfer: Transfer | None, shapes: Sequence[tuple] = ()) -> None:
        """The transfer function read from a forward pass (None: identity), from outputs of ``shapes``."""
        self.transfer = transfer if transfer is not None else transfer_by_name("identity")
        self.transfer_pending = False
        ones: dict = {}
        for shape in shapes:  # (per number of dimensions, those of size one in every output that has as many)
            seen = {d for d, size in enumerate(shape) if size == 1}
            ones[len(shape)] = ones.get(len(shape), seen) & seen
        ones = {ndim: tuple(sorted(dims)) for ndim, dims in ones.items() if dims}
        self.read_at_ones = ones if ones and self.transfer.name.startswith("softmax") else None

    def given(self, transfer: Transfer) -> None:
        """The transfer function given (``output_activation``'s): not to be read, now or again."""
        self.transfer, self.transfer_pending, self.read_at_ones = transfer, False, None

    def read_again_for(self, output: Tensor) -> bool:
        """Whether ``output`` calls for the transfer function to be read again (see ``read_at_ones``): then the
        transfer is pending until the end of this forward. (An output of another number of dimensions than those
        it was read from, a use the reading did not follow, does not.)"""
        ones = self.read_at_ones.get(output.dim(), ())
        if all(output.shape[d] == 1 for d in ones):
            return False
        self.read_at_ones, self.transfer_pending = None, True
        return True

    def gradient_arriving(self, grad: Tensor) -> None:
        """The weight's gradient hook: a backward pass is about to add ``grad`` to ``weight.grad``.

        ``weight.grad`` None although earlier backward passes reached this unit means the gradients were
        cleared since without a step (``model.zero_grad()``, ``p.grad = None``: a batch skipped on a loss
        spike): those passes' records are dropped, so that the step solves the problems of the gradient it
        is handed, not of batches the user threw away. Passes that accumulate into ``.grad`` keep theirs.
        """
        if self.weight.grad is None and self.accumulated:
            stale = {id(record) for record in (ref() for ref in self.accumulated) if record is not None}
            self.records[:] = [record for record in self.records if id(record) not in stale]
        self.accumulated = [weakref.ref(record) for record in self.records]

    def backpropagated_records(self) -> list[UseRecord]:
        return [r for r in self.records if r.backpropagated]

    def check_record(self, record: UseRecord) -> None:
        """Refuse a record whose input, or whose overwritten output, cannot be restored as the forward pass
        saw it."""
        if record.x._version != record.versions[0]:
            raise RuntimeError(
                f"The input of unit {self.name!r} was modified in place after its forward pass; its local problem "
                "needs the input as the layer saw it. Make the operation that changed it out of place "
                "(for example inplace=False), or run it after opt.step()"
            )
        if record.a._version != record.versions[1] and self.param_versions() != record.versions[2:]:
            raise RuntimeError(
                f"The output of unit {self.name!r} was modified in place (an in-place operation such as "
                "nn.ReLU(inplace=True)) and its parameters changed after the forward pass, so its pre-activation "
                "cannot be recomputed; leave the parameters unchanged until opt.step(), or make the in-place "
                "operation out of place"
            )

    def output(self, record: UseRecord) -> Tensor:
        """The output a of a recorded use (the unit's pre-activation), in the parameters' dtype; recomputed
        from its input only when an in-place operation overwrote it.

        Under autocast the recorded a is the lower-precision output that the forward pass went on with: that
        is a^old of the network that produced the loss, so it is cast up, not recomputed (a float32 matmul
        per use, about 5% of a bf16 LocoProp-M step). Only the point where M's divergence is anchored moves,
        by bf16 rounding; the local gradient at θ^old stays γ·G exactly."""
        weight, bias = self.weight.detach(), self.bias.detach() if self.uses_bias else None
        if record.a._version == record.versions[1]:
            return record.a.to(weight.dtype)
        x = record.x if not record.x.is_floating_point() else record.x.to(weight.dtype)
        return self.map_of(record.block).forward(x, weight, bias)

    def map_of(self, block: Block | None) -> LayerAdapter:
        """The map of a use that took ``block`` of the weight (:attr:`UseRecord.block`; None: the whole weight,
        the unit's ``adapter``)."""
        return self.adapter if block is None else BlockAdapter(self.adapter, block)

    def by_group(self, record: UseRecord) -> list[UseRecord]:
        """A grouped matmul's use as one use per group of rows and the matrix it went through (matrix g of the
        weight for rows offsets[g−1]:offsets[g]); any other use as it is."""
        if record.offsets is None:
            return [record]
        ends = record.offsets.tolist()
        rows = self.weight.shape[1]  # (each matrix whole: the rows of E × d_out × d_in or of E × d_in × d_out)
        bias = record.block is None or record.block.bias
        return [UseRecord(x=record.x[start:end], a=record.a[start:end], versions=record.versions,
                          backpropagated=record.backpropagated, block=Block((group,), 0, rows, bias))
                for group, (start, end) in enumerate(zip([0, *ends[:-1]], ends)) if end > start]  # fmt: skip

    def param_versions(self) -> tuple[int, ...]:
        """The version counters of the weight and the bias (whether or not the map adds it)."""
        return tuple(p._version for p in (self.weight, self.bias) if p is not None)

    def __repr__(self) -> str:
        return f"Unit({self.name!r}, {self.kind}, transfer={self.transfer.name!r})"


def _following_transfer(model: nn.Module) -> dict[nn.Module, Transfer]:
    """Transfer of every layer directly followed by an activation in a Sequential."""
    found: dict[nn.Module, Transfer] = {}
    for container in model.modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.children())
        for layer, following in itertools.pairwise(children):
            if is_activation_module(following):
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
    if units is not None:
        return _listed_units(model, units)
    following = _following_transfer(model)
    identity = transfer_by_name("identity")
    found = [
        Unit(name=name, weight=weight, bias=bias, module=module, transfer=following.get(module, identity),
             transfer_pending=True)
        for module_name, module in model.named_modules()
        for name, weight, bias in _weights(module_name, module)
    ]  # fmt: skip
    if not found:
        raise ValueError(
            "The model has no trainable weight to use as a unit (a parameter of two or more dimensions, used in a "
            f"linear map): {type(model).__name__}"
        )
    return found


def _weights(module_name: str, module: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter | None]]:
    """(unit name, weight, bias) of each candidate weight that ``module`` itself holds: every parameter of two
    or more dimensions, with its bias partner (``weight``: ``bias``, ``q_weight``: ``q_bias``, any other
    ``name``: ``name_bias``).

    A frozen weight leaves the candidate out (a trainable bias of it is
    updated on its ordinary gradient); a frozen bias is a constant of its
    weight's map.
    """
    own = dict(module.named_parameters(recurse=False))
    found = []
    for name, weight in own.items():
        stem = name[: -len("_bias")] if name.endswith("_bias") else None
        if weight.dim() < 2 or not weight.requires_grad or (stem is not None and {stem, f"{stem}_weight"} & own.keys()):
            continue  # (a stacked bias, E × d_out, is its weight's partner: W and W_bias, or q_weight and q_bias)
        if name == "weight" or name.endswith("_weight"):
            prefix = name[: -len("weight")].rstrip("_")
            bias = own.get(f"{prefix}_bias" if prefix else "bias")
        else:  # (a mixture of experts' stacked gate_up_proj, a hand-written layer's W)
            prefix, bias = name, own.get(f"{name}_bias")
        if bias is not None and not _bias_of(bias, weight, module):
            bias = None
        base = module_name or type(module).__name__
        found.append((f"{base}.{prefix}" if prefix else base, weight, bias))
    return found


def _bias_of(bias: nn.Parameter, weight: nn.Parameter, module: nn.Module) -> bool:
    """Whether ``bias`` fits the outputs of ``weight``'s maps: one entry per output (d_out × d_in, d_in × d_out,
    a convolution's d_out × …, a transposed convolution's d_in × d_out/groups × …), or one row per matrix of a
    stacked weight (E × d_out for E × d_out × d_in or E × d_in × d_out)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return bias.dim() == 1 and bias.numel() == weight.shape[1] * module.groups
    if bias.dim() == 1:
        return bias.numel() in (weight.shape[0], weight.shape[-1])
    stacked = weight.dim() == 3 and bias.dim() == 2 and bias.shape[0] == weight.shape[0]
    return stacked and bias.shape[1] in weight.shape[1:]


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
        name = names[layer] or type(layer).__name__
        weight = dict(layer.named_parameters(recurse=False)).get("weight")
        if weight is None or weight.dim() < 2:
            raise ValueError(
                f"Unit {name!r} is a {type(layer).__name__}, which holds no 'weight' of two or more dimensions; a "
                "unit is a layer whose weight is used in a linear map (nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, "
                "Hugging Face's Conv1D, …)"
            )
        bias = dict(layer.named_parameters(recurse=False)).get("bias")
        found.append(Unit(name=name, weight=weight, bias=bias, module=layer, transfer=_as_transfer(spec, name)))
    seen = [unit.module for unit in found]
    duplicates = {names[m] for m in seen if seen.count(m) > 1}
    if duplicates:
        raise ValueError(f"Units listed more than once: {sorted(duplicates)}")
    frozen = [unit.name for unit in found if not unit.trainable]
    if frozen:
        raise ValueError(f"Units with a frozen weight (requires_grad=False): {frozen}")
    return found
