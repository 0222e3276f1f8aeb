"""Optuna back end of ``locoprop sweep`` (SPEC §8).

- Storage: a SQLite file in ``--out`` by default; any RDB URL (PostgreSQL on
  a cluster); or a journal file (``journal:PATH``, or a path without a
  scheme ending in ``.log``/``.journal``). A string with a scheme is never
  taken for a file.
- The same command again continues the same study (``load_if_exists``)
  until ``trials`` trials have *finished* (complete or pruned): after a
  crash it runs the missing ones, never more. Several workers may run the
  same command against one storage, started at the same moment too: a
  worker that loses the race to create a fresh database's tables joins it,
  and a trial that finds the total taken by trials other workers started
  first never trains (:class:`_Places`). The study stores its setup (the base
  run config, :func:`sweeps.search.results.sweep_setup`) and refuses another one.
- A study keeps its trials' run directories and its results table in its
  own folder, ``out/STUDY`` (``trials/trial-NNNN``, ``sweep_results.csv``);
  the default SQLite file ``out/optuna.db`` holds every study of ``out``.
- Every trial draws its proposals from its own seed, derived from
  ``sampler_seed`` and its number (:class:`sweeps.search.search_space.TrialSeededSampler`):
  a continued study and concurrent workers propose new points.
- A trial interrupted by Ctrl-C or SIGTERM (a scheduler's stop, a
  preemption) checkpoints at its last step, is queued again with the same
  parameters and resumes its run directory from there when the command runs
  again, however often it is interrupted.
- A worker holds a lock on a file of each trial it runs, and records its
  host and the file in the trial: a trial left running by a worker of this
  machine whose lock is free (the process is gone: killed, or crashed) is
  marked failed and retried at once, on any storage.
- A journal file (no heartbeats) knows its live workers by the locks they
  hold (:mod:`sweeps.search.workers`); a last line cut short by a worker that
  died while writing is removed (:class:`JournalFile`), and a line damaged
  otherwise is an error naming the file and the line.
- RDB storages (SQLite included) keep a heartbeat: a trial of another
  machine's worker that died becomes stale after ``grace_period`` seconds.
  Either way the retry has the same parameters and resumes the dead trial's
  run directory, so no finished work is lost; a trial is retried once after
  its worker died (interrupts do not count). A trial and its retries are one
  row of the results table.
- Each epoch's loss is reported; the pruner (median by default, Hyperband
  on request) may stop a trial, and a diverged run becomes a pruned trial
  with status "diverged", never a silent failure.
- A password in the storage URL is never printed, logged or exported.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import inspect
import json
import logging
import math
import os
import pathlib
import socket
import time
import warnings
from typing import IO, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeps.extras import require
from sweeps.runner.config import RunConfig
from sweeps.runner.train import BUDGET_PERCENT, train
from sweeps.search.checks import check_sweep
from sweeps.search.results import (
    JOURNAL_PREFIX,
    SweepNotice,
    check_same_setup,
    export_results,
    hide_secrets,
    mask_url,
    sweep_setup,
)
from sweeps.search.search_space import SearchSpace, TrialSeededSampler
from sweeps.search.workers import WORKER_ATTR, WorkerLock

__all__ = ["DamagedJournal", "JournalMended", "make_storage", "optuna_rows", "run_optuna_sweep"]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PRUNERS = ("median", "hyperband", "none")
JOURNAL_SUFFIXES = (".log", ".journal")
# URL schemes SQLAlchemy (≥ 2.1) opens with psycopg 3, which the 'postgres' extra installs.
PSYCOPG_SCHEMES = ("postgresql", "postgresql+psycopg")
# A trial whose worker died is retried this often; a trial that keeps
# killing its worker is then given up. Interrupts (Ctrl-C) do not count.
MAX_STALE_RETRIES = 1
STALE_RETRIES = "locoprop_stale_retries"  # system attribute carried from a trial to its retries
SURPLUS = "surplus"  # the status of a trial that found the study's total taken by others; it never trains
# Workers that open a fresh database together race to create its tables; the loser retries and joins.
OPEN_ATTEMPTS = 5
# System attribute of a running trial: the host of its worker and the file it holds a lock on (not carried to retries).
WORKER = "locoprop_trial_lock"
LOCKS_DIR = ".workers"  # in --out: the lock files of the running trials
# Optuna ≥ 4.9 names the retry callback RetryHeartbeatStaleTrialCallback (the old name is deprecated).
_RETRY = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback


def make_storage(url: str | None, out: pathlib.Path, heartbeat_interval: int = 60, grace_period: int = 120):
    """An Optuna storage from ``--storage`` (None: SQLite file in ``out``).

    Raises:
        ValueError: a string that is neither an RDB URL nor a journal file,
            or a storage that cannot be opened; the message masks any password.
        MissingExtra: a PostgreSQL URL without psycopg (the 'postgres' extra).
    """
    _check_heartbeat(heartbeat_interval, grace_period)
    if url is None:
        out.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(out / 'optuna.db').resolve()}"
    journal = _journal_path(url)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFile(journal))
    if "://" not in url:
        raise ValueError(
            f"Invalid storage {mask_url(url)!r}: expected an RDB URL (sqlite:///FILE, postgresql://USER@HOST/DB) "
            "or a journal file (journal:PATH)"
        )
    if url.split("://", 1)[0] in PSYCOPG_SCHEMES:
        require("psycopg", "postgres")
    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and what we need
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_interval, grace_period=grace_period, **_stale_callback_argument()
                )
        except Exception as err:  # SQLAlchemy and drivers raise many types; the URL is what matters
            if _lost_creation_race(err) and attempt < OPEN_ATTEMPTS:
                time.sleep(0.1 * attempt)  # the other worker is creating the tables; then they exist
                continue
            raise ValueError(
                f"Cannot open storage {mask_url(url)}: {type(err).__name__}: {hide_secrets(str(err), url)}"
            ) from None


def _check_optuna_arguments(heartbeat_interval: int, grace_period: int, pruner: str) -> None:
    """Refuse the arguments only the Optuna back end has: heartbeat settings that cannot work, an unknown pruner."""
    _check_heartbeat(heartbeat_interval, grace_period)
    _pruner(pruner)


def _check_heartbeat(heartbeat_interval: int, grace_period: int) -> None:
    """Refuse heartbeat settings that could not work, naming the flag (not as a storage that cannot be opened)."""
    for flag, value in (("--heartbeat-interval", heartbeat_interval), ("--grace-period", grace_period)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {flag}: {value!r}; expected whole seconds ≥ 1")
    if grace_period <= heartbeat_interval:
        raise ValueError(
            f"Invalid --grace-period: {grace_period}; it must exceed --heartbeat-interval ({heartbeat_interval} s), "
            "or a live trial would be taken for a dead one between two heartbeats"
        )


def _lost_creation_race(err: Exception) -> bool:
    """Whether opening failed because another worker created the same tables at the same moment: a table, a
    version row or a lock that it made first (SQLite: "table studies already exists", "database is locked")."""
    # SQLAlchemy's errors, by name: it comes with Optuna, and this module imports only what the extras declare.
    kinds = {kind.__name__ for kind in type(err).__mro__}
    if "IntegrityError" in kinds:
        return True
    text = str(err).lower()
    return "OperationalError" in kinds and ("already exists" in text or "locked" in text)


def _end_of_last_line(handle, size: int, chunk: int = 2**16) -> int:
    """The offset just after the last line end in the file open as ``handle`` (0 if it has none)."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        handle.seek(start)
        found = handle.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


class DamagedJournal(ValueError):
    """An Optuna journal file holds a line that is not a record; the message names the file and the line."""


class JournalMended(SweepNotice):
    """The last line of a journal file, cut short by a write that never finished, was removed; the message says so."""


class JournalFile(optuna.storages.journal.JournalFileBackend):
    """Optuna's journal file, which names itself when it cannot be read, and drops a last line cut short.

    A worker killed while appending can leave a last line without its end;
    the next append would glue its record to it and damage both, for good.
    So before every append (under the journal's lock, which writers hold)
    and when opened, a last line without a line end is removed, with a
    :class:`JournalMended` warning: it is a record that was never written.
    """

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self.file_lock = optuna.storages.journal.JournalFileSymlinkLock(str(self.path))
        super().__init__(str(self.path), lock_obj=self.file_lock)
        with self._locked():
            self._drop_partial_line()

    @contextlib.contextmanager
    def _locked(self):
        self.file_lock.acquire()
        try:
            yield
        finally:
            self.file_lock.release()

    def _drop_partial_line(self) -> None:
        with open(self.path, "rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            keep = _end_of_last_line(handle, size)
            handle.truncate(keep)
        cut = size - keep
        warnings.warn(
            f"journal file {self.path}: removed its last line ({cut} bytes), cut short by a write that never "
            "finished (a worker stopped while writing); the study continues without it",
            JournalMended,
            stacklevel=3,
        )

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self._locked():
            self._drop_partial_line()
            text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with open(self.path, "ab") as handle:
                handle.write(text.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())

    def read_logs(self, log_number_from: int):
        try:
            yield from super().read_logs(log_number_from)
        except ValueError as err:  # json.JSONDecodeError, or Optuna's "Invalid log format."
            raise DamagedJournal(
                f"Journal file {self.path} is damaged: {self._first_bad_line()} is not a journal record ({err}); "
                "restore the file from a copy, or remove that line and the trials it leaves unfinished"
            ) from None

    def _first_bad_line(self) -> str:
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    json.loads(line)
                except ValueError:
                    return f"line {number}"
        return "a line"


def _journal_path(url: str) -> pathlib.Path | None:
    """The journal file ``url`` names, or None where it is not one.

    ``journal:PATH`` always names one, and so does a string without a
    scheme that ends in .log or .journal; a string with a scheme
    (``postgresql://…/db.log``) never does. A path that looks like a URL
    (a scheme, or ``user:password@``) is refused rather than created.
    """
    if url.startswith(JOURNAL_PREFIX):
        path = url.removeprefix(JOURNAL_PREFIX)
    elif "://" not in url and url.endswith(JOURNAL_SUFFIXES):
        path = url
    else:
        return None
    if not path or "://" in path or mask_url(path) != path:
        raise ValueError(
            f"Invalid journal file {mask_url(path)!r}: expected a file path, not a URL (scheme:// or user:password@); "
            "pass an RDB URL without journal:, or a plain path as journal:PATH"
        )
    return pathlib.Path(path)


def _stale_callback_argument() -> dict:
    # Optuna ≥ 4.9 names it heartbeat_stale_trial_callback; older releases failed_trial_callback.
    parameters = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    name = next(n for n in ("heartbeat_stale_trial_callback", "failed_trial_callback") if n in parameters)
    return {name: _retry_stale_trial}


def _retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a dead worker's trial again, unless it already died MAX_STALE_RETRIES times."""
    stale_retries = trial.system_attrs.get(STALE_RETRIES, 0)
    if stale_retries < MAX_STALE_RETRIES:
        _queue_retry(study, trial, {STALE_RETRIES: stale_retries + 1})


def _queue_retry(study: optuna.Study, trial: FrozenTrial, system_attrs: dict | None = None) -> None:
    """Queue the failed ``trial`` again with its parameters; the retry knows its original trial (and run directory)."""
    retried = copy.deepcopy(trial)
    carried = {key: value for key, value in trial.system_attrs.items() if key != WORKER}  # not the retry's worker
    retried.system_attrs = {**carried, **(system_attrs or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _RETRY(max_retry=None)(study, retried)


def _original_number(trial: optuna.Trial | FrozenTrial) -> int:
    """The number of the trial this one retries (its own number if none)."""
    frozen = trial if isinstance(trial, FrozenTrial) else trial.study._storage.get_trial(trial._trial_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        number = _RETRY.retried_trial_number(frozen)
    return frozen.number if number is None else number


class _TrialLock:
    """The lock this worker holds on a file of the trial it runs, for as long as the trial runs here.

    The kernel releases a lock when its process ends, however it ends: a lock that another process of this
    machine can take tells it that the trial's worker is gone (:func:`_fail_trials_of_dead_workers`). On a
    file system without locks the trial runs without one (its worker is then known dead by its heartbeat).
    """

    def __init__(self, study: optuna.Study, trial: optuna.Trial, out: pathlib.Path):
        name = hashlib.sha256(study.study_name.encode()).hexdigest()[:8]
        self.path = out / LOCKS_DIR / f"{name}-trial-{trial.number:04d}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle: IO | None = open(self.path, "a")  # held open while the trial runs
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file of its own: free
        except OSError:  # no locks here (ENOLCK, some network file systems)
            self.release()
            return
        trial.storage.set_trial_system_attr(
            trial._trial_id, WORKER, {"host": socket.gethostname(), "pid": os.getpid(), "lock": str(self.path)}
        )

    def release(self) -> None:
        """Once the trial's state is stored (complete, pruned, failed): another worker must never take a
        trial that is still "running" in the storage for dead while this one is finishing it."""
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()  # closing releases the lock
            self.handle = None


def _worker_is_gone(worker: dict | None) -> bool:
    """Whether the worker recorded in a running trial is a process of this machine that has ended: its lock
    file is there and free. A worker of another machine (or one not recorded yet) is never taken for gone:
    its trial waits for its heartbeat to stop."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return False
    try:
        handle = open(worker["lock"], "r+")
    except (OSError, KeyError, TypeError):
        return False  # no lock file: cannot tell
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: the worker is alive (or no locks here: cannot tell)
        pathlib.Path(worker["lock"]).unlink(missing_ok=True)  # the dead worker's; the retry's worker makes its own
        return True


def _fail_trials_of_dead_workers(study: optuna.Study) -> None:
    """Mark failed, and queue again, the running trials whose worker on this machine is gone (killed or crashed:
    SIGKILL after a scheduler's grace period, out of memory); the retry resumes the trial's run directory."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.system_attrs.get(WORKER)
        if not _worker_is_gone(worker):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker took it first, or it ended meanwhile
        number = _original_number(trial)
        print(f"trial {number}: its worker (process {worker.get('pid')}) is gone; it resumes from its run directory",
              flush=True)  # fmt: skip
        _retry_stale_trial(study, study._storage.get_trial(trial._trial_id))


def _pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"Invalid pruner: {name!r}; expected one of {', '.join(PRUNERS)}")


def _suggest(trial: optuna.Trial, name: str, dist) -> Any:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


class QuietInterrupts(logging.Filter):
    """Drop Optuna's log of a trial stopped by Ctrl-C or SIGTERM (its two
    lines: the error with its traceback, then "Trial N failed with value
    None"): the traceback says nothing, the trial is queued to resume, and the
    CLI says in one line how to continue. Other failed trials keep their log."""

    def __init__(self):
        super().__init__()
        self.interrupted: set[str] = set()  # "Trial N" of the trials whose first line was dropped

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        trial = " ".join(message.split()[:2])
        if record.exc_info and isinstance(record.exc_info[1], _Surplus):
            return False  # a surplus trial (see _Places) is no failure: it never started
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self.interrupted.add(trial)
            return False
        if trial in self.interrupted and message.startswith(f"{trial} failed with value"):
            self.interrupted.discard(trial)
            return False
        return True


def run_optuna_sweep(
    base: RunConfig,
    space: SearchSpace,
    *,
    study_name: str,
    out: pathlib.Path,
    trials: int,
    storage: str | None = None,
    metric: str = "valid_loss",
    pruner: str = "median",
    sampler_seed: int | None = 0,
    heartbeat_interval: int = 60,
    grace_period: int = 120,
    progress: bool | None = None,
) -> pathlib.Path:
    """Run (or continue) the study until ``trials`` trials have finished; export its table.

    The study's trials and table live in ``out/study_name``; the default
    SQLite file, ``out/optuna.db``, may hold several studies. Returns the path
    of the exported CSV table. A KeyboardInterrupt is raised again after the
    interrupted trial is queued to resume.
    """
    check_sweep(base, study_name=study_name, trials=trials, metric=metric, sampler_seed=sampler_seed,
                own_checks=lambda: _check_optuna_arguments(heartbeat_interval, grace_period, pruner))  # fmt: skip
    pruner_object, sampler = _pruner(pruner), TrialSeededSampler(sampler_seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, QuietInterrupts) for f in handler.filters):
            handler.addFilter(QuietInterrupts())
    storage_object = make_storage(storage, out, heartbeat_interval, grace_period)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage_object,
        sampler=sampler,
        pruner=pruner_object,
        direction="minimize",
        load_if_exists=True,
    )
    _check_same_setup(study, sweep_setup(base, space))
    study_dir = out / study_name
    study_dir.mkdir(parents=True, exist_ok=True)
    print(f"optuna study {study_name!r} in {mask_url(storage) if storage else out / 'optuna.db'}", flush=True)
    # RDB storages keep heartbeats; with a journal file, workers hold locks instead (sweeps.search.workers).
    has_heartbeat = isinstance(storage_object, optuna.storages.RDBStorage)
    worker = WorkerLock(study_dir / "workers", grace_period)
    with contextlib.nullcontext() if has_heartbeat else worker.held():
        alive = (lambda trial: True) if has_heartbeat else worker.alive
        objective = _Objective(base, space, study_dir, metric, progress, _Places(trials, alive, worker))
        _optimize_until(study, objective, trials, alive, has_heartbeat, heartbeat_interval)
    return export_results(optuna_rows(study), study_dir)


def _optimize_until(study, objective, trials: int, alive, has_heartbeat: bool, heartbeat_interval: int) -> None:
    """Run trials, one at a time, until ``trials`` of them have finished, counting those other workers run."""
    while True:
        _fail_trials_of_dead_workers(study)
        if has_heartbeat:
            # Trials of dead workers become stale, fail, and are queued again.
            # (study._storage is Optuna's caching wrapper, not the RDBStorage.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        else:
            _fail_dead_trials(study, alive)
        every = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in every)
        running = sum(t.state == TrialState.RUNNING and alive(t) for t in every)
        waiting = sum(t.state == TrialState.WAITING for t in every)
        if finished >= trials:
            return
        if finished + running >= trials and not waiting:
            # Other workers (or dead ones, until their heartbeat goes stale)
            # hold the remaining trials: wait for them.
            print(f"waiting for {running} running trial(s) held by other workers", flush=True)
            time.sleep(max(1, heartbeat_interval))
            continue
        objective.number = None
        try:
            study.optimize(objective, n_trials=1, catch=(_Surplus,))
        except KeyboardInterrupt:
            _queue_interrupted(study, objective.number)
            raise
        finally:
            objective.release()


def _fail_dead_trials(study: optuna.Study, alive) -> None:
    """Fail the running trials whose worker is gone and queue them again, as ``fail_stale_trials`` does for
    an RDB storage: a journal file has no heartbeats, so their workers' locks tell (:mod:`sweeps.search.workers`).
    Of workers that find the same dead trial, the journal applies one failure; the others' raise, and only the
    worker whose failure counted queues the retry."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if alive(trial):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile, or another worker failed it first
        _retry_stale_trial(study, study._storage.get_trial(trial._trial_id))


class _Surplus(Exception):
    """A new trial found the study's total already taken by earlier trials (another worker started one first)."""


class _Places:
    """The study's total as places that trials take, in the order the storage numbered them.

    ``--trials N`` is the study's total, never more (SPEC §7); workers that
    start trials at the same moment all see room for one more. So a new trial
    first counts the places taken before it: every earlier trial (a retry
    takes its original's place) that has finished, is queued, or runs with
    a live worker. With N taken, it is surplus: it ends at once, as a failed
    trial with status "surplus" that nothing counts or exports. Of trials
    started together, the lowest-numbered runs, whatever the timing.
    """

    def __init__(self, total: int, alive, worker: WorkerLock):
        self.total, self.alive, self.worker = total, alive, worker

    def taken_before(self, study: optuna.Study, number: int) -> int:
        latest: dict[int, FrozenTrial] = {}
        for trial in study.get_trials(deepcopy=False):  # in order of their numbers
            if trial.number < number:
                latest[_original_number(trial)] = trial
        return sum(self._takes_a_place(study, trial) for trial in latest.values())

    def _takes_a_place(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if trial.state in (*FINISHED, TrialState.WAITING):
            return True
        if trial.state != TrialState.RUNNING:
            return False
        if self.alive(trial):
            return True
        # Its worker is gone, or has just finished it: ask the storage again.
        return study._storage.get_trial(trial._trial_id).state in FINISHED

    def claim(self, trial: optuna.Trial) -> None:
        """Label ``trial`` with this worker, then raise :class:`_Surplus` if the total is taken without it."""
        trial.set_user_attr(WORKER_ATTR, self.worker.label(trial.number))
        if _original_number(trial) != trial.number:
            return  # a retry takes its original's place
        if self.taken_before(trial.study, trial.number) >= self.total:
            trial.set_user_attr("status", SURPLUS)
            raise _Surplus(f"trial {trial.number}: the study's {self.total} trials are taken by earlier ones")


class _Objective:
    """One trial: train its run directory (resuming it if it exists), reporting every evaluation to the pruner."""

    def __init__(self, base: RunConfig, space: SearchSpace, study_dir: pathlib.Path, metric: str,
                 progress: bool | None, places: _Places):  # fmt: skip
        self.base, self.space, self.study_dir, self.metric, self.progress = base, space, study_dir, metric, progress
        self.places = places
        self.number: int | None = None  # the trial this process is running
        self.lock: _TrialLock | None = None  # held while it runs, released once its state is stored

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def run_dir(self, trial: optuna.Trial, original: int) -> pathlib.Path:
        """The trial's run directory: its original's, where it exists (a retry continues it, wherever an older
        locoprop put it), else ``trials/trial-NNNN`` in the study's folder."""
        recorded = trial.user_attrs.get("run_dir")  # a retry inherits its original's attributes
        if recorded and pathlib.Path(recorded).is_dir():
            return pathlib.Path(recorded)
        return self.study_dir / "trials" / f"trial-{original:04d}"

    def __call__(self, trial: optuna.Trial) -> float:
        self.number = trial.number
        self.places.claim(trial)
        self.lock = _TrialLock(trial.study, trial, self.study_dir)
        trial.set_user_attr("status", "running")  # a retry inherits its original's attributes
        params = {name: _suggest(trial, name, dist) for name, dist in self.space.distributions.items()}
        original = _original_number(trial)
        run_dir = self.run_dir(trial, original)
        trial.set_user_attr("run_dir", str(run_dir))
        config = dataclasses.replace(
            self.base, optimizer=self.space.optimizer, hparams=self.space.to_hparams(params), out=str(run_dir)
        )

        reported: set[int] = set()

        def on_evaluation(row: dict) -> bool:
            value, percent = row[self.metric], row[BUDGET_PERCENT]
            # Trials of one study may run different step counts (a time budget): compare them at equal shares.
            # Two evaluations may round to one share (the last two, 1003 steps evaluated every 20): the first counts.
            if math.isfinite(value) and percent not in reported:
                trial.report(value, step=percent)
                reported.add(percent)
            return trial.should_prune()

        try:
            result = train(config, resume=True, on_evaluation=on_evaluation, progress=self.progress)
        except KeyboardInterrupt:
            trial.set_user_attr("status", "interrupted")
            raise
        value = result.summary.get(f"final_{self.metric}")
        status = {"ok": "ok", "stopped": "pruned", "diverged": "diverged"}[result.status]
        trial.set_user_attr("status", status)
        name = f"trial {original}" + (f" (continued as trial {trial.number})" if original != trial.number else "")
        print(f"{name}: {status}, final {self.metric} {value} ({_short(config.hparams)})", flush=True)
        if status != "ok":
            raise optuna.TrialPruned(f"run {status}")
        return value


def _queue_interrupted(study: optuna.Study, number: int | None) -> None:
    """Queue the trial this process was running when interrupted, to resume from its run directory."""
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is None or trial.state != TrialState.FAIL or trial.user_attrs.get("status") != "interrupted":
        return  # interrupted between trials: nothing to resume
    _queue_retry(study, trial)
    print(
        f"interrupted: trial {_original_number(trial)} resumes from {trial.user_attrs['run_dir']} "
        "when the same command runs again",
        flush=True,
    )


def _check_same_setup(study: optuna.Study, setup: dict) -> None:
    """Store the setup with a new study; refuse to continue a study with another one."""
    stored = study.user_attrs.get("setup")
    if stored is not None:
        check_same_setup(stored, setup, f"Study {study.study_name!r}")
        return
    legacy = study.user_attrs.get("sweep")  # studies made before the whole setup was stored: four fields
    if legacy is not None:
        check_same_setup(legacy, {key: setup.get(key) for key in legacy}, f"Study {study.study_name!r}")
    study.set_user_attr("setup", setup)


def optuna_rows(study: optuna.Study) -> list[dict]:
    """One record per trial that ended: a trial and its retries are one, labelled with the original's number.

    The latest attempt gives the status; a trial whose latest attempt is
    still running or queued is left out.
    """
    latest: dict[int, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False):  # in order of their numbers
        latest[_original_number(trial)] = trial
    rows = []
    for number, trial in sorted(latest.items()):
        if trial.user_attrs.get("status") == SURPLUS:
            continue  # never trained: not a trial of the study's total
        if trial.state in FINISHED:
            status = trial.user_attrs["status"]  # set before the objective returns or prunes
        elif trial.state == TrialState.FAIL:
            status = "interrupted" if trial.user_attrs.get("status") == "interrupted" else "failed"
        else:
            continue
        rows.append({"trial": number, "run_dir": trial.user_attrs.get("run_dir"), "status": status})
    return rows


def _short(hparams: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hparams.items())
