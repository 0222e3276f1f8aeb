"""Fast local-gradient kernels for linear units (SPEC §10).

The same math as :func:`locoprop.local.local_grads`, without autograd:
for a linear unit with rows x (N × d_in) and residual δ = ∂ℓ/∂a (N × d_out),

    ∇W = δᵀ x,    ∇b = Σ_rows δ.

Variant S has a cheaper form. Its residual is a − â = x̃θᵀ − â with
x̃ = [x, 1], so with C = x̃ᵀx̃ and B = âᵀx̃, computed once per step,

    ∇θ = θ C − B,

which costs d_out·(d_in+1)² per iteration instead of 2·N·d_in·d_out.
:func:`gram_is_cheaper` picks the form with fewer FLOPs over the K steps.
As â = x̃θ^oldᵀ − γ·g, B = θ^old C − γ·Gᵀx̃, where Gᵀx̃ = [gᵀx, Σg] is the
layer's backprop gradient: the target â is never formed.

Units of equal shape (and transfer function) are solved together with
batched matmuls (:func:`linear_grads` on stacked tensors), one kernel for
the group.

The first local iteration needs no forward matmul: at θ^old the residual is
γ·g exactly (g = ∂L/∂a recorded by backprop), so its gradient is
:func:`backprop_grads`, [γ·gᵀx, γ·Σg]. That is γ times the layer's backprop
gradient, which ``backward()`` already left in ``p.grad``; it is reused when
:func:`backprop_gradient_mismatch` finds ``p.grad`` unchanged, and computed
from the records otherwise (clipped gradients, weights used elsewhere).

The exact S solve (:func:`exact_s_direction`) forms only the lower triangle
of C = x̃ᵀx̃, which is all that Cholesky reads, and applies (C + λI)⁻¹ from
the right with two triangular solves.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from locoprop.transfer import Transfer

__all__ = [
    "backprop_cross",
    "backprop_gradient_mismatch",
    "backprop_grads",
    "concat_rows",
    "exact_s_direction",
    "freivalds_direction",
    "gram_grads",
    "gram_is_cheaper",
    "gram_statistics",
    "linear_grads",
    "linear_workspace",
    "lower_gram",
    "outside_use_tolerance",
    "relative_mismatch",
    "reuse_tolerance",
]

# lower_gram: the width of its column blocks (narrower ones run the matmul
# less efficiently) and their largest number (measured on a 2-core CPU).
_GRAM_BLOCK_WIDTH = 128
_GRAM_MAX_BLOCKS = 8


def concat_rows(parts: list[Tensor]) -> Tensor:
    """The rows of all recorded uses of a layer, one matrix (no copy for one use)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def linear_workspace(x: Tensor, weight: Tensor, bias: Tensor | None) -> list[Tensor]:
    """Buffers [a, ∇W(, ∇b)] for :func:`linear_grads`, one set per step.

    Reused by every local iteration: freshly allocated outputs would cost
    page faults on every iteration (matmul outputs are large).
    """
    out = [x.new_empty(*x.shape[:-1], weight.shape[-2]), torch.empty_like(weight)]
    return out + ([torch.empty_like(bias)] if bias is not None else [])


def linear_grads(
    variant: str,
    transfer: Transfer,
    x: Tensor,
    target: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """[∇W, ∇b] of a linear unit's local objective; x and target are 2-D rows.

    For G stacked units of one shape, x is G × N × d_in, weight G × d_out × d_in
    and bias G × d_out: one batched matmul for the group. ``out`` (from
    :func:`linear_workspace`) receives the results; the returned gradients
    are its buffers.
    """
    a, *grads = out if out is not None else linear_workspace(x, weight, bias)
    if bias is None:
        torch.matmul(x, weight.mT, out=a)
    elif x.dim() == 3:
        torch.baddbmm(bias.unsqueeze(1), x, weight.mT, out=a)
    else:
        torch.addmm(bias, x, weight.T, out=a)
    residual = _residual_in_place(variant, transfer, a, target)
    torch.matmul(residual.mT, x, out=grads[0])
    if bias is not None:
        torch.sum(residual, -2, out=grads[1])
    return grads


def _residual_in_place(variant: str, transfer: Transfer, a: Tensor, target: Tensor) -> Tensor:
    """a − â (S) or f(a) − ŷ (M), written over ``a``, which nothing else holds."""
    if variant == "M":
        a = transfer.fn_(a) if transfer.fn_ is not None else transfer.fn(a)
    return a.sub_(target)


def backprop_cross(x: Tensor, g: Tensor, has_bias: bool) -> Tensor:
    """Gᵀx̃ = [gᵀx | Σg] (d_out × d_in+1 with a bias): the backprop gradient of
    a linear layer as one matrix, without forming x̃."""
    d_in = x.shape[1]
    cross = x.new_empty(g.shape[1], d_in + int(has_bias))
    cross[:, :d_in].addmm_(g.T, x, beta=0.0)
    if has_bias:
        torch.sum(g, 0, out=cross[:, d_in])
    return cross


def gram_statistics(
    x: Tensor, weight: Tensor, bias: Tensor | None, cross: Tensor, activation_lr: float
) -> tuple[Tensor, Tensor]:
    """C = x̃ᵀx̃ and B = âᵀx̃ = θ^old C − γ·Gᵀx̃ for variant S.

    ``weight`` and ``bias`` are θ^old; ``cross`` is Gᵀx̃ (:func:`backprop_cross`).
    """
    rows, d_in = x.shape
    covariance = x.new_empty(d_in + int(bias is not None), d_in + int(bias is not None))
    covariance[:d_in, :d_in].addmm_(x.T, x, beta=0.0)
    if bias is None:
        return covariance, torch.addmm(cross, weight, covariance, beta=-activation_lr)
    torch.sum(x, 0, out=covariance[d_in, :d_in])
    covariance[:d_in, d_in] = covariance[d_in, :d_in]
    covariance[d_in, d_in] = rows
    theta = torch.cat([weight, bias[:, None]], dim=1)
    return covariance, torch.addmm(cross, theta, covariance, beta=-activation_lr)


def gram_grads(
    covariance: Tensor, statistic: Tensor, weight: Tensor, bias: Tensor | None, out: list[Tensor]
) -> list[Tensor]:
    """``out`` ← [∇W, ∇b] of ℓ_S from its statistics C and B: ∇θ = θC − B.

    With θ = [W | b], written into contiguous buffers without forming θ:
    ∇W = W C_xx + b ⊗ C_1x − B_x and ∇b = W C_x1 + N·b − B_1.
    """
    if bias is None:
        return [torch.addmm(statistic, weight, covariance, beta=-1.0, out=out[0])]
    d_in = weight.shape[1]
    torch.addr(statistic[:, :d_in], bias, covariance[d_in, :d_in], beta=-1.0, out=out[0])
    out[0].addmm_(weight, covariance[:d_in, :d_in])
    torch.addmv(statistic[:, d_in], weight, covariance[:d_in, d_in], beta=-1.0, out=out[1])
    out[1].addcmul_(bias, covariance[d_in, d_in])  # + N·b, N read on the device
    return out


def gram_is_cheaper(rows: int, d_in: int, d_out: int, local_iters: int) -> bool:
    """Whether the Gram form of the S gradient costs fewer FLOPs over K steps.

    Both forms start from the backprop gradient (their first iteration). The
    Gram form then costs C and B = θ^old C − γ·Gᵀx̃, and K − 1 products θC;
    the batch form K − 1 forward and weight-gradient products.
    """
    d = d_in + 1
    gram = 2 * rows * d * d + local_iters * 2 * d_out * d * d
    batch = (local_iters - 1) * 4 * rows * d_in * d_out
    return gram < batch


def backprop_grads(x: Tensor, g: Tensor, activation_lr: float, out: list[Tensor]) -> list[Tensor]:
    """``out`` ← [γ·gᵀx, γ·Σg]: a linear unit's local gradient at θ^old, either variant.

    There a − â = f(a) − ŷ = γ·g, so the first local iteration is priced at one
    matmul (this one) instead of two. ``out``: [∇W] or [∇W, ∇b] buffers.
    """
    torch.mm(g.T, x, out=out[0]).mul_(activation_lr)
    if len(out) == 2:
        torch.sum(g, 0, out=out[1]).mul_(activation_lr)
    return out


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


def lower_gram(x: Tensor, out: Tensor) -> Tensor:
    """``out`` ← xᵀx, with only its lower triangle (diagonal included) computed.

    The entries above the diagonal are left unset: Cholesky reads only the
    lower triangle. Computed in b block rows, it costs (b+1)/2b of the full
    product's FLOPs; blocks about 128 columns wide keep the matmuls efficient.
    """
    d = x.shape[1]
    blocks = min(max(round(d / _GRAM_BLOCK_WIDTH), 1), _GRAM_MAX_BLOCKS)
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    for start, stop in itertools.pairwise(edges):
        # beta=0: the unset entries of ``out`` are ignored, even NaN ones.
        out[start:stop, :stop].addmm_(x[:, start:stop].T, x[:, :stop], beta=0.0)
    return out


def exact_s_direction(x: Tensor, cross: Tensor, prox: float) -> tuple[Tensor, Tensor]:
    """Δ = Gᵀx̃ (C + λI)⁻¹ (d_out × d_in+1 with a bias) and Cholesky's ``info``.

    The exact S solution is θ_new = θ^old − γ·Δ (SPEC §2), with x̃ = [x, 1],
    C = x̃ᵀx̃ and ``cross`` = Gᵀx̃ (:func:`backprop_cross`; one column more
    than x when the layer has a bias). The bias entries of C are sums (Σx and
    N), so x̃ is never formed. With C + λI = L Lᵀ, Δ solves Δ L Lᵀ = Gᵀx̃: two
    triangular solves from the right, no transposed copies. ``info`` is
    nonzero when C + λI did not factor (not positive definite in this
    precision).
    """
    rows, d_in = x.shape
    d = cross.shape[1]
    has_bias = d == d_in + 1
    covariance = x.new_empty(d, d)
    lower_gram(x, out=covariance[:d_in, :d_in])
    if has_bias:
        torch.sum(x, 0, out=covariance[d_in, :d_in])
        covariance[d_in, d_in] = rows
    covariance.diagonal().add_(prox)
    factor, info = torch.linalg.cholesky_ex(covariance)
    half = torch.linalg.solve_triangular(factor.mT, cross, upper=True, left=False)
    return torch.linalg.solve_triangular(factor, half, upper=False, left=False), info
