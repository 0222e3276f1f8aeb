"""Which dimension of a unit's output a dimension of a view of it is.

A softmax is a unit's transfer function only over a whole dimension of the
unit's output: the model may view that output (flatten it, split it, select
from it, transpose it) before the softmax reads it, inside the forward (a
softmax per attention head, attention pooling's squeezed scores) or in the
loss (a question-answering head's start and end logits). The views' backward
nodes, which autograd keeps from the forward pass, tell which dimension of
the unit's output a dimension of the view is: :func:`dimension_through_views`
follows them, one map per kind of view node, down to the unit's output.
"""

from __future__ import annotations

import math

import torch

__all__ = ["dimension_through_views"]


def dimension_through_views(node, shape, dim: int | None, output_nodes) -> tuple:
    """Follow ``node`` back through views, slices and casts to a unit's output node: (that node, the dimension
    of the unit's output that ``dim`` of ``node``'s tensor (of ``shape``) is, or None when it is no whole
    dimension of it: merged with others, split, sliced, broadcast or new). (None, None) when ``node`` is
    computed by more than views. ``dim`` None follows the node only."""
    shape = list(shape) if shape is not None else None
    while node is not None and node not in output_nodes:
        step = _THROUGH.get(type(node).__name__.rstrip("0123456789").removesuffix("Backward"))
        if step is None:
            return None, None
        if dim is not None:
            shape, dim = step(node, shape, dim)
        node = node.next_functions[0][0] if node.next_functions else None
    return node, dim


# How a view's backward node maps a dimension of its output (of ``shape``) to one of its input: (the input's
# shape, the dimension or None). Torch saves negative dimensions as unsigned 64-bit integers.
def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def _same(node, shape, dim):
    return shape, dim


def _view(node, shape, dim):
    """A reshape keeps a dimension whole when the input has one of its size with as many elements after it, and
    some dimension on each side of it where the output has a dimension of one beside it. (A batch of one: the
    (1·C) × 1 scores of a multiple-choice head viewed as 1 × C have C elements in a row either way, but the
    view regroups the rows of any larger batch: the output's dimension of one, with nothing before C in the
    input, is the batch merged into C. Logits of B·1 tokens viewed as B × 1 × V keep V: B stands before it.)"""
    sizes = list(node._saved_self_sym_sizes)
    if None in shape:
        return sizes, None
    after = math.prod(shape[dim + 1 :])

    def merged_beside(j: int, side: int) -> bool:
        return 0 <= dim + side < len(shape) and shape[dim + side] == 1 and not 0 <= j + side < len(sizes)

    found = [
        j
        for j, size in enumerate(sizes)
        if size == shape[dim] and math.prod(sizes[j + 1 :]) == after and not any(merged_beside(j, s) for s in (-1, 1))
    ]  # fmt: skip
    return sizes, found[0] if found else None


def _transpose(node, shape, dim):
    first, second = _signed(node._saved_dim0) % len(shape), _signed(node._saved_dim1) % len(shape)
    sizes = list(shape)
    sizes[first], sizes[second] = shape[second], shape[first]
    return sizes, second if dim == first else first if dim == second else dim


def _t(node, shape, dim):
    """``Tensor.t()``: a matrix's two dimensions swapped (a vector's one kept)."""
    return shape[::-1], len(shape) - 1 - dim


def _permute(node, shape, dim):
    order = [_signed(d) % len(shape) for d in node._saved_dims]  # the output's dimension k is the input's order[k]
    sizes = [None] * len(shape)
    for k, j in enumerate(order):
        sizes[j] = shape[k]
    return sizes, order[dim]


def _squeeze(node, shape, dim):
    sizes = list(node._saved_self_sym_sizes)
    saved = getattr(node, "_saved_dim", None)  # (squeeze() saves none, squeeze(d) one, squeeze((d, ...)) several)
    named = range(len(sizes)) if saved is None else saved if isinstance(saved, tuple) else (saved,)
    gone = {_signed(d) % len(sizes) for d in named} if sizes else set()
    kept = [j for j in range(len(sizes)) if not (j in gone and sizes[j] == 1)]
    return sizes, kept[dim]


def _unsqueeze(node, shape, dim):
    new = _signed(node._saved_dim) % len(shape)
    return shape[:new] + shape[new + 1 :], None if dim == new else dim - (dim > new)


def _select(node, shape, dim):
    """Select and unbind: the input has one dimension more, at the one they take apart."""
    taken = _signed(node._saved_dim) % (len(shape) + 1)
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    sizes = list(sizes) if sizes is not None else [*shape[:taken], None, *shape[taken:]]
    return sizes, dim + (dim >= taken)


def _slice(node, shape, dim):
    """Slice, narrow, split and chunk: the sliced dimension is whole only when the slice is all of it."""
    sizes = list(node._saved_self_sym_sizes)
    sliced = _signed(node._saved_dim) % len(sizes)
    return sizes, None if dim == sliced and shape[dim] != sizes[sliced] else dim


def _expand(node, shape, dim):
    sizes = list(node._saved_self_sym_sizes)
    j = dim - (len(shape) - len(sizes))
    return sizes, j if j >= 0 and sizes[j] == shape[dim] else None


def _index(node, shape, dim):
    """Advanced indexing keeps the dimensions it does not index, in order, and puts the result of the indexed
    ones in their place when they are adjacent, first when they are apart. A boolean mask indexes as many
    dimensions as it has."""
    sizes, indices = list(node._saved_self_sym_sizes), node._saved_indices
    spans = [index.dim() if index is not None and index.dtype in (torch.bool, torch.uint8) else 1 for index in indices]
    starts = [sum(spans[:k]) for k in range(len(indices))]
    kept = [starts[k] for k, index in enumerate(indices) if index is None] + list(range(sum(spans), len(sizes)))
    indexed = [k for k, index in enumerate(indices) if index is not None]
    adjacent = all(indices[k] is not None for k in range(indexed[0], indexed[-1] + 1)) if indexed else True
    result = len(shape) - len(kept)  # (the indexed dimensions' result, of the indices' broadcast shape)
    first = starts[indexed[0]] if indexed and adjacent else 0
    if first <= dim < first + result:
        return sizes, None
    return sizes, kept[dim if dim < first else dim - result]


_THROUGH = {
    **dict.fromkeys(("Clone", "ToCopy", "Alias"), _same),
    **dict.fromkeys(("View", "UnsafeView", "ReshapeAlias"), _view),
    "Transpose": _transpose,
    "T": _t,
    "Permute": _permute,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    **dict.fromkeys(("Select", "Unbind"), _select),
    **dict.fromkeys(("Slice", "Split", "SplitWithSizes"), _slice),
    "Expand": _expand,
    "Index": _index,
}
