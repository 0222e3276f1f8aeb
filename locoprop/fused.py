"""The residual of the linear kernels in one compiled pass (``compile=True``; SPEC §10).

Each later inner iteration of a linear unit turns its product x·ΔWᵀ and
the shift Δb (in low precision the rounded product x_c·ΔWᵀ of the centred
rows and the shift v = ΔW·μ + Δb; either shift may be absent) into the
residual r (S: Δa; M: f(a^old + Δa) − f(a^old)), rounds r into the
product's buffer for rᵀx and sums its rows for ∇b. Eagerly that is four to
nine elementwise passes per unit and iteration (a cast, the shift, the
transfer's change, the rounding, the sum), each a read and a write of an
N × d_out matrix; compiled, one loop reads the product and the anchors and
writes r over it (and a second sums its rows).

The kernel runs the transfer function's own
:attr:`~locoprop.transfer.Transfer.change` on the same anchor, so it
computes what the eager kernels compute, in the same arithmetic: only the
order of the row sum and the fused products' rounding differ.

What it costs: a compilation of a few seconds per graph, once per process.
A kind of unit (its change function) takes one graph per combination of
dtypes, shift or none, single or stacked units and size class (torch
specialises sizes of one; inductor's row sums differ above 4096 rows); each
call costs about 10 µs more dispatch than an eager pass, so units smaller
than :data:`MIN_ELEMENTS` keep the eager passes. A kind that cannot be
compiled (no C++ compiler on the CPU, a graph break, more than
:data:`MAX_GRAPHS` graphs) computes its residual eagerly from then on, with
one warning per kind.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from locoprop.transfer import Transfer, is_piecewise_linear, transfer_by_name

__all__ = ["MAX_GRAPHS", "MIN_ELEMENTS", "ResidualKernel", "residual_kernel"]

# (values, shift, anchor) -> Σ_rows r in full precision, with r written over ``values`` (rounded to their dtype).
ResidualKernel = Callable[[Tensor, Tensor | None, tuple[Tensor, ...]], Tensor]

# Units with fewer outputs (rows × d_out, all units of a stacked group together) keep the eager passes: below
# it a compiled call's overhead costs more than the passes it saves (tanh on the 2-core CPU: break-even near
# 8k elements in float32 and bfloat16, 1.4× the eager time at 2k, 0.6× at 128k).
MIN_ELEMENTS = 1 << 13

# Graphs one kind may compile in a process (torch.compile's default, 8, is reached by one model's units of a
# kind in float32 and bfloat16 with and without bias, single and stacked, on batches either side of 4096 rows).
MAX_GRAPHS = 64

_Change = Callable[[tuple[Tensor, ...], Tensor], Tensor]


def _residual_of(change: _Change) -> Callable[..., Tensor]:
    def residual(values: Tensor, shift: Tensor | None, *anchor: Tensor) -> Tensor:
        delta = values if shift is None else values.to(shift.dtype) + shift.unsqueeze(-2)
        r = change(anchor, delta)
        # Over the product's buffer, warm from the matmul that wrote it: a fresh output per call took twice as
        # long in the float32 step (page faults of its first writes).
        values.copy_(r)
        return r.sum(-2)

    return residual


@functools.cache
def _compiled(change: _Change) -> Callable[..., Tensor]:
    """The compiled residual pass of one change function: one graph, or an error (``fullgraph``: a break, or
    more than :data:`MAX_GRAPHS` graphs, raises, and :func:`_run` falls back to eager and says so). Its own
    recompilation region, so that the kinds do not share a limit; dynamic shapes, so that one graph serves
    units of every size. Inductor's CPU code may write tanh as exp(2x) − 1 over exp(2x) + 1 (an option), which
    loses small arguments: it is told not to."""
    from torch._inductor import config as inductor_config

    kwargs = {}  # (each where this torch has it)
    parameters = inspect.signature(torch.compile).parameters
    if "isolate_recompiles" in parameters:
        kwargs["isolate_recompiles"] = True
    if "recompile_limit" in parameters:
        kwargs["recompile_limit"] = MAX_GRAPHS
    if hasattr(inductor_config.cpp, "use_decompose_tanh"):
        kwargs["options"] = {"cpp.use_decompose_tanh": False}
    return torch.compile(_residual_of(change), dynamic=True, fullgraph=True, **kwargs)


_FAILED: set[_Change] = set()  # the change functions whose compilation failed: eager from then on


def _run(change: _Change, values: Tensor, shift: Tensor | None, anchor: tuple[Tensor, ...]) -> Tensor:
    if change not in _FAILED:
        try:
            return _compiled(change)(values, shift, *anchor)
        except Exception as error:  # (a real error of the residual recurs in the eager call below)
            _FAILED.add(change)
            first_line = next(iter(str(error).strip().splitlines()), "")
            warnings.warn(f"compile=True: the residual of LocoProp's linear units could not be compiled "
                          f"({type(error).__name__}: {first_line}); computing it eagerly from now on",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
    return _residual_of(change)(values, shift, *anchor)


def residual_kernel(variant: str, transfer: Transfer, low_precision: bool, elements: int) -> ResidualKernel | None:
    """The compiled residual pass of a linear unit with ``transfer`` under ``variant``, or None where it
    saves nothing.

    The kernel takes the product (``values``), the shift v (None: ``values`` is Δa) and the anchor
    (:meth:`~locoprop.transfer.Transfer.anchor_at`), writes r over ``values`` (rounded to their dtype) and
    returns Σ_rows r in full precision (the shift's dtype, or the values'). In ``low_precision`` it folds the cast,
    the shift and the rounding into the change, for every variant (S's residual is Δa: the identity's
    change). In the parameters' own dtype only a change that computes something gains: S's residual and a
    piecewise-linear change (identity, ReLU, leaky ReLU) take one or two passes eagerly, as fast as the
    compiled loop. Softplus and the softmax keep their eager changes: these take ``expm1``, which
    inductor's vectorised CPU code computes as exp(x) − 1, losing the small changes they are written to keep.
    ``elements``: the unit's (or stacked group's) outputs, rows × d_out; below :data:`MIN_ELEMENTS`, None.
    """
    if variant == "S":
        transfer = transfer_by_name("identity")
    piecewise_linear = is_piecewise_linear(transfer)
    if transfer.change is None or not (piecewise_linear or transfer.name in ("tanh", "sigmoid")):
        return None
    if (piecewise_linear and not low_precision) or elements < MIN_ELEMENTS:
        return None
    change = transfer.change

    def kernel(values: Tensor, shift: Tensor | None, anchor: tuple[Tensor, ...]) -> Tensor:
        return _run(change, values, shift, anchor)

    return kernel
