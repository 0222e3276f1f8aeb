"""Fast local-gradient kernels for linear units (SPEC §10).

The same math as :func:`locoprop.local.local_grads`, without autograd:
for a linear unit with rows x (N × d_in) and residual δ = ∂ℓ/∂a (N × d_out),

    ∇W = δᵀ x,    ∇b = Σ_rows δ.

Variant S has a cheaper form. Its residual is a − â = x̃θᵀ − â with
x̃ = [x, 1], so with C = x̃ᵀx̃ and B = âᵀx̃, computed once per step,

    ∇θ = θ C − B,

which costs d_out·(d_in+1)² per iteration instead of 2·N·d_in·d_out.
:func:`gram_is_cheaper` picks the form with fewer FLOPs over the K steps.

Units of equal shape (and transfer function) are solved together with
batched matmuls (:func:`batched_linear_grads`), one kernel for the group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from locoprop.transfer import Transfer

__all__ = [
    "batched_linear_grads",
    "gram_grads",
    "gram_is_cheaper",
    "gram_statistics",
    "linear_grads",
]


def linear_grads(
    variant: str, transfer: Transfer, x: Tensor, target: Tensor, weight: Tensor, bias: Tensor | None
) -> list[Tensor]:
    """[∇W, ∇b] of a linear unit's local objective; x and target are 2-D rows."""
    a = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    residual = _residual_in_place(variant, transfer, a, target)
    grads = [residual.T @ x]
    if bias is not None:
        grads.append(residual.sum(0))
    return grads


def _residual_in_place(variant: str, transfer: Transfer, a: Tensor, target: Tensor) -> Tensor:
    """a − â (S) or f(a) − ŷ (M), written over ``a``, which nothing else holds."""
    if variant == "M":
        a = transfer.fn_(a) if transfer.fn_ is not None else transfer.fn(a)
    return a.sub_(target)


def gram_statistics(x: Tensor, target: Tensor, has_bias: bool) -> tuple[Tensor, Tensor]:
    """C = x̃ᵀx̃ and B = âᵀx̃ for variant S (x̃ = [x, 1] when the unit has a bias)."""
    if has_bias:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    return x.T @ x, target.T @ x


def gram_grads(covariance: Tensor, cross: Tensor, weight: Tensor, bias: Tensor | None) -> list[Tensor]:
    """[∇W, ∇b] of ℓ_S from its sufficient statistics: ∇θ = θC − B."""
    if bias is None:
        return [torch.addmm(cross, weight, covariance, alpha=1.0, beta=-1.0)]
    d_in = weight.shape[1]
    # θC − B with θ = [W | b], without materialising θ: two fused kernels
    # (b ⊗ C_bias − B, then + W C_x) instead of four elementwise passes.
    grad = torch.addmm(torch.addr(cross, bias, covariance[d_in], beta=-1.0), weight, covariance[:d_in])
    return [grad[:, :d_in], grad[:, d_in]]


def gram_is_cheaper(rows: int, d_in: int, d_out: int, local_iters: int) -> bool:
    """Whether the Gram form of the S gradient costs fewer FLOPs over K steps."""
    d = d_in + 1
    gram = 2 * rows * d * (d + d_out) + local_iters * 2 * d_out * d * d
    batch = local_iters * 4 * rows * d_in * d_out
    return gram < batch


def batched_linear_grads(
    variant: str, transfer: Transfer, x: Tensor, target: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """∇W (G × d_out × d_in) and ∇b (G × d_out) for G stacked units of one shape."""
    if bias is not None:
        a = torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))
    else:
        a = torch.bmm(x, weight.transpose(1, 2))
    residual = _residual_in_place(variant, transfer, a, target)
    grad_weight = torch.bmm(residual.transpose(1, 2), x)
    return grad_weight, (residual.sum(1) if bias is not None else None)
