"""LocoProp on W ranks of torch.distributed: one step equals the step on the concatenated batch (SPEC §11).

Every local objective Σ D(Δa) + γ·⟨G, Δθ⟩ (:mod:`locoprop.local`) has a
divergence that is a sum over the examples of the *global* batch, of which
each rank records only its shard's inputs, and a linear term in the gradient
G of the global mean loss. G is the mean of the ranks' ``.grad`` (one
all-reduce of the gradients, which DDP has done already when it wraps the
model); each rank's part of a divergence gradient is a sum over its
examples, so the sum over ranks is the whole batch's. The optimizer keeps
parameters and inner-optimizer state identical on every rank by giving every
rank the same summed gradients, and communicates per variant (the cost
model, per unit of shape d_out × d with d = d_in + 1, K local iterations, W
ranks; an all-reduce of n numbers moves about 2n(W−1)/W of them per rank),
besides G (d_out·d numbers, none under DDP):

- M (and S in its batch form): the first iteration's local gradient is γ·G,
  the same on every rank; the K − 1 later divergence gradients are
  all-reduced once per inner iteration: (K − 1)·d_out·d numbers, in one flat
  bucket. On CUDA (``Communicator.overlap``) each unit's (or batched
  group's) gradients go in a bucket of their own instead, started
  asynchronously as soon as they are computed, so that their transfer
  overlaps the computation of the next units' gradients; the inner step
  waits for all of them. On CPU the collective's threads would take the
  cores the computation uses, so one bucket (fewer messages) is the better
  choice there.
  (Solving a unit on one owner rank instead would need its inputs and
  anchors, B·(d_in + d_out) numbers, gathered, and its inner state broadcast
  after, about 2·d_out·d for RMSProp; with the batch sizes that make LocoProp
  worth it, B ≫ K·d_out, the all-reduce is cheaper, and it keeps every rank's
  inner state identical without a broadcast.)
- S in its Gram form: C = x̃ᵀx̃ is all-reduced once per step, d(d+1)/2
  numbers (its lower triangle); the iterations Δθ·C + γ·G then need no
  communication.
- exact S: C once per step; each unit's Cholesky solve (d³/3 FLOPs) runs on
  one owner rank, chosen by a greedy longest-processing-time assignment by
  d³, which broadcasts the step Δ (d_out·d numbers). Amortised
  (``covariance_refresh`` T > 1): C once per T steps, and the owner
  broadcasts (C̄ + λI)⁻¹ (d² numbers) instead of Δ; every rank then takes
  the product G·(C̄ + λI)⁻¹ itself, so the T − 1 steps between refreshes send
  nothing but G.

The parameters outside every unit take their ordinary gradient, averaged
over ranks in the same bucket as G. A batch that is not finite on any rank
is skipped on every rank.

**Scaling.** With the usual per-rank mean loss L_r = (W/B)·Σ_{i∈r} ℓ_i, the
mean of the ranks' gradients is the gradient of the global mean loss
L = (1/B)·Σ_i ℓ_i, which is what DDP's averaged parameter gradients are, so
W ranks with equal shards take exactly the single-process step on the B
examples. A user whose per-rank loss is a *sum* over its examples and who
wants the step of the global sum multiplies each rank's loss by W, as with
DDP. With unequal shards, per-rank means weight every rank equally, not
every example.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["Communicator", "PendingSum", "greedy_owners"]


class Communicator:
    """The ranks of one process group, and the collectives the optimizer needs.

    With one rank (no process group, or a group of size 1) every method is a
    no-op, so the single-process optimizer pays nothing for it.
    """

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.world_size > 1 else 0
        self.bytes_sent = 0  # per rank, by the cost model of the module docstring: what `locoprop bench` reports
        # Per-unit asynchronous all-reduces of the local gradients (None: on CUDA, where they overlap compute).
        self.overlap: bool | None = None

    def overlaps(self, problems) -> bool:
        """Whether the local gradients of ``problems`` go in per-unit asynchronous buckets."""
        if self.overlap is not None:
            return self.overlap
        return any(p.params[0].is_cuda for p in problems)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sum_(self, tensors: list[Tensor]) -> None:
        """All-reduce ``tensors`` in place (sum over ranks), in one flat bucket per dtype and device."""
        if not self.distributed or not tensors:
            return
        buckets: dict[tuple, list[Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.dtype, t.device), []).append(t)
        for bucket in buckets.values():
            self.sum_start(bucket).wait()

    def sum_start(self, tensors: list[Tensor]) -> PendingSum:
        """Start the all-reduce (sum over ranks) of ``tensors`` in one flat bucket without waiting for it;
        ``.wait()`` on the result writes the sums into ``tensors``. (One dtype and device.)"""
        if not self.distributed or not tensors:
            return PendingSum(None, None, [])
        flat = _flatten_dense_tensors(tensors)
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self.bytes_sent += _ring_bytes(flat, self.world_size)
        return PendingSum(work, flat, tensors)

    def sum_lower_(self, squares: list[Tensor], tensors: list[Tensor], mirror: bool = False) -> None:
        """Sum over ranks, in one bucket: the lower triangles of the symmetric ``squares`` (about half their
        numbers) and ``tensors``, in place. With ``mirror`` each square's upper triangle is filled from its
        lower one; without it, it is left as it was (Cholesky reads the lower triangle only)."""
        if not self.distributed:
            return
        lower = [tuple(torch.tril_indices(len(square), len(square), device=square.device)) for square in squares]
        packed = [square[indices] for square, indices in zip(squares, lower)]
        self.sum_(packed + list(tensors))
        for square, (rows, columns), values in zip(squares, lower, packed):
            square[rows, columns] = values
            if mirror:
                square[columns, rows] = values

    def mean_(self, tensors: list[Tensor]) -> None:
        """All-reduce ``tensors`` in place to their mean over ranks."""
        if not self.distributed or not tensors:
            return
        self.sum_(tensors)
        torch._foreach_div_(tensors, self.world_size)

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank."""
        if not self.distributed:
            return flag
        value = torch.tensor([0.0 if flag else 1.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return value.item() == 0.0

    def broadcast_(self, tensor: Tensor, owner: int) -> None:
        """Overwrite ``tensor`` on every rank with the ``owner`` rank's (a rank of this group)."""
        if not self.distributed:
            return
        if not tensor.is_contiguous():
            raise ValueError("broadcast_ needs a contiguous tensor: a strided one would arrive in another layout")
        source = dist.get_global_rank(self.group, owner) if self.group is not None else owner
        dist.broadcast(tensor, src=source, group=self.group)
        self.bytes_sent += tensor.numel() * tensor.element_size() if self.rank == owner else 0


class PendingSum:
    """An all-reduce in flight (:meth:`Communicator.sum_start`)."""

    def __init__(self, work, flat: Tensor | None, tensors: list[Tensor]):
        self.work, self.flat, self.tensors = work, flat, tensors

    def wait(self) -> None:
        """Wait for the sums and write them into the tensors."""
        if self.work is None:
            return
        self.work.wait()
        for t, reduced in zip(self.tensors, _unflatten_dense_tensors(self.flat, self.tensors)):
            t.copy_(reduced)
        self.work = None


def greedy_owners(costs: list[float], ranks: int) -> list[int]:
    """The rank that does each job: longest job first, to the least-loaded rank (the LPT rule)."""
    load = [0.0] * ranks
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: -costs[j]):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[job] = rank
        load[rank] += costs[job]
    return owners


def _ring_bytes(flat: Tensor, world_size: int) -> int:
    """Bytes a rank sends in a ring all-reduce of ``flat``: 2(W−1)/W of it."""
    return 2 * (world_size - 1) * flat.numel() * flat.element_size() // world_size
