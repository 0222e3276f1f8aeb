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
:func:`locoprop.gradient_checks.backprop_gradient_mismatch` finds ``p.grad``
unchanged, and computed from the records otherwise (clipped gradients,
weights used elsewhere).
"""

from __future__ import annotations

import torch
from torch import Tensor

from locoprop.transfer import Transfer

__all__ = [
    "backprop_cross",
    "backprop_grads",
    "concat_rows",
    "gram_covariance",
    "gram_grads",
    "gram_is_cheaper",
    "gram_statistic",
    "gram_statistics",
    "linear_grads",
    "linear_workspace",
]


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
    covariance = gram_covariance(x, bias is not None)
    return covariance, gram_statistic(covariance, weight, bias, cross, activation_lr)


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


def gram_statistic(
    covariance: Tensor, weight: Tensor, bias: Tensor | None, cross: Tensor, activation_lr: float
) -> Tensor:
    """B = θ^old C − γ·Gᵀx̃, from C and ``cross`` = Gᵀx̃ (of one rank, or summed over ranks)."""
    theta = weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)
    return torch.addmm(cross, theta, covariance, beta=-activation_lr)


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


def gram_is_cheaper(rows: int, d_in: int, d_out: int, local_iters: int, ranks: int = 1) -> bool:
    """Whether the Gram form of the S gradient costs less over K steps.

    In one process, by FLOPs: both forms start from the backprop gradient
    (their first iteration); the Gram form then costs C and
    B = θ^old C − γ·Gᵀx̃, and K − 1 products θC; the batch form K − 1 forward
    and weight-gradient products. On several ``ranks``, by the numbers
    communicated, which cost far more than FLOPs (tens of FLOPs a byte over
    gloo, about a thousand over NCCL): the Gram form sums the lower triangle
    of C and Gᵀx̃ once, d(d+1)/2 + d_out·d; the batch form sums every
    iteration's gradient, K·d_out·d.
    """
    d = d_in + 1
    if ranks > 1:
        return d * (d + 1) // 2 + d_out * d < local_iters * d_out * d
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
