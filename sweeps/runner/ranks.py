"""Data-parallel runs (SPEC §7, §11): the ranks of torch.distributed, and ``locoprop train --nproc N``.

A run on W ranks has the same config, directory and records as a run in
one process: ``batch_size`` is the global batch, which every rank cuts into
W equal shards; the model starts identical on every rank (same seed);
LocoProp communicates itself (:mod:`locoprop.distributed`), the other
optimizers get their gradients averaged by DDP. Rank 0 writes the run
directory; every rank evaluates the same model (so that every rank takes the
same decisions) and resumes from rank 0's checkpoint. The processes come from
``torchrun --nproc-per-node N`` (the CLI joins the group from its
environment) or from :func:`launch` (``--nproc N``). NCCL on CUDA, gloo on CPU.

:func:`launch` is the parent of its ranks:

- SIGINT and SIGTERM sent to it (a scheduler signals a job's main process)
  are passed on to every rank, and the ranks stop together after the same
  step (:mod:`sweeps.interrupts`); it then raises
  :class:`~sweeps.interrupts.Interrupted`.
- A rank that fails reports its cause; the others, whose collectives then
  fail ("Connection closed by peer"), are given :data:`GRACE_SECONDS` to
  end by themselves, then stopped. One cause is raised, the failing rank's
  own (:func:`root_cause`): :class:`RankRefused` (a ValueError) for a
  refusal, as bad input, :class:`RankFailed` otherwise, a rank killed by a
  signal included. No traceback reaches the terminal.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import pathlib
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from sweeps import interrupts
from sweeps.extras import MissingExtra
from sweeps.runner.data import DataUnavailable
from sweeps.runner.run_directory import first_line

__all__ = ["GRACE_SECONDS", "RankFailed", "RankRefused", "Ranks", "init_from_environment", "launch", "root_cause"]

# Once a rank has failed, how long the others may take to end by themselves (their collectives fail at once)
# before they are sent SIGTERM, and then SIGKILL.
GRACE_SECONDS = 10.0
# Exceptions that refuse a run as bad input (the CLI's exit status 2), on a rank as in one process.
REFUSALS = (ValueError, DataUnavailable, MissingExtra, OSError)
# What the collectives of the other ranks raise when a rank has ended: torch.distributed's DistError, or a
# RuntimeError from deep inside gloo (DDP's hooks in backward raise it plain), known by its text.
LOST_PEER_TEXTS = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "NCCL communicator")
# The packages whose frames say where a rank failed (the innermost of them; a torch frame would not).
PROJECT_PACKAGES = ("locoprop", "baselines", "sweeps", "analysis")


class RankFailed(RuntimeError):
    """A rank of a :func:`launch` failed, or died; the message is one line naming the rank and its cause."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


class RankRefused(ValueError):
    """A rank of a :func:`launch` refused the run as bad input (a ValueError there); the message is that
    rank's, naming it."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


class Ranks:
    """This process's place among the ranks of the run (one rank when torch.distributed is not initialised)."""

    def __init__(self):
        self.size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.size > 1 else 0

    @property
    def many(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run directory: rank 0."""
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's part of a global batch of ``batch_size`` rows."""
        per_rank = batch_size // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def mean_and_signal(self, value: float, signum: int | None, device: torch.device) -> tuple[float, int | None]:
        """The mean of ``value`` over ranks (each rank's loss is of its shard), and the signal that any rank
        noted (``signum`` here; SIGTERM before SIGINT), in one all-reduce: what the ranks decide on together."""
        if not self.many:
            return value, signum
        flags = [float(signum == s) for s in interrupts.SIGNALS]
        tensor = torch.tensor([value, *flags], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        noted = [s for s, count in zip(interrupts.SIGNALS, tensor[1:].tolist()) if count > 0]
        return tensor[0].item() / self.size, max(noted) if noted else None

    def max(self, value: float, device: torch.device) -> float:
        if not self.many:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def barrier(self) -> None:
        if self.many:
            dist.barrier()


def _backend(device: str) -> str:
    return "nccl" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "gloo"


def init_from_environment(device: str = "auto") -> bool:
    """Join the process group that ``torchrun`` describes in the environment; whether there is one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = _backend(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://")
    return True


def launch(nproc: int, device: str, function: Callable, *args) -> None:
    """Run ``function(*args)`` in ``nproc`` new processes that form one process group (``--nproc N``).

    Raises:
        ValueError: a bad ``nproc``, before any process starts.
        sweeps.interrupts.Interrupted: SIGINT or SIGTERM reached this process (it passed it on to the ranks,
            which stopped together) or every rank.
        RankRefused, RankFailed: a rank failed; its own cause (:func:`root_cause`), in one line.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"Invalid nproc: {nproc!r}; expected an integer ≥ 1")
    if _backend(device) == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"Invalid nproc: {nproc}; this machine has {torch.cuda.device_count()} CUDA devices")
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        processes = [
            context.Process(target=_rank_main, args=(rank, nproc, folder, device, function, args), name=f"rank-{rank}")
            for rank in range(nproc)
        ]
        with _passed_on(processes) as received:
            for process in processes:
                process.start()
            if received:  # a signal that came while some ranks were not started yet
                _signal_all(processes, received[0])
            ended = _wait(processes)
        outcomes = [_outcome(process, folder, ended.get(rank)) for rank, process in enumerate(processes)]
    if received and not any(o.kind in (_FAILED, _REFUSED) for o in outcomes):
        raise interrupts.Interrupted(received[0])
    if all(o.kind == _DONE for o in outcomes):
        return
    cause = root_cause(outcomes)
    if cause.kind == _INTERRUPTED:
        raise interrupts.Interrupted(cause.signum)
    alike = [o.rank for o in outcomes if (o.kind, o.text) == (cause.kind, cause.text)]  # a refusal of every rank
    who = f"rank {alike[0]}" if len(alike) == 1 else f"ranks {', '.join(map(str, alike[:-1]))} and {alike[-1]}"
    message = f"{who} of {nproc} {cause.text}"
    raise RankRefused(message, cause.rank) if cause.kind == _REFUSED else RankFailed(message, cause.rank)


# How a rank ended, most telling first: an error of its own, a refusal, death by a signal, an error of its
# collectives (a consequence of another rank's end), a signal it was asked to stop by; or done.
_FAILED, _REFUSED, _KILLED, _COMMUNICATION, _INTERRUPTED, _DONE = (
    "failed", "refused", "killed", "communication", "interrupted", "done",
)  # fmt: skip
_RANKING = (_FAILED, _REFUSED, _KILLED, _COMMUNICATION, _INTERRUPTED, _DONE)


@dataclasses.dataclass(frozen=True)
class RankOutcome:
    """How one rank ended: its kind (see _RANKING), when (time.time()), and in words."""

    rank: int
    kind: str
    time: float
    text: str = ""
    signum: int | None = None


def root_cause(outcomes: list[RankOutcome]) -> RankOutcome:
    """The rank whose end explains the others': the most telling kind, and the earliest of that kind.

    A rank that fails makes the collectives of the others fail ("Connection closed by peer"); those errors,
    which rank 0 may meet first, are never the cause while a rank has one of its own.
    """
    return min(outcomes, key=lambda o: (_RANKING.index(o.kind), o.time, o.rank))


def _outcome(process, folder: str, ended_at: float | None) -> RankOutcome:
    rank = int(process.name.removeprefix("rank-"))
    report = pathlib.Path(folder) / f"rank-{rank}.json"
    if report.is_file():
        return RankOutcome(rank=rank, **json.loads(report.read_text()))
    code = process.exitcode
    when = ended_at if ended_at is not None else time.time()
    if code == 0:
        return RankOutcome(rank, _DONE, when)
    if code is not None and code < 0:
        return RankOutcome(rank, _KILLED, when, f"was killed by {interrupts.signal_name(-code)}", -code)
    return RankOutcome(rank, _FAILED, when, f"exited with status {code} before reporting why")


def _wait(processes: list) -> dict[int, float]:
    """Wait until every process has ended; once one has failed, give the others GRACE_SECONDS to end, then
    SIGTERM, then after as long again SIGKILL. Returns when each rank ended (time.time())."""
    ended: dict[int, float] = {}
    failed_at = None
    stage = 0  # 1: the survivors were sent SIGTERM, 2: SIGKILL
    while len(ended) < len(processes):
        live = [p for rank, p in enumerate(processes) if rank not in ended]
        wait([p.sentinel for p in live], timeout=0.2)
        for rank, process in enumerate(processes):
            if rank not in ended and process.exitcode is not None:
                ended[rank] = time.time()
                if process.exitcode != 0 and failed_at is None:
                    failed_at = time.monotonic()
        if failed_at is not None and len(ended) < len(processes):
            waited = time.monotonic() - failed_at
            if stage < 1 and waited > GRACE_SECONDS:
                _signal_all(processes, signal.SIGTERM)
                stage = 1
            elif stage < 2 and waited > 2 * GRACE_SECONDS:
                _signal_all(processes, signal.SIGKILL)
                stage = 2
    for process in processes:
        process.join()
    return ended


def _signal_all(processes: list, signum: int) -> None:
    for process in processes:
        if process.pid is not None and process.exitcode is None:
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:  # it ended meanwhile
                pass


class _passed_on:
    """While open, SIGINT and SIGTERM sent to this process are passed on to ``processes``; what came is listed."""

    def __init__(self, processes: list):
        self.processes = processes
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}

    def _pass_on(self, signum: int, frame) -> None:
        self.received.append(signum)
        _signal_all(self.processes, signum)

    def __enter__(self) -> list[int]:
        if interrupts.in_main_thread():
            self.previous = {signum: signal.signal(signum, self._pass_on) for signum in interrupts.SIGNALS}
        return self.received

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _rank_main(rank: int, nproc: int, folder: str, device: str, function: Callable, args: tuple) -> None:
    """One rank: ``function(*args)`` in the process group; how it ended goes to ``folder``/rank-R.json and
    its exit status (0, 1 failed, 2 refused, 128 + signal interrupted), never as a traceback."""
    with interrupts.handled():
        try:
            _run_rank(rank, nproc, folder, device, function, args)
        except BaseException as err:
            outcome = _report(rank, err)
            (pathlib.Path(folder) / f"rank-{rank}.json").write_text(
                json.dumps({k: v for k, v in dataclasses.asdict(outcome).items() if k != "rank"})
            )
            sys.exit(128 + outcome.signum if outcome.kind == _INTERRUPTED else 2 if outcome.kind == _REFUSED else 1)


def _run_rank(rank: int, nproc: int, folder: str, device: str, function: Callable, args: tuple) -> None:
    backend = _backend(device)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # Each rank gets its share of the cores, as torchrun gives it.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    # tqdm's default lock is a multiprocessing semaphore, registered with the parent's resource tracker: a rank
    # killed hard would leave it behind, and the tracker would warn about it. A rank's bars need no such lock.
    tqdm.set_lock(threading.RLock())
    rendezvous = pathlib.Path(folder) / "rendezvous"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=nproc)
    try:
        function(*args)
    finally:
        # DDP objects left in reference cycles must go before their process group does:
        # destroyed after it, they abort the process.
        gc.collect()
        dist.destroy_process_group()


def _report(rank: int, err: BaseException) -> RankOutcome:
    """How the rank ended with ``err``, in one line."""
    now = time.time()
    if isinstance(err, KeyboardInterrupt):
        signum = getattr(err, "signum", signal.SIGINT)
        return RankOutcome(rank, _INTERRUPTED, now, f"was interrupted by {interrupts.signal_name(signum)}", signum)
    if isinstance(err, REFUSALS):
        return RankOutcome(rank, _REFUSED, now, f"refused the run: {err}")
    if isinstance(err, dist.DistError) or any(text in str(err) for text in LOST_PEER_TEXTS):
        return RankOutcome(rank, _COMMUNICATION, now, f"lost its peers: {first_line(err)}")
    return RankOutcome(rank, _FAILED, now, f"failed: {first_line(err)}{_where(err)}")


def _where(err: BaseException) -> str:
    """ " (at sweeps/runner/train.py:123)": the innermost frame of the project's own code that raised ``err``."""
    frames = traceback.extract_tb(err.__traceback__)
    root = pathlib.Path(__file__).resolve().parents[2]
    for frame in reversed(frames):
        path = pathlib.Path(frame.filename).resolve()
        if path.is_relative_to(root) and path.relative_to(root).parts[0] in PROJECT_PACKAGES:
            return f" (at {path.relative_to(root)}:{frame.lineno})"
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
