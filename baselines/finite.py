"""Every registry optimizer skips a step whose gradients are not all finite.

LocoProp does so by itself (SPEC §3); the baselines get it from
:class:`SkipNonFinite`, mixed into their class by :func:`finite_steps`. A
skipped step changes nothing (parameters and optimizer state stay as they
were, so one overflowing batch does not turn Adam's moments into NaN), and
``skipped_steps`` counts it; the count is part of ``state_dict()``, so a
resumed run reports the same count as an uninterrupted one.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["SkipNonFinite", "all_finite", "finite_steps"]


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, with one device sync.

    A sum is NaN or ±inf as soon as one term is, and costs one pass over
    the values (``isfinite().all()`` costs several); only sums beyond the
    float range (values near 1e32 and more) would count finite tensors as
    non-finite, and a step on such values is lost anyway.
    """
    if not tensors:
        return True
    return bool(torch.stack([t.sum() for t in tensors]).isfinite().all())


class SkipNonFinite:
    """Mixin for a ``torch.optim.Optimizer``: a step with a non-finite gradient is skipped and counted."""

    skipped_steps: int = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not all_finite(grads):
            self.skipped_steps += 1
            return loss
        # torch wraps each optimizer class's step to run the step hooks; this
        # class's step is wrapped already, so the parent's runs unwrapped (hooks once).
        parent_step = super().step
        if getattr(parent_step, "hooked", False):
            parent_step.__wrapped__(self)
        else:
            parent_step()
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", 0)
        super().load_state_dict(state_dict)
        self.skipped_steps = skipped


@functools.cache
def finite_steps(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` with :class:`SkipNonFinite` mixed in (one class per ``cls``, under its own name)."""
    return type(cls.__name__, (SkipNonFinite, cls), {"__doc__": cls.__doc__, "__module__": cls.__module__})
