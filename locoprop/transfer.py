"""Transfer functions f and their convex integrals F (F' = f).

LocoProp-M matches a unit's post-activation y = f(a) to a target ŷ with the
Bregman (matching) loss F(a) − ŷ·a, whose gradient in a is f(a) − ŷ. That
needs f to be monotone (F convex). LocoProp-S only needs the pre-activation,
so any transfer function works there.

A :class:`Transfer` knows its elementwise map ``fn``, its integral
``integral`` (``None`` when it has no elementary form, as for softplus: only
the gradient is needed for the solve), whether variant M can use it at all,
and how its output changes when its input moves by d:
``change(anchor(a), d) = f(a + d) − f(a)``, written so that nothing cancels.
The local solve of M needs exactly that change (its residual is
f(a^old + Δa) − f(a^old)), and forming f(a + d) and subtracting f(a) would
lose d to the rounding of f(a) whenever d is small: in float32 the local
gradients of the later inner iterations would drown in rounding error at a
small γ. ``anchor`` is computed once per step, ``change`` at every inner
iteration.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TRANSFER_NAMES",
    "Transfer",
    "is_activation_module",
    "is_piecewise_linear",
    "regrouped",
    "transfer_by_name",
    "transfer_from_call",
    "transfer_from_module",
]

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
            anchor: a ↦ the tensors that :attr:`change` needs about the point a
            (computed once per step; by default a itself).
        change: (anchor(a), d) ↦ f(a + d) − f(a), accurate to a few ulp of
            the result (by default computed directly, which cancels). It may
            overwrite d, which the caller gives it to consume.
        softmax_dim: the dimension a softmax normalises over (-1: the last);
            None for an elementwise function, which any layout of the output
            (its rows, a view) takes the same.
    """

    name: str
    fn: Callable[[Tensor], Tensor] | None
    integral: Callable[[Tensor], Tensor] | None
    unsupported_reason: str = ""
    anchor: Callable[[Tensor], tuple[Tensor, ...]] | None = None
    change: Callable[[tuple[Tensor, ...], Tensor], Tensor] | None = None
    softmax_dim: int | None = None

    def anchor_at(self, a: Tensor) -> tuple[Tensor, ...]:
        """What :meth:`change_from` needs about the point a."""
        return self.anchor(a) if self.anchor is not None else (a,)

    def change_from(self, anchor: tuple[Tensor, ...], d: Tensor) -> Tensor:
        """f(a + d) − f(a) for ``anchor = anchor_at(a)``; may overwrite d."""
        if self.change is not None:
            return self.change(anchor, d)
        (a,) = anchor
        return self.fn(a + d) - self.fn(a)

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


# ------------------------------------------------------------- changes f(a + d) − f(a)
# Each is an identity of f that has no difference of nearly equal numbers;
# "d" is consumed (overwritten) where that saves an allocation.
def _no_anchor(a: Tensor) -> tuple[Tensor, ...]:
    return ()


def _identity_change(anchor: tuple[Tensor, ...], d: Tensor) -> Tensor:
    return d


_ONE = torch.ones(())


def _tanh_anchor(a: Tensor) -> tuple[Tensor, ...]:
    return a, torch.tanh(a)


def _tanh_change(anchor: tuple[Tensor, ...], d: Tensor) -> Tensor:
    # tanh(a + d) − tanh(a) = tanh(d)·(1 − tanh(a)·tanh(a + d)): no division, exact for any d; the factor
    # 1 − y·y′ rounds as backprop's 1 − y² does.
    a, y = anchor
    t = torch.tanh(d)
    moved = d.add_(a).tanh_()
    return torch.addcmul(_ONE.to(moved.dtype), moved, y, value=-1.0, out=moved).mul_(t)


def _sigmoid_anchor(a: Tensor) -> tuple[Tensor, ...]:
    half = a * 0.5
    return half, torch.tanh(half)


def _sigmoid_change(anchor: tuple[Tensor, ...], d: Tensor) -> Tensor:
    # σ(x) = (1 + tanh(x/2))/2, so σ(a + d) − σ(a) is half the change of tanh at a/2 by d/2.
    return _tanh_change(anchor, d.mul_(0.5)).mul_(0.5)


def _piecewise_linear_anchor(slope: float):
    """f(x) = max(x, αx) for 0 ≤ α ≤ 1 (ReLU: α = 0): f(a + d) − f(a) = max(d + c₁, α·d + c₂) with
    c₁ = (1 − α)·min(a, 0) and c₂ = −(1 − α)·max(a, 0); one of them is 0, so on either side of the kink
    the change is d or α·d exactly."""

    def anchor(a: Tensor) -> tuple[Tensor, ...]:
        return a.clamp(max=0.0).mul_(1.0 - slope), a.clamp(min=0.0).mul_(slope - 1.0)

    return anchor


@functools.cache  # (one function per constant: compile=True compiles one kernel for it)
def _piecewise_linear_change(slope: float):
    def change(anchor: tuple[Tensor, ...], d: Tensor) -> Tensor:
        below, above = anchor
        if slope == 0.0:
            d = d.add_(below)
            return torch.maximum(d, above, out=d)
        return torch.maximum(d + below, d.mul_(slope).add_(above))

    return change


def _softplus_anchor(beta: float):
    def anchor(a: Tensor) -> tuple[Tensor, ...]:
        return a, torch.sigmoid(beta * a)

    return anchor


@functools.cache  # (one function per constant: compile=True compiles one kernel for it)
def _softplus_change(beta: float, threshold: float):
    # softplus(a + d) − softplus(a) = log1p(x)/β with x = σ(βa)·expm1(βd), while βd is small enough for
    # expm1 not to overflow (beyond that the direct difference has no cancellation to fear). Where x < −½
    # the same change is log(σ(−βa) + σ(βa)·exp(βd))/β, the log of a sum of two positive terms below ½: x
    # nears −1 where σ(βa) saturates, and its log1p would be the rounding of σ(βa). The sum is taken of the
    # terms' logs, −softplus(βa) and βd − softplus(−βa), so that σ(−βa) cannot underflow (βa > 88).
    def change(anchor: tuple[Tensor, ...], d: Tensor) -> Tensor:
        a, probability = anchor
        moved = beta * d
        direct = F.softplus(a + d, beta, threshold) - F.softplus(a, beta, threshold)
        x = probability * torch.expm1(moved.clamp(max=threshold))
        below = torch.logaddexp(-F.softplus(beta * a), moved - F.softplus(-beta * a)) / beta
        return torch.where(moved < threshold, torch.where(x < -0.5, below, torch.log1p(x) / beta), direct)

    return change


def _softmax_anchor(dim: int):
    def anchor(a: Tensor) -> tuple[Tensor, ...]:
        log_s = torch.log_softmax(a, dim=dim)
        return log_s.exp(), log_s

    return anchor


@functools.cache  # (one function per constant: compile=True compiles one kernel for it)
def _softmax_change(dim: int):
    # With s = softmax(a), a row whose d is small (|d| ≤ 1): softmax(a + d) − s = s·(E − m)/Z with
    # E = expm1(d − c), m = Σ s·E and Z = Σ s·exp(d − c) (c = max d, which softmax ignores; it keeps exp from
    # overflowing): E − m is a difference of numbers of the size of d, Z a sum of positive terms. A row
    # whose d is large moves its probability mass far, and the direct difference loses nothing there.
    def change(anchor: tuple[Tensor, ...], d: Tensor) -> Tensor:
        s, log_s = anchor
        direct = torch.softmax(log_s + d, dim=dim).sub_(s)
        small = d.abs().amax(dim=dim, keepdim=True) <= 1.0
        shifted = d.sub_(d.amax(dim=dim, keepdim=True))
        normaliser = (s * torch.exp(shifted)).sum(dim=dim, keepdim=True)
        shifted = shifted.expm1_()
        mean = (s * shifted).sum(dim=dim, keepdim=True)
        return torch.where(small, shifted.sub_(mean).mul_(s).div_(normaliser), direct)

    return change


def leaky_relu(negative_slope: float = 0.01) -> Transfer:
    if negative_slope < 0:
        # A negative slope makes f non-monotone.
        return Transfer(f"leaky_relu({negative_slope})", None, None, "a negative slope is not monotone")
    exact_change = negative_slope <= 1.0  # max(x, αx) is the function only for α ≤ 1
    return Transfer(
        f"leaky_relu({negative_slope})",
        functools.partial(_leaky_relu, slope=negative_slope),
        functools.partial(_leaky_half_square, slope=negative_slope),
        anchor=_piecewise_linear_anchor(negative_slope) if exact_change else None,
        change=_piecewise_linear_change(negative_slope) if exact_change else None,
    )


def softplus(beta: float = 1.0, threshold: float = 20.0) -> Transfer:
    name = "softplus" if (beta, threshold) == (1.0, 20.0) else f"softplus({beta}, {threshold})"
    # ∫ softplus is a dilogarithm, not elementary; the solve only needs f.
    return Transfer(
        name,
        functools.partial(_softplus, beta=beta, threshold=threshold),
        None,
        anchor=_softplus_anchor(beta),
        change=_softplus_change(beta, threshold),
    )


def softmax(dim: int = -1) -> Transfer:
    name = "softmax" if dim == -1 else f"softmax(dim={dim})"
    return Transfer(
        name,
        functools.partial(_softmax, dim=dim),
        functools.partial(_logsumexp_rows, dim=dim),
        anchor=_softmax_anchor(dim),
        change=_softmax_change(dim),
        softmax_dim=dim,
    )


def regrouped(transfer: Transfer) -> Transfer:
    """``transfer``, a softmax, read over a reshaped or permuted output of its unit (a softmax per group of the
    unit's outputs: Deformable DETR's per-head attention weights, a multiple-choice head's scores): no transfer
    function of the unit's output that variant M has an integral for (M takes the S target, and says so)."""
    return Transfer(f"{transfer.name} of a reshaped output", None, None,
                    f"{transfer.name} over a reshaped or permuted output (a softmax per group of the unit's "
                    "outputs) has no integral locoprop knows of the unit's output")  # fmt: skip


_BY_NAME: dict[str, Callable[[], Transfer]] = {
    "identity": lambda: Transfer("identity", _identity, _half_square, anchor=_no_anchor, change=_identity_change),
    "tanh": lambda: Transfer("tanh", torch.tanh, _log_cosh, anchor=_tanh_anchor, change=_tanh_change),
    "sigmoid": lambda: Transfer(
        "sigmoid", torch.sigmoid, _softplus_sum, anchor=_sigmoid_anchor, change=_sigmoid_change
    ),
    "relu": lambda: Transfer(
        "relu", F.relu, _half_relu_square, anchor=_piecewise_linear_anchor(0.0), change=_piecewise_linear_change(0.0)
    ),
    "leaky_relu": leaky_relu,
    "softplus": softplus,
    "softmax": softmax,
}


def is_piecewise_linear(transfer: Transfer) -> bool:
    """Whether ``transfer`` is the identity, ReLU or a leaky ReLU (its change is a maximum of two lines)."""
    return transfer.name in ("identity", "relu") or transfer.name.startswith("leaky_relu(")


def transfer_by_name(name: str) -> Transfer:
    """The transfer function called ``name`` (one of :data:`TRANSFER_NAMES`)."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"Unknown transfer function: {name!r}; expected one of {', '.join(TRANSFER_NAMES)}")
    return _BY_NAME[name]()


def transfer_from_module(module: nn.Module, ndim: int | None = None) -> Transfer:
    """The transfer function an activation module applies (to an input of ``ndim`` dimensions, when known: a
    softmax over its last dimension is ``softmax`` however its ``dim`` is written).

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
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):  # (log_softmax: the softmax, see _call_table)
        if ndim is None:
            return softmax(-1 if module.dim is None else module.dim)
        # (dim=None: torch's implicit choice, 0 for 0-, 1- and 3-D inputs, else 1)
        dim = module.dim if module.dim is not None else (0 if ndim in (0, 1, 3) else 1)
        return softmax(-1) if ndim == 0 or dim in (-1, ndim - 1) else softmax(dim % ndim)
    if isinstance(module, _NON_MONOTONE) or any(name in kind for name in ("GELU", "SiLU", "Swish", "Mish")):
        return Transfer(kind, None, None, f"{kind} is not monotone, so it has no convex integral")
    if type(module).__module__.startswith("transformers.activations") and "Linear" in kind:
        return transfer_by_name("identity")  # Hugging Face's LinearActivation
    return Transfer(kind, None, None, f"{kind} is not a supported transfer function")


def is_activation_module(module: nn.Module) -> bool:
    """A parameter-free module of ``torch.nn``'s activations, ``nn.Identity``, or one of Hugging Face's
    activation classes (``transformers.activations``): whatever it applies to its input is the transfer
    function of the unit whose output it takes."""
    if isinstance(module, nn.Identity):
        return True
    source = type(module).__module__
    activation = source == "torch.nn.modules.activation" or source.startswith("transformers.activations")
    return activation and not any(True for _ in module.parameters())


def transfer_from_call(func, args: tuple, kwargs: dict) -> Transfer | None:
    """The transfer function that a call of an elementwise activation applies to its first argument
    (``torch.tanh(a)``, ``F.relu(a)``, ``a.sigmoid()``, ``F.gelu(a)``, ``F.softmax(a, -1)``, …), or None
    for any other call. Activations without a convex integral (GELU, SiLU, …) give a Transfer that
    variant M cannot use, never None: a unit followed by one is never taken for identity."""
    table = _call_table()
    make = table.get(func)
    if make is None:
        return None
    return make(*args, **{k: v for k, v in kwargs.items() if k != "inplace"})


@functools.cache
def _call_table() -> dict:
    def named(name):
        return lambda a, *args, **kwargs: transfer_by_name(name)

    def unsupported(name):
        return lambda a, *args, **kwargs: Transfer(name, None, None, f"{name} is not monotone, or not a transfer "
                                                   "function locoprop has an integral for")  # fmt: skip

    def leaky(a, negative_slope=0.01, *args, **kwargs):
        return leaky_relu(negative_slope)

    def soft(a, beta=1.0, threshold=20.0, *args, **kwargs):
        return softplus(beta, threshold)

    def softmax_call(a, dim=None, *args, **kwargs):
        if dim is None:  # torch's implicit choice: 0 for 0-, 1- and 3-D inputs, else 1
            dim = 0 if a.dim() in (0, 1, 3) else 1
        if a.dim() == 0 or dim in (-1, a.dim() - 1):
            return softmax(-1)
        return softmax(dim % a.dim())  # as nn.Softmax(dim) gives it (a convolution's channels: dim=1)

    table = {}
    for name, funcs in {
        "tanh": (torch.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_, F.tanh),
        "sigmoid": (
            torch.sigmoid,
            torch.sigmoid_,
            torch.Tensor.sigmoid,
            torch.Tensor.sigmoid_,
            F.sigmoid,
            torch.special.expit,
        ),
        "relu": (torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu, F.relu_),
    }.items():
        table.update(dict.fromkeys(funcs, named(name)))
    table.update(dict.fromkeys((F.leaky_relu, F.leaky_relu_), leaky))
    table[F.softplus] = soft
    table.update(dict.fromkeys((F.softmax, torch.softmax, torch.Tensor.softmax), softmax_call))
    # log_softmax feeds the negative log-likelihood: cross-entropy of the unit's logits, whose transfer function
    # is the softmax (the post-activation's matching loss, logsumexp, is the same whichever the model returns).
    table.update(dict.fromkeys((F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax,
                                torch.special.log_softmax), softmax_call))  # fmt: skip
    for func in (F.gelu, F.silu, F.mish, F.hardswish, F.elu, F.selu, F.celu, F.hardtanh, F.relu6, F.logsigmoid,
                 F.softsign, F.hardsigmoid, F.glu, F.tanhshrink):  # fmt: skip
        table[func] = unsupported(func.__name__)
    return table
