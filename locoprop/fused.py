"""The residual of the linear kernels in one compiled pass (``compile=True``; SPEC §10).

Each later inner iteration of a linear unit turns its product Δa (or, in
low precision, the rounded product x_c·ΔWᵀ and the shift v = ΔW·μ + Δb)
into the residual r (S: Δa; M: f(a^old + Δa) − f(a^old)), rounds r into the
product's buffer for rᵀx and sums its rows for ∇b. Eagerly that is four to
nine elementwise passes per unit and iteration (a cast, the shift, the
transfer's change, the rounding, the sum), each a read and a write of an
N × d_out matrix; compiled, it is one loop that reads the product and the
anchors once and writes r once (and a second that sums its rows).

The kernel runs the transfer function's own
:attr:`~locoprop.transfer.Transfer.change` on the same anchor, so it
computes what the eager kernels compute, in the same arithmetic: only the
order of the row sum and the fused products' rounding differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from locoprop.transfer import Transfer, is_piecewise_linear, transfer_by_name

__all__ = ["ResidualKernel", "residual_kernel"]

# (values, shift, anchor) -> (r in the values' dtype, Σ_rows r in full precision).
ResidualKernel = Callable[[Tensor, Tensor | None, tuple[Tensor, ...]], tuple[Tensor, Tensor]]


@functools.cache
def _compiled(change: Callable[[tuple[Tensor, ...], Tensor], Tensor]) -> Callable[..., tuple[Tensor, Tensor]]:
    """The compiled residual pass of one change function. Its own recompilation region, so that the kinds of
    unit (and their shapes, dtypes and numbers of dimensions) do not share torch.compile's limit on
    recompilations of one function; dynamic shapes, so that one graph serves every unit of a kind."""

    def residual(values: Tensor, shift: Tensor | None, *anchor: Tensor) -> tuple[Tensor, Tensor]:
        delta = values if shift is None else values.to(shift.dtype) + shift.unsqueeze(-2)
        r = change(anchor, delta)
        # (Fresh outputs: written into kept buffers instead, the pass took longer on the CPU.)
        return r.to(values.dtype), r.sum(-2)

    return torch.compile(residual, dynamic=True, fullgraph=True, isolate_recompiles=True)


def residual_kernel(variant: str, transfer: Transfer, low_precision: bool) -> ResidualKernel | None:
    """The compiled residual pass of a linear unit with ``transfer`` under ``variant``, or None where it
    saves nothing.

    The kernel takes the product (``values``), the shift v (None when ``values`` is Δa already) and the
    anchor (:meth:`~locoprop.transfer.Transfer.anchor_at`), and returns r rounded to the values' dtype and
    Σ_rows r in full precision (the shift's dtype, or the values'). In ``low_precision`` it folds the cast,
    the shift and the rounding into the change, for every variant (S's residual is Δa: the identity's
    change). In the parameters' own dtype only a change that computes something gains: S's residual and a
    piecewise-linear change (identity, ReLU, leaky ReLU) take one or two passes eagerly, as fast as the
    compiled loop. Softplus and the softmax keep their eager changes: these take ``expm1``, which
    inductor's vectorised CPU code computes as exp(x) − 1, losing the small changes they are written to keep
    (and inductor failed to compile the softmax's).
    """
    if variant == "S":
        transfer = transfer_by_name("identity")
    piecewise_linear = is_piecewise_linear(transfer)
    if transfer.change is None or not (piecewise_linear or transfer.name in ("tanh", "sigmoid")):
        return None
    if piecewise_linear and not low_precision:
        return None
    compiled = _compiled(transfer.change)

    def kernel(values: Tensor, shift: Tensor | None, anchor: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        return compiled(values, shift, *anchor)

    return kernel
