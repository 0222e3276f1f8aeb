"""The local problem of one unit, as pure functions.

Notation (SPEC §2): x is the unit's input, a = layer_θ(x) its pre-activation,
y = f(a) its post-activation, g = dL/da the backprop gradient and
γ = ``activation_lr``. SPEC §2 writes the targets

    S:  â = a − γ·g          (pre-activation target)
    M:  ŷ = f(a) − γ·g       (post-activation target)

and the local objectives, summed over the batch, with θ^old the parameters
at the start of the step and λ = ``prox``::

    S:  ℓ_S(θ) = ½ Σ ‖layer_θ(x) − â‖² + (λ/2)‖θ − θ^old‖²
    M:  ℓ_M(θ) = Σ [F(layer_θ(x)) − ŷ·layer_θ(x)] + (λ/2)‖θ − θ^old‖²

**The form solved here.** The layer is affine in θ, so with Δθ = θ − θ^old
its pre-activation moves by Δa = layer_Δθ(x) (the linear part of the layer
with parameters Δθ: weight ΔW, bias Δb), and Σ⟨g, Δa⟩ = ⟨Jᵀg, Δθ⟩ with
Jᵀg = G the layer's backprop gradient. Expanding the squares (S) and the
linear term (M), up to constants,

    ℓ(θ) = Σ D(Δa) + γ·⟨G, Δθ⟩ + (λ/2)‖Δθ‖²,
    S:  D(Δa) = ½‖Δa‖²,
    M:  D(Δa) = F(a^old + Δa) − F(a^old) − f(a^old)·Δa   (the Bregman divergence),

exactly, not to first order. Two things follow:

- G is taken to be the gradient the user hands over in ``p.grad``. Unchanged,
  it is Jᵀg plus the gradient of any use of θ outside the unit (tied
  weights), and ℓ is SPEC's objective; clipped, rescaled or noised, every
  local problem follows the modified gradient (SPEC §3), and the SGD
  identity holds for it: ∇ℓ(θ^old) = γ·G.
- Nothing subtracts nearly equal numbers: the target a − γ·g is never
  formed (in float32 γ·g would be lost to the rounding of a at a small γ),
  Δa is computed from Δθ, and f(a^old + Δa) − f(a^old) by the transfer's
  cancellation-free :meth:`~locoprop.transfer.Transfer.change_from`.

The gradient is ∇ℓ(θ) = Σ Jᵀr + γ·G + λΔθ with the residual r = ∂D/∂Δa:
r = Δa (S) or r = f(a^old + Δa) − f(a^old) (M). Everything here is a
function of (parameters, stored input, anchors, G), so it can be batched
across units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from locoprop.transfer import Transfer

__all__ = [
    "add_prox_grad_",
    "divergence_grads",
    "layer_transpose",
    "local_grads",
    "local_objective",
    "residual",
]

Forward = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def residual(variant: str, transfer: Transfer, anchor: tuple[Tensor, ...], delta_a: Tensor) -> Tensor:
    """∂D/∂Δa: Δa for variant S, f(a^old + Δa) − f(a^old) for variant M (``anchor`` from
    :meth:`Transfer.anchor_at` at a^old). ``delta_a`` may be overwritten."""
    if variant == "S":
        return delta_a
    return transfer.change_from(anchor, delta_a)


def divergence_grads(
    variant: str,
    transfer: Transfer,
    forward: Forward,
    delta: Sequence[Tensor],
    uses: Sequence[tuple[Tensor, tuple[Tensor, ...]]],
    compute_dtype: torch.dtype | None = None,
    centred: bool = False,
) -> list[Tensor]:
    """∇ of Σ D(Δa) in θ at θ = θ^old + ``delta`` ([ΔW] or [ΔW, Δb]): Σ over the recorded
    ``uses`` (x, anchor) of Jᵀr, the layer's vector-Jacobian product (by autograd) with the
    residual r of Δa = layer_Δθ(x).

    With ``compute_dtype`` (bfloat16) the layer's two maps run in it, x and Δθ rounded to it; the residual r
    is computed in Δθ's dtype and rounded for Jᵀr, which is summed in Δθ's dtype. ``centred`` (a layer
    affine in x: linear, matmul) splits x = (x − μ) + μ at the mean μ of its rows: only the map of x − μ is
    rounded, Δa = layer_ΔW(x − μ) + layer_Δθ(μ) and Jᵀr = J_{x−μ}ᵀr + J_μᵀ(Σr), as
    :mod:`locoprop.kernels` ("Low precision") does without autograd."""
    grads = [torch.zeros_like(d) for d in delta]
    if compute_dtype is None:
        for x, anchor in uses:
            delta_a = forward(x, *_weight_and_bias(delta))
            for total, part in zip(grads, layer_transpose(forward, delta, x, residual(variant, transfer, anchor,
                                                                                        delta_a))):  # fmt: skip
                total.add_(part)
        return grads
    low = [d.to(compute_dtype) for d in delta]
    for x, anchor in uses:
        if not centred:
            x = x.to(compute_dtype)
            r = residual(variant, transfer, anchor, forward(x, *_weight_and_bias(low)).to(delta[0].dtype))
            for total, part in zip(grads, layer_transpose(forward, low, x, r.to(compute_dtype))):
                total.add_(part)
            continue
        mean = x.reshape(-1, x.shape[-1]).mean(0, keepdim=True)
        centred_x = (x - mean).to(compute_dtype)
        delta_a = forward(centred_x, low[0], None).to(delta[0].dtype) + forward(mean, *_weight_and_bias(delta))
        r = residual(variant, transfer, anchor, delta_a)
        grads[0].add_(layer_transpose(forward, low[:1], centred_x, r.to(compute_dtype))[0])
        for total, part in zip(grads, layer_transpose(forward, delta, mean, r.reshape(-1, r.shape[-1]).sum(0, True))):
            total.add_(part)
    return grads


def local_grads(
    variant: str,
    transfer: Transfer,
    forward: Forward,
    params: Sequence[Tensor],
    old_params: Sequence[Tensor],
    uses: Sequence[tuple[Tensor, tuple[Tensor, ...]]],
    linear_term: Sequence[Tensor],
    activation_lr: float,
) -> list[Tensor]:
    """∇ℓ(θ) = Σ Jᵀr + γ·G at θ = ``params``, without the proximal term (:func:`add_prox_grad_` adds it, on
    every path). ``uses`` holds one (x, anchor) pair per recorded use of the layer (usually one); their
    divergences add up. ``linear_term`` is G. The readable reference of the fast kernels."""
    delta = [p.detach() - q for p, q in zip(params, old_params)]
    grads = divergence_grads(variant, transfer, forward, delta, uses)
    torch._foreach_add_(grads, list(linear_term), alpha=activation_lr)
    return grads


def add_prox_grad_(grads: list[Tensor], params: Sequence[Tensor], old_params: Sequence[Tensor], prox: float) -> None:
    """``grads`` += λ(θ − θ^old): the gradient of the proximal term (λ/2)‖θ − θ^old‖², in place."""
    displacement = torch._foreach_sub([p.detach() for p in params], list(old_params))
    torch._foreach_add_(grads, displacement, alpha=prox)


def layer_transpose(forward: Forward, params: Sequence[Tensor], x: Tensor, u: Tensor) -> list[Tensor]:
    """Jᵀu: the parameter gradient of the layer at input x for the output gradient u (the layer is affine
    in θ, so J does not depend on where ``params`` are)."""
    leaves = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        a = forward(x, *_weight_and_bias(leaves))
        # (a use of a block without the bias leaves the bias out of its map: zero there)
        return list(torch.autograd.grad(a, leaves, u, allow_unused=True, materialize_grads=True))


def local_objective(
    variant: str,
    transfer: Transfer,
    forward: Forward,
    params: Sequence[Tensor],
    old_params: Sequence[Tensor],
    uses: Sequence[tuple[Tensor, Tensor]],
    linear_term: Sequence[Tensor],
    activation_lr: float,
    prox: float = 0.0,
) -> Tensor:
    """ℓ(θ) = Σ D(Δa) + γ·⟨G, Δθ⟩ + (λ/2)‖Δθ‖², differentiable in ``params``; for logging and checks.

    ``uses`` holds (x, a^old) pairs (here the pre-activation itself, not an anchor). Transfer functions
    without an elementary integral (softplus) leave D out of the value; their gradient, from
    :func:`local_grads`, is exact.
    """
    delta = [p - q for p, q in zip(params, old_params)]
    total = params[0].new_zeros(())
    for x, a_old in uses:
        delta_a = forward(x, *_weight_and_bias(delta))
        if variant == "S":
            total = total + 0.5 * delta_a.square().sum()
        elif transfer.integral is not None:
            total = total + transfer.integral(a_old + delta_a) - transfer.integral(a_old)
            total = total - (transfer.fn(a_old) * delta_a).sum()
    total = total + activation_lr * sum((g * d).sum() for g, d in zip(linear_term, delta))
    if prox:
        total = total + 0.5 * prox * sum(d.square().sum() for d in delta)
    return total


def _weight_and_bias(params: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    return params[0], (params[1] if len(params) > 1 else None)
