"""Stopping on a signal (SPEC §6): Ctrl-C (SIGINT) and a scheduler's stop (SIGTERM) alike.

Batch systems (SLURM, Kubernetes, …) stop a job with SIGTERM, then SIGKILL
after a grace period. A command that takes the signals (:func:`handled`)
turns either into :class:`Interrupted`, a ``KeyboardInterrupt`` that knows
its signal, so that everything that handles Ctrl-C (a sweep queueing its
trial again, the CLI's one line with the command that continues) handles a
scheduler's stop in the same way.

Inside :func:`deferred` (the training loop) a signal is only noted: the loop
finishes the step it is in, checkpoints at it and raises
:class:`Interrupted` itself (:func:`take`), so that no finished step is
lost and none is left half done. A signal still noted when the outermost
deferred block ends is raised there.

Exit status of an interrupted command: 128 + the signal's number, the
shell's convention: 130 for SIGINT, 143 for SIGTERM.

Standard library only: the console script takes the signals before its slow imports.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = [
    "SIGNALS",
    "Interrupted",
    "deferred",
    "exit_status",
    "handled",
    "in_main_thread",
    "pending",
    "signal_name",
    "take",
]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The command was stopped by ``signum`` (SIGINT: Ctrl-C; SIGTERM: a scheduler)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal_name(signum))
        self.signum = int(signum)


def signal_name(signum: int) -> str:
    """ "SIGTERM" for 15."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(err: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the command: 130 for Ctrl-C (a plain KeyboardInterrupt too), 143 for SIGTERM."""
    return 128 + getattr(err, "signum", signal.SIGINT)


_pending: int | None = None  # the first signal noted inside a deferred block, not yet acted on
_deferring = 0  # how many deferred blocks are open


def _on_signal(signum: int, frame) -> None:
    global _pending
    if _deferring:
        if _pending is None:
            _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Take SIGINT and SIGTERM for the block (turning them into :class:`Interrupted`), then restore the handlers
    that were there. Only the main thread can take signals: elsewhere the block changes nothing."""
    global _pending
    if not in_main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _pending = None


def in_main_thread() -> bool:
    """Whether this is the main thread, the only one that can take signals."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a signal is only noted (:func:`pending`); one still noted at the end of the outermost
    block is raised there, as :class:`Interrupted`, unless the block raised already."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending is not None:
        raise Interrupted(take())


def pending() -> int | None:
    """The signal noted in a deferred block and not yet taken, or None."""
    return _pending


def take() -> int | None:
    """The noted signal, which the caller now acts on (it is no longer pending)."""
    global _pending
    signum, _pending = _pending, None
    return signum
