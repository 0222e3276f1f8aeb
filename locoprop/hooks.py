"""Module hooks that belong to an optimizer and do not outlive it.

An optimizer watches its model through forward hooks. A hook registered as
a bound method would hold its optimizer through the model: an optimizer
rebuilt on the same model (after a learning-rate range test, a restart)
would leave the old one alive, recording every later batch. Instead each
hook reaches its owner through a weak reference (:class:`WeakHook`), and
:func:`remove_when_gone` removes the hooks from the model when the owner
is collected.

A :class:`WeakHook` is also what ``copy.deepcopy(model)`` keeps as it is
(the copy is watched by the same owner, not by a copy of it) and what
``torch.save(model)`` / pickle write as an inert hook: a saved model does
not carry an optimizer with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

from torch.utils.hooks import RemovableHandle

__all__ = ["WeakHook", "remove_when_gone"]


class WeakHook:
    """Calls the bound ``method`` while its object lives; does nothing after (and after unpickling)."""

    __slots__ = ("_method",)

    def __init__(self, method: Callable | None):
        self._method = weakref.WeakMethod(method) if method is not None else None

    def __call__(self, *args, **kwargs):
        method = self._method() if self._method is not None else None
        return method(*args, **kwargs) if method is not None else None

    def __copy__(self) -> WeakHook:
        return self

    def __deepcopy__(self, memo: dict) -> WeakHook:
        return self

    def __reduce__(self):
        return WeakHook, (None,)


def remove_when_gone(owner: object, handles: Iterable[RemovableHandle]) -> None:
    """Remove ``handles``' hooks from their modules once ``owner`` is garbage-collected."""
    weakref.finalize(owner, _remove, list(handles))


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
