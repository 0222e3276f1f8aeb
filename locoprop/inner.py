"""Inner optimizers for the local solves, their schedules, and TF-1 RMSProp."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "INNER_NAMES",
    "INNER_SCHEDULES",
    "RMSpropTF",
    "inner_lr",
    "make_inner",
    "resolve_inner",
    "rmsprop_tf",
    "takes_sparse",
]


class RMSpropTF(torch.optim.Optimizer):
    r"""RMSProp as in TensorFlow 1 (``tf.compat.v1.train.RMSPropOptimizer``).

    The official LocoProp results use it. Per parameter p with gradient g::

        ms  ← decay·ms + (1 − decay)·g²          (ms starts at 1)
        mom ← momentum·mom + lr·g / √(ms + eps)  (mom starts at 0)
        p   ← p − mom

    Unlike ``torch.optim.RMSprop``, the squared-gradient slot starts at one
    (not zero), eps sits inside the square root, and the momentum buffer
    accumulates lr-weighted steps, so a change of lr takes effect gradually.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        decay: discount of the squared-gradient average (0.9).
        momentum: momentum of the step (0.0).
        eps: added to ms inside the square root (1e-10).
        foreach: use ``torch._foreach_*`` ops (default: on CUDA tensors).
        compiled: run the update through ``torch.compile`` (one fused pass
            per parameter instead of seven; it pays off when the step runs
            many times, as in LocoProp's K local iterations, after a
            one-time compilation of some seconds).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        decay: float = 0.9,
        momentum: float = 0.0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        compiled: bool = False,
    ):
        if not lr > 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"Invalid decay value: {decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = dict(lr=lr, decay=decay, momentum=momentum, eps=eps, foreach=foreach)
        super().__init__(params, defaults)
        self.compiled = compiled
        self._lr_tensors: dict[int, Tensor] = {}  # the compiled step's lr inputs, by group

    def _init_group(self, group, params, grads, mean_squares, moms) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("RMSpropTF does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["ms"] = torch.ones_like(p, memory_format=torch.preserve_format)
                state["mom"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            mean_squares.append(state["ms"])
            moms.append(state["mom"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.compiled:
            self._compiled_step()
            return loss
        for group in self.param_groups:
            params, grads, mean_squares, moms = [], [], [], []
            self._init_group(group, params, grads, mean_squares, moms)
            if params:
                rmsprop_tf(
                    params,
                    grads,
                    mean_squares,
                    moms,
                    lr=group["lr"],
                    decay=group["decay"],
                    momentum=group["momentum"],
                    eps=group["eps"],
                    foreach=group["foreach"],
                )
        return loss

    def _compiled_step(self) -> None:
        """One compiled call for all groups that share decay, momentum and eps.

        Each call of a compiled function checks its guards, which costs about
        as much as the fused update of a small group; LocoProp has one group
        per unit and steps K times per outer step. Learning rates go in as
        tensors, one per group, so that the inner schedule does not recompile.
        """
        batches: dict[tuple, tuple[list, ...]] = {}
        for index, group in enumerate(self.param_groups):
            params, grads, mean_squares, moms = [], [], [], []
            self._init_group(group, params, grads, mean_squares, moms)
            if not params:
                continue
            lr = self._lr_tensor(index, params[0])
            lr.fill_(group["lr"])
            key = (group["decay"], group["momentum"], group["eps"])
            batch = batches.setdefault(key, ([], [], [], [], []))
            for items, new in zip(batch, (params, grads, mean_squares, moms, [lr] * len(params))):
                items.extend(new)
        for (decay, momentum, eps), batch in batches.items():
            _compiled_rmsprop_tf()(*batch, decay, momentum, eps)

    def _lr_tensor(self, index: int, like: Tensor) -> Tensor:
        lr = self._lr_tensors.get(index)
        if lr is None or lr.device != like.device or lr.dtype != like.dtype:
            lr = self._lr_tensors[index] = torch.zeros((), dtype=like.dtype, device=like.device)
        return lr


def rmsprop_tf(
    params: list[Tensor],
    grads: list[Tensor],
    mean_squares: list[Tensor],
    moms: list[Tensor],
    *,
    lr: float,
    decay: float,
    momentum: float,
    eps: float,
    foreach: bool | None = None,
) -> None:
    """Functional TF-1 RMSProp step; see :class:`RMSpropTF` for the rule."""
    if foreach is None:
        foreach = all(p.is_cuda for p in params)
    if foreach:
        _multi_tensor_rmsprop_tf(params, grads, mean_squares, moms, lr=lr, decay=decay, momentum=momentum, eps=eps)
    else:
        _single_tensor_rmsprop_tf(params, grads, mean_squares, moms, lr=lr, decay=decay, momentum=momentum, eps=eps)


def _rmsprop_tf_tensor_lr(params, grads, mean_squares, moms, lrs, decay, momentum, eps):
    for p, g, ms, mom, lr in zip(params, grads, mean_squares, moms, lrs):
        ms.mul_(decay).addcmul_(g, g, value=1.0 - decay)
        mom.mul_(momentum).add_(lr * g / (ms + eps).sqrt())
        p.sub_(mom)


@functools.cache
def _compiled_rmsprop_tf():
    return torch.compile(_rmsprop_tf_tensor_lr, dynamic=False)


def _single_tensor_rmsprop_tf(params, grads, mean_squares, moms, *, lr, decay, momentum, eps):
    for p, g, ms, mom in zip(params, grads, mean_squares, moms):
        ms.mul_(decay).addcmul_(g, g, value=1.0 - decay)
        mom.mul_(momentum).addcdiv_(g, ms.add(eps).sqrt_(), value=lr)
        p.sub_(mom)


def _multi_tensor_rmsprop_tf(params, grads, mean_squares, moms, *, lr, decay, momentum, eps):
    torch._foreach_mul_(mean_squares, decay)
    torch._foreach_addcmul_(mean_squares, grads, grads, value=1.0 - decay)
    denominators = torch._foreach_add(mean_squares, eps)
    torch._foreach_sqrt_(denominators)
    torch._foreach_mul_(moms, momentum)
    torch._foreach_addcdiv_(moms, grads, denominators, value=lr)
    torch._foreach_sub_(params, moms)


# Names accepted for ``inner``; each maps to a torch.optim class and the
# keyword arguments that make it that method.
_INNER: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": functools.partial(torch.optim.SGD, momentum=0.0),
    "momentum": functools.partial(torch.optim.SGD, momentum=0.9),
    "nesterov": functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True),
    "adam": torch.optim.Adam,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "rmsprop-tf": RMSpropTF,
}
INNER_NAMES = tuple(_INNER)

INNER_SCHEDULES = ("linear-floor", "constant")


def resolve_inner(inner) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer factory for ``inner``: a name or a torch.optim class."""
    if isinstance(inner, str) and inner in _INNER:
        return _INNER[inner]
    if isinstance(inner, type) and issubclass(inner, torch.optim.Optimizer):
        return inner
    raise ValueError(
        f"Unknown inner optimizer: {inner!r}; expected one of {', '.join(INNER_NAMES)} or a torch.optim.Optimizer class"
    )


def make_inner(inner, inner_kwargs: dict | None, compile: bool, groups: list[dict]) -> torch.optim.Optimizer:
    """The inner optimizer ``inner`` over ``groups``, with ``inner_kwargs``; ``compile`` fuses its update:
    "rmsprop-tf" through ``torch.compile``, torch's optimizers that take ``fused`` through their kernels."""
    factory = resolve_inner(inner)
    kwargs = dict(inner_kwargs or {})
    if "lr" in kwargs:
        # The inner lr of each iteration is the group's lr on the schedule (η_t); this one would be overwritten.
        raise ValueError(
            f"Invalid inner_kwargs: lr={kwargs['lr']!r}; the inner learning rate is the optimizer's lr "
            "(LocoPropOptimizer(model, lr=...), on its inner_schedule): set it there"
        )
    if compile and "compiled" not in kwargs and "fused" not in kwargs:
        if inner == "rmsprop-tf" or inner is RMSpropTF:
            kwargs["compiled"] = True
        elif _accepts(factory, "fused"):
            kwargs["fused"] = True
    try:
        return factory(groups, **kwargs)
    except TypeError as err:
        given = dict(inner_kwargs or {})
        raise ValueError(f"Invalid inner_kwargs for inner optimizer {inner!r}: {given!r} ({err})") from err


def _accepts(factory, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def takes_sparse(inner: torch.optim.Optimizer) -> bool:
    """Whether ``inner`` steps on sparse gradients: torch's SGD, Adagrad and SparseAdam do, without weight decay
    (the others raise midway through their step, after earlier groups have moved)."""
    kinds = (torch.optim.SGD, torch.optim.Adagrad, torch.optim.SparseAdam)
    return isinstance(inner, kinds) and not any(group.get("weight_decay") for group in inner.param_groups)


def inner_lr(schedule: str, lr: float, t: int, local_iters: int) -> float:
    """Inner learning rate at local step t of K = ``local_iters``.

    "linear-floor" (the official schedule): η_t = η · max(1 − t/K, 0.25);
    "constant": η_t = η.
    """
    if schedule == "constant":
        return lr
    return lr * max(1.0 - t / local_iters, 0.25)
