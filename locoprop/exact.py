"""The exact S solve (SPEC §2): the closed-form minimiser of ℓ_S for a linear unit.

With x̃ = [x, 1], C = Σ x̃ᵀx̃ and G = [∇W | ∇b] the gradient handed over in
``p.grad`` (unchanged, the layer's backprop gradient, gᵀx̃ summed over the
batch with g = dL/da; see :mod:`locoprop.local` for the form of ℓ_S solved),

    θ_new = θ_old − γ · G (C + λI)⁻¹,

a preconditioned gradient step with the input-covariance (A) factor of
K-FAC. :func:`exact_s_solution` is the readable reference (Cholesky of the
full C); :func:`exact_s_direction` the fast path that the optimizer uses,
which forms only the lower triangle of C that Cholesky reads
(:func:`lower_gram`) and applies (C + λI)⁻¹ with two triangular solves.
The tests check both against the limit of many small iterative steps.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "averaged_covariance",
    "covariance_inverse",
    "exact_s_direction",
    "exact_s_solution",
    "full_covariance",
    "lower_covariance",
    "lower_gram",
    "solve_covariance",
]


def exact_s_solution(
    params: Sequence[Tensor],
    inputs: Sequence[Tensor],
    linear_term: Sequence[Tensor],
    activation_lr: float,
    prox: float,
) -> list[Tensor]:
    """Closed-form minimiser of ℓ_S for a linear layer (SPEC §2).

    With x̃ = [x, 1] over the recorded ``inputs`` and C = Σ x̃ᵀx̃, the
    minimiser is θ_new = θ_old − γ·G (C + λI)⁻¹, where G = [∇W | ∇b] is
    ``linear_term``. It is the input-covariance (A) factor of K-FAC applied
    to the gradient.
    """
    weight = params[0]
    has_bias = len(params) == 2
    covariance = full_covariance(inputs, has_bias, weight)
    grad_x = torch.cat([linear_term[0], linear_term[1][:, None]], dim=1) if has_bias else linear_term[0]
    covariance.diagonal().add_(prox)
    # Solve (C + λI) Δᵀ = Gᵀ; C + λI is symmetric positive definite.
    factor = torch.linalg.cholesky(covariance)
    step = torch.cholesky_solve(grad_x.T, factor).T
    theta = torch.cat([p.detach().reshape(p.shape[0], -1) for p in params], dim=1) - activation_lr * step
    new_weight = theta[:, : weight.shape[1]]
    return [new_weight, theta[:, -1]] if has_bias else [new_weight]


def full_covariance(inputs: Sequence[Tensor], has_bias: bool, weight: Tensor) -> Tensor:
    """C = Σ x̃ᵀx̃ over the recorded ``inputs`` (x̃ = [x, 1] with a bias), all of it: the readable reference."""
    d_in = weight.shape[1] + int(has_bias)
    covariance = weight.new_zeros(d_in, d_in)
    for x in inputs:
        x = x.reshape(-1, x.shape[-1])
        if has_bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        covariance += x.T @ x
    return covariance


# lower_gram: the width of its column blocks (narrower ones run the matmul
# less efficiently) and their largest number (measured on a 2-core CPU).
_GRAM_BLOCK_WIDTH = 128
_GRAM_MAX_BLOCKS = 8


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


def lower_covariance(x: Tensor, has_bias: bool) -> Tensor:
    """C = x̃ᵀx̃ with x̃ = [x, 1], lower triangle only (what Cholesky reads); entries above it are unset.

    The bias entries of C are sums (Σx and N), so x̃ is never formed.
    """
    rows, d_in = x.shape
    d = d_in + int(has_bias)
    covariance = x.new_empty(d, d)
    lower_gram(x, out=covariance[:d_in, :d_in])
    if has_bias:
        torch.sum(x, 0, out=covariance[d_in, :d_in])
        covariance[d_in, d_in] = rows
    return covariance


def solve_covariance(covariance: Tensor, cross: Tensor, prox: float) -> tuple[Tensor, Tensor]:
    """Δ = G (C + λI)⁻¹ from the lower triangle of C, and Cholesky's ``info``.

    With C + λI = L Lᵀ, Δ solves Δ L Lᵀ = G: two triangular solves from
    the right, no transposed copies. ``info`` is nonzero when C + λI did not
    factor (not positive definite in this precision). ``covariance`` is changed
    (λ is added to its diagonal).
    """
    covariance.diagonal().add_(prox)
    factor, info = torch.linalg.cholesky_ex(covariance)
    half = torch.linalg.solve_triangular(factor.mT, cross, upper=True, left=False)
    return torch.linalg.solve_triangular(factor, half, upper=False, left=False), info


def exact_s_direction(x: Tensor, cross: Tensor, prox: float) -> tuple[Tensor, Tensor]:
    """Δ = G (C + λI)⁻¹ (d_out × d_in+1 with a bias) and Cholesky's ``info``.

    The exact S solution is θ_new = θ^old − γ·Δ (SPEC §2), with x̃ = [x, 1],
    C = x̃ᵀx̃ (:func:`lower_covariance`) and ``cross`` = G = [∇W | ∇b] (one
    column more than x when the layer has a bias), solved by
    :func:`solve_covariance`.
    """
    has_bias = cross.shape[1] == x.shape[1] + 1
    return solve_covariance(lower_covariance(x, has_bias), cross, prox)


def averaged_covariance(average: Tensor | None, covariance: Tensor, decay: float) -> Tensor:
    """C̄ ← ρ·C̄ + (1 − ρ)·C on lower triangles, the entries above the diagonal zero; the first C̄
    (``average`` None) is C.

    ``covariance`` (C; what lies above its diagonal is ignored) becomes the result; ``average`` is not changed.
    """
    covariance.tril_()
    if average is not None:
        covariance.mul_(1 - decay).add_(average.to(covariance), alpha=decay)
    return covariance


def covariance_inverse(covariance: Tensor, prox: float) -> tuple[Tensor, Tensor]:
    """(C + λI)⁻¹, all of it, from the lower triangle of C, and Cholesky's ``info``.

    Formed once per refresh of the amortised exact solve, whose steps then
    each apply it as one product Δ = G·(C + λI)⁻¹ (a matmul runs faster than
    the two triangular solves of :func:`solve_covariance`). ``info`` is
    nonzero when C + λI did not factor. ``covariance`` is changed (λ is
    added to its diagonal).
    """
    covariance.diagonal().add_(prox)
    factor, info = torch.linalg.cholesky_ex(covariance)
    # Two triangular solves against I rather than torch.cholesky_inverse: the same result for about twice its
    # FLOPs, but BLAS-3 kernels that hold their speed on a busy machine, where cholesky_inverse was measured
    # 10-30× slower than its best (d = 1001, 2 cores). The copy: a broadcast sends memory as it lies (row-major).
    eye = torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
    return torch.cholesky_solve(eye, factor).contiguous(), info
