"""Which running trials of an Optuna study still have a live worker, where the storage keeps no heartbeat.

An RDB storage (SQLite, PostgreSQL) records a heartbeat per trial, so a
trial whose worker died goes stale there. An Optuna journal file has none,
so a worker says it is alive another way: for as long as it runs a sweep it
holds an exclusive ``flock`` on its own lock file, ``FOLDER/WORKER.lock``,
and it labels every trial it runs with ``WORKER:NUMBER`` (the number makes
the label of a retried trial, which Optuna copies from the original, stale).
The operating system releases the lock when the process ends, however it
ends (SIGKILL included), so another worker that can take it knows that the
trial's worker is gone.

A trial that has no label of its own yet (created a moment ago; its worker
labels it first thing) counts as alive for ``grace_period`` seconds after
it started, as a trial without a heartbeat does in an RDB storage.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import uuid

try:
    import fcntl
except ImportError:  # not on POSIX: every labelled trial counts as alive
    fcntl = None

from optuna.trial import FrozenTrial

__all__ = ["WORKER_ATTR", "WorkerLock"]

WORKER_ATTR = "locoprop_worker"  # user attribute of a trial: "WORKER:NUMBER", who runs it


class WorkerLock:
    """This process's lock in ``folder`` while a sweep runs, and the liveness of other workers' trials."""

    def __init__(self, folder: pathlib.Path, grace_period: float):
        self.folder, self.grace_period = pathlib.Path(folder), grace_period
        self.worker = uuid.uuid4().hex[:12]
        self._handle = None

    @contextlib.contextmanager
    def held(self):
        """Hold this worker's lock for the duration of the block (the sweep), then remove it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.worker}.lock"
        self._handle = open(path, "w")
        try:
            if fcntl is not None:
                fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield self
        finally:
            # Removed before it is released: a worker that opens the file after this finds none (the owner is
            # gone), and one that opened it before takes a lock that tells the same.
            path.unlink(missing_ok=True)
            self._handle.close()
            self._handle = None

    def label(self, number: int) -> str:
        """The :data:`WORKER_ATTR` of trial ``number`` run by this worker."""
        return f"{self.worker}:{number}"

    def alive(self, trial: FrozenTrial) -> bool:
        """Whether the running ``trial`` has a live worker (see the module docstring)."""
        worker, _, number = str(trial.user_attrs.get(WORKER_ATTR, "")).partition(":")
        if number != str(trial.number):  # not labelled yet, or the label of the trial it retries
            started = trial.datetime_start
            if started is None:
                return True
            return (datetime.datetime.now() - started).total_seconds() < self.grace_period
        if worker == self.worker:
            return True
        return _locked(self.folder / f"{worker}.lock")


def _locked(path: pathlib.Path) -> bool:
    """Whether another process holds the lock on ``path`` (False where the file is gone)."""
    if fcntl is None:
        return True
    try:
        handle = os.open(path, os.O_RDWR)  # NFS emulates flock by fcntl locks, whose exclusive kind needs write access
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(handle)  # releases the lock if this process took it
    return False
