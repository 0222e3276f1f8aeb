"""Fast local-gradient kernels for linear units (SPEC §10).

The same math as :func:`locoprop.local.divergence_grads`, without autograd:
for a linear unit with rows x (N × d_in), the change of its parameters
Δθ = θ − θ^old = [ΔW | Δb] and the residual r = ∂D/∂Δa (N × d_out) of
Δa = x ΔWᵀ + Δb,

    ∇W = rᵀ x,    ∇b = Σ_rows r

plus the linear term's s·G, fused into the products (s = γ, or 0 on the
ranks that leave it to rank 0: the ranks' parts are summed). Δa comes from
Δθ, never as layer_θ(x) − a^old, so nothing cancels.

Variant S has a cheaper form. Its residual is Δa = x̃Δθᵀ with x̃ = [x, 1],
so with C = x̃ᵀx̃, computed once per step,

    ∇θ = Δθ C + γ·G,

which costs d_out·(d_in+1)² per iteration instead of 4·N·d_in·d_out.
:func:`gram_is_cheaper` picks the form with fewer FLOPs over the K steps.

Units of equal shape (and transfer function) are solved together with
batched matmuls (:func:`divergence_grads` on stacked tensors), one kernel
for the group.

The first local iteration needs no kernel at all: at θ^old, Δθ = 0 and the
local gradient is γ·G, the gradient handed over in ``p.grad``.

**Low precision** (``local_dtype="bfloat16"``). The kernels'
matmuls take operands in bfloat16 (AMX on CPUs, tensor cores on GPUs: about
4× float32's rate): the centred rows x − μ (μ their mean), rounded once a
step, and Δθ = θ − θ^old, rounded each iteration. Each product rounds its
sum once (the kernels accumulate in float32), so it carries a relative
error of about 2⁻⁸ *of itself*: Δa is the change of the output from Δθ,
never the output minus a target, so nothing cancels, and θ = θ^old + Δθ
stays in the parameters' dtype. What μ contributes (Δb + ΔW·μ to Δa,
(Σr)·μᵀ to ∇W; in the Gram form, C's mean part N·μμᵀ) is computed in the
parameters' dtype, as are M's residual f(a^old + Δa) − f(a^old), the sums
Σr and the linear term s·G: centring keeps a large mean of x (pixels,
sigmoid units) out of the rounded products, where it would dominate their
rounding (about 10× the error on pixels). The tests check the step against
the float64 one, M and S, on every path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from locoprop.transfer import Transfer

if TYPE_CHECKING:
    from locoprop.fused import ResidualKernel

__all__ = [
    "LowPrecisionBuffers",
    "LowPrecisionGram",
    "LowPrecisionRows",
    "concat_rows",
    "divergence_grads",
    "gram_covariance",
    "gram_grads",
    "gram_is_cheaper",
    "linear_workspace",
    "low_precision_buffers",
    "low_precision_divergence_grads",
    "low_precision_gram",
    "low_precision_gram_grads",
    "low_precision_rows",
]


def concat_rows(parts: list[Tensor]) -> Tensor:
    """The rows of all recorded uses of a layer, one matrix (no copy for one use)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def linear_workspace(x: Tensor, weight: Tensor, bias: Tensor | None) -> list[Tensor]:
    """Buffers [Δa, ∇W(, ∇b)] for :func:`divergence_grads`, one set per step.

    Reused by every local iteration: freshly allocated outputs would cost
    page faults on every iteration (matmul outputs are large).
    """
    out = [x.new_empty(*x.shape[:-1], weight.shape[-2]), torch.empty_like(weight)]
    return out + ([torch.empty_like(bias)] if bias is not None else [])


def divergence_grads(
    variant: str,
    transfer: Transfer,
    x: Tensor,
    anchor: tuple[Tensor, ...],
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    out: list[Tensor] | None = None,
    linear_term: list[Tensor] | None = None,
    scale: float = 0.0,
    residual_kernel: ResidualKernel | None = None,
) -> list[Tensor]:
    """[∇W, ∇b] of a linear unit's Σ D(Δa) + s·⟨G, Δθ⟩ at Δθ = [ΔW, Δb]; x and the anchor are 2-D rows.

    For G stacked units of one shape, x is G × N × d_in, ΔW G × d_out × d_in, Δb G × d_out and each anchor
    tensor G × N × d_out: one batched matmul for the group. ``out`` (from :func:`linear_workspace`)
    receives the results; the returned gradients are its buffers. ``linear_term`` = [G_W(, G_b)] scaled by
    s = ``scale`` joins the weight gradient's product (no pass of its own). ``residual_kernel``
    (:func:`locoprop.fused.residual_kernel`, M only) adds Δb to the product x·ΔWᵀ and writes M's residual over
    it (``out[0]``) in one pass that also sums its rows.
    """
    delta_a, *grads = out if out is not None else linear_workspace(x, delta_weight, delta_bias)
    fused = variant == "M" and residual_kernel is not None
    if delta_bias is None or fused:  # (the fused residual adds Δb: addmm would first copy it into every row)
        torch.matmul(x, delta_weight.mT, out=delta_a)
    elif x.dim() == 3:
        torch.baddbmm(delta_bias.unsqueeze(1), x, delta_weight.mT, out=delta_a)
    else:
        torch.addmm(delta_bias, x, delta_weight.T, out=delta_a)
    residual_sum = None
    if variant == "S":
        residual = delta_a
    elif fused:
        residual, residual_sum = delta_a, residual_kernel(delta_a, delta_bias, anchor)
    else:
        residual = transfer.change_from(anchor, delta_a)
    if linear_term is None or not scale:
        torch.matmul(residual.mT, x, out=grads[0])
    elif x.dim() == 3:
        torch.baddbmm(linear_term[0], residual.mT, x, beta=scale, out=grads[0])
    else:
        torch.addmm(linear_term[0], residual.T, x, beta=scale, out=grads[0])
    if delta_bias is not None:
        if residual_sum is None:
            torch.sum(residual, -2, out=grads[1])
        else:
            grads[1].copy_(residual_sum)
        if linear_term is not None and scale:
            grads[1].add_(linear_term[1], alpha=scale)
    return grads


def gram_covariance(x: Tensor, has_bias: bool) -> Tensor:
    """C = x̃ᵀx̃ with x̃ = [x, 1], whole (the Gram form multiplies by it), without forming x̃."""
    rows, d_in = x.shape
    covariance = x.new_empty(d_in + int(has_bias), d_in + int(has_bias))
    covariance[:d_in, :d_in].addmm_(x.T, x, beta=0.0)
    if has_bias:
        torch.sum(x, 0, out=covariance[d_in, :d_in])
        covariance[:d_in, d_in] = covariance[d_in, :d_in]
        covariance[d_in, d_in] = rows
    return covariance


def gram_grads(
    covariance: Tensor,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    linear_term: list[Tensor],
    activation_lr: float,
    out: list[Tensor],
) -> list[Tensor]:
    """``out`` ← [∇W, ∇b] of ½Σ‖Δa‖² + γ·⟨G, Δθ⟩ from C: ∇θ = Δθ C + γ·G.

    With Δθ = [ΔW | Δb], written into contiguous buffers without forming Δθ:
    ∇W = ΔW C_xx + Δb ⊗ C_1x + γ·G_W and ∇b = ΔW C_x1 + N·Δb + γ·G_b.
    """
    if delta_bias is None:
        return [torch.addmm(linear_term[0], delta_weight, covariance, beta=activation_lr, out=out[0])]
    d_in = delta_weight.shape[1]
    torch.addr(linear_term[0], delta_bias, covariance[d_in, :d_in], beta=activation_lr, out=out[0])
    out[0].addmm_(delta_weight, covariance[:d_in, :d_in])
    torch.addmv(linear_term[1], delta_weight, covariance[:d_in, d_in], beta=activation_lr, out=out[1])
    out[1].addcmul_(delta_bias, covariance[d_in, d_in])  # + N·Δb, N read on the device
    return out


def gram_is_cheaper(rows: int, d_in: int, d_out: int, local_iters: int, ranks: int = 1) -> bool:
    """Whether the Gram form of the S gradient costs less over K steps.

    Both forms start from γ·G (their first iteration). In one process, by
    FLOPs: the Gram form then costs C once and K − 1 products Δθ C; the batch
    form K − 1 forward and weight-gradient products. On several ``ranks``, by
    the numbers communicated, which cost far more than FLOPs (tens of FLOPs a
    byte over gloo, about a thousand over NCCL): the Gram form sums the lower
    triangle of C once, d(d+1)/2; the batch form sums each later iteration's
    gradient, (K − 1)·d_out·d.
    """
    d = d_in + 1
    if ranks > 1:
        return d * (d + 1) // 2 < (local_iters - 1) * d_out * d
    gram = 2 * rows * d * d + (local_iters - 1) * 2 * d_out * d * d
    batch = (local_iters - 1) * 4 * rows * d_in * d_out
    return gram < batch


class LowPrecisionRows(NamedTuple):
    """A linear unit's rows for the low-precision kernels, once a step: x − μ rounded, and μ."""

    centered: Tensor  # x − μ in the compute dtype (N × d_in, or G × N × d_in stacked)
    mean: Tensor  # μ, the mean of the rows, in the parameters' dtype (d_in, or G × d_in)


def low_precision_rows(x: Tensor, dtype: torch.dtype) -> LowPrecisionRows:
    """x − μ rounded to ``dtype``, with μ = the mean of x's rows (along its last-but-one dimension)."""
    mean = x.mean(-2)
    return LowPrecisionRows((x - mean.unsqueeze(-2)).to(dtype), mean)


class LowPrecisionBuffers(NamedTuple):
    """What the low-precision kernels write each iteration, in the compute dtype (one set per step)."""

    delta_weight: Tensor  # ΔW, rounded
    grad_weight: Tensor  # rᵀ(x − μ)


def low_precision_buffers(rows: LowPrecisionRows, weight: Tensor) -> LowPrecisionBuffers:
    """Buffers for :func:`low_precision_divergence_grads` (``weight``: the shape of ΔW)."""
    delta_weight = torch.empty(weight.shape, dtype=rows.centered.dtype, device=weight.device)
    return LowPrecisionBuffers(delta_weight, torch.empty_like(delta_weight))


def low_precision_divergence_grads(
    variant: str,
    transfer: Transfer,
    rows: LowPrecisionRows,
    anchor: tuple[Tensor, ...],
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    product: Tensor,
    delta_a: Tensor | None,
    buffers: LowPrecisionBuffers,
    out: list[Tensor],
    linear_term: list[Tensor] | None = None,
    scale: float = 0.0,
    residual_kernel: ResidualKernel | None = None,
) -> list[Tensor]:
    """:func:`divergence_grads` with both matmuls in the compute dtype of ``rows``; ``out`` = [∇W(, ∇b)].

    With x = x_c + μ (``rows``: x_c = x − μ rounded, the column means μ) and v = Δb + ΔW·μ (in the parameters'
    dtype), Δa = x_c·ΔWᵀ + v: the product lands in ``product`` (compute dtype, N × d_out, or G × N × d_out
    stacked), Δa in ``delta_a`` (the parameters' dtype). The residual r (Δa, or M's f(a^old + Δa) − f(a^old))
    is rounded into ``product`` for ∇W = rᵀx_c + (Σr)·μᵀ + s·G; ∇b = Σr + s·G_b. Centring x takes its mean
    out of the rounded products, where it would otherwise dominate them (pixels, sigmoid units).
    ``residual_kernel`` (:func:`locoprop.fused.residual_kernel`) takes the product to the rounded r and Σr in
    one pass, without ``delta_a`` (None then).
    """
    mean = rows.mean
    buffers.delta_weight.copy_(delta_weight)
    torch.matmul(rows.centered, buffers.delta_weight.mT, out=product)
    shift = torch.matmul(delta_weight, mean.unsqueeze(-1)).squeeze(-1)
    if delta_bias is not None:
        shift.add_(delta_bias)
    if residual_kernel is not None:
        residual_sum = residual_kernel(product, shift, anchor)
    else:
        # A cast, then a same-dtype add: a mixed-dtype add with broadcasting takes twice as long on the CPU.
        delta_a.copy_(product).add_(shift.unsqueeze(-2))
        residual = delta_a if variant == "S" else transfer.change_from(anchor, delta_a)
        product.copy_(residual)
        residual_sum = residual.sum(-2)
    torch.matmul(product.mT, rows.centered, out=buffers.grad_weight)
    if linear_term is None or not scale:
        out[0].copy_(buffers.grad_weight)
    else:
        out[0].copy_(buffers.grad_weight).add_(linear_term[0], alpha=scale)
    if out[0].dim() == 3:
        out[0].baddbmm_(residual_sum.unsqueeze(-1), mean.unsqueeze(-2))
    else:
        out[0].addr_(residual_sum, mean)
    if delta_bias is not None:
        if linear_term is not None and scale:
            torch.add(residual_sum, linear_term[1], alpha=scale, out=out[1])
        else:
            out[1].copy_(residual_sum)
    return out


class LowPrecisionGram(NamedTuple):
    """The Gram statistics of the low-precision S form, once a step (:func:`low_precision_gram`)."""

    centered: Tensor  # C_c = Σ(x − μ)ᵀ(x − μ), in the compute dtype
    mean: Tensor  # μ (d_in), in the parameters' dtype
    rows: float  # N


def low_precision_gram(covariance: Tensor, dtype: torch.dtype) -> LowPrecisionGram:
    """C_c = C_xx − N·μμᵀ (in ``covariance``'s dtype, then rounded to ``dtype``) from the whole
    C = x̃ᵀx̃ of :func:`gram_covariance` with a bias row (Σx, N)."""
    d_in = covariance.shape[0] - 1
    rows = covariance[d_in, d_in]
    mean = covariance[d_in, :d_in] / rows
    centered = torch.addr(covariance[:d_in, :d_in], mean, mean, alpha=-rows.item())
    return LowPrecisionGram(centered.to(dtype), mean, rows.item())


def low_precision_gram_grads(
    gram: LowPrecisionGram,
    delta_weight: Tensor,
    delta_bias: Tensor | None,
    linear_term: list[Tensor],
    activation_lr: float,
    delta_weight_low: Tensor,
    out: list[Tensor],
) -> list[Tensor]:
    """:func:`gram_grads` with its product in the compute dtype, from the centred statistics: with
    v = ΔW·μ + Δb, ∇W = ΔW·C_c + N·v·μᵀ + γ·G_W and ∇b = N·v + γ·G_b (ΔW rounded into ``delta_weight_low``;
    the rest in the parameters' dtype)."""
    delta_weight_low.copy_(delta_weight)
    product = delta_weight_low @ gram.centered
    shift = torch.mv(delta_weight, gram.mean)
    if delta_bias is not None:
        shift.add_(delta_bias)
    torch.add(product, linear_term[0], alpha=activation_lr, out=out[0])
    out[0].addr_(shift, gram.mean, alpha=gram.rows)
    if delta_bias is not None:
        torch.mul(shift, gram.rows, out=out[1]).add_(linear_term[1], alpha=activation_lr)
    return out
