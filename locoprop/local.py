"""The local problem of one unit, as pure functions.

Notation (SPEC §2): x is the unit's input, a = layer_θ(x) its pre-activation,
y = f(a) its post-activation, g = dL/da the backprop gradient and
γ = ``activation_lr``.

Targets::

    S:  â = a − γ·g          (pre-activation target)
    M:  ŷ = f(a) − γ·g       (post-activation target)

Local objectives, summed over the batch, with θ^old the parameters at the
start of the step and λ = ``prox``::

    S:  ℓ_S(θ) = ½ Σ ‖layer_θ(x) − â‖² + (λ/2)‖θ − θ^old‖²
    M:  ℓ_M(θ) = Σ [F(layer_θ(x)) − ŷ·layer_θ(x)] + (λ/2)‖θ − θ^old‖²

Both have ∂ℓ/∂a = a − â (S) or f(a) − ŷ (M), which at θ^old is γ·g, so
∇ℓ(θ^old) = γ·∇L(θ^old): the first local step is a backprop step.
Everything here is a function of (parameters, stored input, target), so it
can be batched across units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from locoprop.transfer import Transfer

__all__ = [
    "add_prox_grad_",
    "layer_backprop_grads",
    "local_grads",
    "local_objective",
    "make_target",
    "preactivation_residual",
]

Forward = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def make_target(variant: str, transfer: Transfer, a: Tensor, g: Tensor, activation_lr: float) -> Tensor:
    """â = a − γ·g for variant S, ŷ = f(a) − γ·g for variant M."""
    if variant == "S":
        return torch.sub(a, g, alpha=activation_lr)
    return torch.sub(transfer.fn(a), g, alpha=activation_lr)  # no γ·g temporary


def preactivation_residual(variant: str, transfer: Transfer, a: Tensor, target: Tensor) -> Tensor:
    """∂ℓ/∂a: a − â for variant S, f(a) − ŷ for variant M."""
    if variant == "S":
        return a - target
    return transfer.fn(a) - target


def local_grads(
    variant: str,
    transfer: Transfer,
    forward: Forward,
    params: Sequence[Tensor],
    batches: Sequence[tuple[Tensor, Tensor]],
) -> list[Tensor]:
    """∇ℓ(θ) for θ = ``params`` (weight[, bias]), without the proximal term
    (:func:`add_prox_grad_` adds it, on every path).

    ``batches`` holds one (x, target) pair per recorded use of the layer
    (usually one); their local objectives add up. The parameter gradient is
    the layer's vector-Jacobian product with the residual ∂ℓ/∂a, so the
    transfer's integral F is never needed.
    """
    return _layer_vjp(forward, params, batches, lambda a, target: preactivation_residual(variant, transfer, a, target))


def add_prox_grad_(grads: list[Tensor], params: Sequence[Tensor], old_params: Sequence[Tensor], prox: float) -> None:
    """``grads`` += λ(θ − θ^old): the gradient of the proximal term (λ/2)‖θ − θ^old‖², in place."""
    displacement = torch._foreach_sub([p.detach() for p in params], list(old_params))
    torch._foreach_add_(grads, displacement, alpha=prox)


def layer_backprop_grads(
    forward: Forward, params: Sequence[Tensor], backprop: Sequence[tuple[Tensor, Tensor]]
) -> list[Tensor]:
    """The part of ∇L(θ) that flows through this layer: Σ over the recorded
    (x, g) pairs of the layer's vector-Jacobian product with g = ∂L/∂a.

    It is the parameters' whole backprop gradient unless they are also used
    outside the layer (tied weights).
    """
    return _layer_vjp(forward, params, backprop, lambda a, g: g)


def _layer_vjp(forward: Forward, params: Sequence[Tensor], pairs, output_grad) -> list[Tensor]:
    """Σ over (x, c) pairs of δᵀ·∂layer_θ(x)/∂θ with δ = output_grad(layer_θ(x), c)."""
    leaves = [p.detach().requires_grad_(True) for p in params]
    grads = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for x, c in pairs:
            a = forward(x, *_weight_and_bias(leaves))
            for total, grad in zip(grads, torch.autograd.grad(a, leaves, output_grad(a.detach(), c))):
                total.add_(grad)
    return grads


def local_objective(
    variant: str,
    transfer: Transfer,
    forward: Forward,
    params: Sequence[Tensor],
    batches: Sequence[tuple[Tensor, Tensor]],
    prox: float = 0.0,
    old_params: Sequence[Tensor] | None = None,
) -> Tensor:
    """ℓ(θ), differentiable in ``params``; for logging and checks.

    Transfer functions without an elementary integral (softplus) leave F
    out of the value; their gradient, from :func:`local_grads`, is exact.
    """
    total = params[0].new_zeros(())
    for x, target in batches:
        a = forward(x, *_weight_and_bias(params))
        if variant == "S":
            total = total + 0.5 * (a - target).square().sum()
        else:
            integral = transfer.integral(a) if transfer.integral is not None else 0.0
            total = total + integral - (target * a).sum()
    if prox:
        total = total + 0.5 * prox * sum((p - q).square().sum() for p, q in zip(params, old_params))
    return total


def _weight_and_bias(params: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    return params[0], (params[1] if len(params) > 1 else None)
