"""Transfer functions f and their convex integrals F (F' = f).

LocoProp-M matches a unit's post-activation y = f(a) to a target ŷ with the
Bregman (matching) loss F(a) − ŷ·a, whose gradient in a is f(a) − ŷ. That
needs f to be monotone (F convex). LocoProp-S only needs the pre-activation,
so any transfer function works there.

A :class:`Transfer` knows its elementwise map ``fn``, its integral
``integral`` (``None`` when it has no elementary form, as for softplus: only
the gradient f(a) − ŷ is needed for the solve), and whether it can be used
by variant M at all.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TRANSFER_NAMES", "Transfer", "transfer_by_name", "transfer_from_module"]

TRANSFER_NAMES = ("identity", "tanh", "sigmoid", "relu", "leaky_relu", "softplus", "softmax")

# Activation modules that are not monotone: no convex integral exists.
_NON_MONOTONE = (nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """A unit's transfer function.

    Attributes:
        name: canonical name, e.g. ``"tanh"`` or ``"leaky_relu(0.2)"``.
        fn: a ↦ f(a); ``None`` when the function is not supported.
        integral: a ↦ Σ F(a) summed over every element (row-wise logsumexp
            for softmax); ``None`` when F has no elementary form.
        unsupported_reason: why variant M cannot use it (empty if it can).
        fn_: f applied in place, where torch has such a kernel (the fast
            solve path uses it to save a pass and an allocation).
    """

    name: str
    fn: Callable[[Tensor], Tensor] | None
    integral: Callable[[Tensor], Tensor] | None
    unsupported_reason: str = ""
    fn_: Callable[[Tensor], Tensor] | None = None

    @property
    def supports_matching_loss(self) -> bool:
        return not self.unsupported_reason


def _half_square(a: Tensor) -> Tensor:
    return 0.5 * a.square().sum()


def _log_cosh(a: Tensor) -> Tensor:
    # log cosh a = |a| + log1p(exp(-2|a|)) - log 2, stable for large |a|.
    abs_a = a.abs()
    return (abs_a + torch.log1p(torch.exp(-2.0 * abs_a)) - torch.log(torch.tensor(2.0, dtype=a.dtype))).sum()


def _softplus_sum(a: Tensor) -> Tensor:
    return F.softplus(a).sum()


def _half_relu_square(a: Tensor) -> Tensor:
    return 0.5 * F.relu(a).square().sum()


def _leaky_half_square(a: Tensor, slope: float) -> Tensor:
    return 0.5 * torch.where(a >= 0, a.square(), slope * a.square()).sum()


def _logsumexp_rows(a: Tensor, dim: int) -> Tensor:
    return torch.logsumexp(a, dim=dim).sum()


def _identity(a: Tensor) -> Tensor:
    return a


def _leaky_relu(a: Tensor, slope: float) -> Tensor:
    return F.leaky_relu(a, slope)


def _softplus(a: Tensor, beta: float, threshold: float) -> Tensor:
    return F.softplus(a, beta, threshold)


def _softmax(a: Tensor, dim: int) -> Tensor:
    return torch.softmax(a, dim=dim)


def leaky_relu(negative_slope: float = 0.01) -> Transfer:
    if negative_slope < 0:
        # A negative slope makes f non-monotone.
        return Transfer(f"leaky_relu({negative_slope})", None, None, "a negative slope is not monotone")
    return Transfer(
        f"leaky_relu({negative_slope})",
        functools.partial(_leaky_relu, slope=negative_slope),
        functools.partial(_leaky_half_square, slope=negative_slope),
        fn_=functools.partial(F.leaky_relu_, negative_slope=negative_slope),
    )


def softplus(beta: float = 1.0, threshold: float = 20.0) -> Transfer:
    name = "softplus" if (beta, threshold) == (1.0, 20.0) else f"softplus({beta}, {threshold})"
    # ∫ softplus is a dilogarithm, not elementary; the solve only needs f.
    return Transfer(name, functools.partial(_softplus, beta=beta, threshold=threshold), None)


def softmax(dim: int = -1) -> Transfer:
    name = "softmax" if dim == -1 else f"softmax(dim={dim})"
    return Transfer(name, functools.partial(_softmax, dim=dim), functools.partial(_logsumexp_rows, dim=dim))


_BY_NAME: dict[str, Callable[[], Transfer]] = {
    "identity": lambda: Transfer("identity", _identity, _half_square, fn_=_identity),
    "tanh": lambda: Transfer("tanh", torch.tanh, _log_cosh, fn_=torch.tanh_),
    "sigmoid": lambda: Transfer("sigmoid", torch.sigmoid, _softplus_sum, fn_=torch.sigmoid_),
    "relu": lambda: Transfer("relu", F.relu, _half_relu_square, fn_=torch.relu_),
    "leaky_relu": leaky_relu,
    "softplus": softplus,
    "softmax": softmax,
}


def transfer_by_name(name: str) -> Transfer:
    """The transfer function called ``name`` (one of :data:`TRANSFER_NAMES`)."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"Unknown transfer function: {name!r}; expected one of {', '.join(TRANSFER_NAMES)}")
    return _BY_NAME[name]()


def transfer_from_module(module: nn.Module) -> Transfer:
    """The transfer function an activation module applies.

    Unsupported modules give a :class:`Transfer` with ``fn=None`` and a
    reason, so that variant S (which never calls ``fn``) still accepts them
    and variant M can name the layer in its error.
    """
    kind = type(module).__name__
    if isinstance(module, nn.Identity):
        return transfer_by_name("identity")
    if isinstance(module, nn.Tanh):
        return transfer_by_name("tanh")
    if isinstance(module, nn.Sigmoid):
        return transfer_by_name("sigmoid")
    if isinstance(module, nn.ReLU):
        return transfer_by_name("relu")
    if isinstance(module, nn.LeakyReLU):
        return leaky_relu(module.negative_slope)
    if isinstance(module, nn.Softplus):
        return softplus(module.beta, module.threshold)
    if isinstance(module, nn.Softmax):
        return softmax(-1 if module.dim is None else module.dim)
    if isinstance(module, _NON_MONOTONE):
        return Transfer(kind, None, None, f"{kind} is not monotone, so it has no convex integral")
    return Transfer(kind, None, None, f"{kind} is not a supported transfer function")
