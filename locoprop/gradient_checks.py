"""Randomised checks that a gradient is the one backprop gave (Freivalds' check).

The fast paths reuse ``p.grad`` as the layer's backprop gradient Gᵀx̃ only
after :func:`backprop_gradient_mismatch` finds it unchanged (three
matrix-vector products instead of one matrix product), and the optimizer
finds uses of a unit's weight that no unit recorded by the same kind of
projection (:class:`locoprop.units.GradientSketch`). Tolerances separate
rounding from a real difference.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "backprop_gradient_mismatch",
    "freivalds_direction",
    "outside_use_tolerance",
    "relative_mismatch",
    "reuse_tolerance",
]


def backprop_gradient_mismatch(grads: list[Tensor | None], x: Tensor, g: Tensor) -> Tensor:
    """How far ``grads`` ([∇W] or [∇W, ∇b], usually ``p.grad``) is from the
    layer's backprop gradient [gᵀx, Σg], relative, on a fixed random direction.

    Freivalds' check: with P = [∇W | ∇b], x̃ = [x, 1] and a random v, compare
    P·v with gᵀ(x̃·v), three matrix-vector products instead of one matrix
    product. A real difference D shows unless ‖D·v‖ is below the tolerance,
    which a random v makes about as unlikely as ‖D‖ being that small. The
    gradient differs from the backprop one when the user changed it after
    ``backward()`` (clipping, added weight decay) or the parameter is also used
    outside the unit. ``inf`` when a gradient is missing.
    """
    if any(grad is None for grad in grads):
        return x.new_tensor(float("inf"))
    d_in = x.shape[1]
    v = freivalds_direction(d_in + 1, x)
    projected_x = torch.mv(x, v[:d_in])
    projected = torch.mv(grads[0], v[:d_in])
    if len(grads) == 2:
        projected_x.add_(v[d_in])
        projected.add_(grads[1] * v[d_in])
    return relative_mismatch(projected, torch.mv(g.T, projected_x))


def freivalds_direction(size: int, like: Tensor) -> Tensor:
    """The fixed random direction v of Freivalds' checks, ``size`` entries in
    ``like``'s dtype and device: seeded by its size, so the check is a pure
    function and the global RNG is left untouched."""
    generator = torch.Generator().manual_seed(size)
    return torch.randn(size, generator=generator, dtype=like.dtype).to(like.device)


def relative_mismatch(projected: Tensor, expected: Tensor) -> Tensor:
    """‖projected − expected‖ / ‖expected‖ of two Freivalds projections; NaN for 0/0
    (which no tolerance accepts as a mismatch, nor as a match)."""
    return (projected - expected).norm() / expected.norm()


def reuse_tolerance(dtype: torch.dtype) -> float:
    """The largest :func:`backprop_gradient_mismatch` that is rounding only:
    1000 ulp (the measured mismatch of equal float32 gradients is ~1e-6),
    for float32 and float64; zero (never reuse) in lower precisions."""
    return 1000 * torch.finfo(dtype).eps if dtype in (torch.float32, torch.float64) else 0.0


def outside_use_tolerance(dtype: torch.dtype) -> float:
    """The largest relative mismatch between a parameter's backward gradient
    and its recorded uses' part of it that is rounding only, for records in
    ``dtype``: :func:`reuse_tolerance` in float32 and float64; in 16-bit
    precisions (a forward under autocast, whose matmul rounds the gradient to
    about eps/2 relative) 10 eps, which rounding never reaches."""
    return reuse_tolerance(dtype) or 10 * torch.finfo(dtype).eps
