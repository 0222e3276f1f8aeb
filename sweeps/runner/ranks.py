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
"""

from __future__ import annotations

import gc
import os
import pathlib
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["Ranks", "init_from_environment", "launch"]


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

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of ``value`` over ranks: each rank's loss is of its shard."""
        if not self.many:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.item() / self.size

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
    """Run ``function(*args)`` in ``nproc`` new processes that form one process group (``--nproc N``)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"Invalid nproc: {nproc!r}; expected an integer ≥ 1")
    if _backend(device) == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"Invalid nproc: {nproc}; this machine has {torch.cuda.device_count()} CUDA devices")
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = pathlib.Path(folder) / "rendezvous"
        mp.spawn(_rank_main, args=(nproc, str(rendezvous), device, function, args), nprocs=nproc, join=True)


def _rank_main(rank: int, nproc: int, rendezvous: str, device: str, function: Callable, args: tuple) -> None:
    backend = _backend(device)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    # Each rank gets its share of the cores, as torchrun gives it.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=nproc)
    try:
        function(*args)
    finally:
        # DDP objects left in reference cycles must go before their process group does:
        # destroyed after it, they abort the process.
        gc.collect()
        dist.destroy_process_group()
