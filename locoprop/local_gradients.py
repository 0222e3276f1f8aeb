"""How the local gradients of all units are computed in one inner iteration.

A unit's local gradient is Σ Jᵀr + γ·G (+ λΔθ) (:mod:`locoprop.local`). At
the first inner iteration Δθ = 0 and it is γ·G, with nothing to compute;
a :class:`LocalGradients` plan, built once per step from the units' stored
inputs and anchors, gives Σ Jᵀr + γ·G at the current parameters for every
later iteration (the caller adds λΔθ). Three ways (``parallel``):

- "none": the readable reference, :func:`locoprop.local.divergence_grads`
  (the layer's vector-Jacobian product by autograd), one unit after the other;
- "batched": linear units without autograd (:mod:`locoprop.kernels`);
  variant S through its Gram statistics where that costs fewer FLOPs;
  linear units of equal shape and transfer function stacked into batched
  matmuls; a matrix unit whose uses took blocks of its weight (a mixture of
  experts, cross-attention) one use after the other, each into its block;
- "streams" (CUDA): as "batched", with each group of units issued on its own
  CUDA stream so that units of different shapes run concurrently.

With a ``compute_dtype`` (``local_dtype="bfloat16"``) every path runs the
matmuls of linear and convolution units in it (:mod:`locoprop.kernels`, "Low
precision"); an embedding unit's map is a gather, with nothing to gain, and
keeps the parameters' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

from locoprop import kernels, local
from locoprop.distributed import Communicator
from locoprop.fused import ResidualKernel, residual_kernel
from locoprop.layers import MATRIX_KINDS, Block
from locoprop.problem import LocalProblem

__all__ = ["PARALLEL_MODES", "LocalGradients", "input_rows", "uses_gram_form"]

PARALLEL_MODES = ("auto", "batched", "streams", "none")


@dataclasses.dataclass(eq=False)
class _Work:
    """Computes the local gradients (without λΔθ) of one or more units: problems -> grads."""

    problems: list[LocalProblem]
    compute: Callable[[], list[list[Tensor]]]
    # On several ranks: whether ``compute`` gives the whole batch's gradients
    # already (the Gram form, from statistics summed once), not this rank's part.
    whole_batch: bool = False


class LocalGradients:
    """The local gradients Σ Jᵀr + γ·G (without λΔθ) of a step's unit problems, by the chosen method.

    Args:
        problems: the units' problems of this step (their ``params``,
            ``old_params``, ``inputs``, ``anchors``, ``linear_term`` and γ).
        mode: "none", "batched" or "streams".
        comm: the ranks (:mod:`locoprop.distributed`): each rank computes its
            examples' part of every divergence gradient (rank 0 adds γ·G,
            the same on every rank), and the parts are summed over ranks in
            one bucket per iteration; the Gram form sums its statistic C once
            instead.
        compute_dtype: the dtype of the units' matmuls (bfloat16), or None for the parameters' own.
        fused: compute the linear kernels' residuals (M's f(a^old + Δa) − f(a^old), its rounding and Σr) in
            one compiled pass (:mod:`locoprop.fused`) where the transfer function has one.

    A problem's ``gram_form`` (from :func:`uses_gram_form`) selects the Gram form of S.
    """

    def __init__(
        self,
        problems: list[LocalProblem],
        mode: str,
        comm: Communicator | None = None,
        compute_dtype: torch.dtype | None = None,
        fused: bool = False,
    ):
        self.mode = mode
        self.fused = fused
        self.comm = comm if comm is not None else Communicator()
        self.overlap = self.comm.distributed and self.comm.overlaps(problems)
        # γ·G joins the gradients of one rank only: the ranks' parts are summed.
        self.share = 1.0 if self.comm.rank == 0 else 0.0
        self.work: list[_Work] = []
        if mode == "none":
            self.work = [_Work([p], self._reference(p, _low(p, compute_dtype))) for p in problems]
            return
        batchable: dict[tuple, list[tuple[LocalProblem, Tensor, tuple[Tensor, ...]]]] = {}
        for problem in problems:
            low, rows = _low(problem, compute_dtype), _reads_rows(problem)
            if problem.by_blocks and problem.unit.kind in MATRIX_KINDS and rows:
                self.work.append(_Work([problem], self._blocks(problem, low)))
                continue
            if problem.unit.kind != "linear" or problem.by_blocks or not rows:
                self.work.append(_Work([problem], self._reference(problem, low)))
                continue
            if problem.gram_form:
                self.work.append(self._gram(problem, low))
                continue
            adapter = problem.unit.adapter
            x = kernels.concat_rows([adapter.input_rows(x) for x in problem.inputs])
            anchor = tuple(kernels.concat_rows([adapter.output_rows(t) for t in parts])
                           for parts in zip(*problem.anchors))  # fmt: skip
            key = (tuple(problem.params[0].shape), len(problem.params), tuple(x.shape), problem.unit.transfer.name,
                   problem.variant, x.dtype, x.device, low)  # fmt: skip
            batchable.setdefault(key, []).append((problem, x, anchor, low))
        # Linear units run one after another, except on streams: then one
        # pre-activation buffer serves them all.
        scratch = _Scratch(shared=mode != "streams")
        for group in batchable.values():
            # (the low-precision kernels' rows, centred and rounded once a step)
            low = group[0][3]
            group = [(problem, x if low is None else kernels.low_precision_rows(x, low), anchor)
                     for problem, x, anchor, _ in group]  # fmt: skip
            if len(group) == 1:
                self.work.append(self._linear(*group[0], scratch))
            else:
                self.work.append(self._batched(group, scratch))

    def __call__(self, active: set) -> dict[LocalProblem, list[Tensor]]:
        """Local gradients (without λΔθ) of the ``active`` problems at the current parameters."""
        todo = [w for w in self.work if any(p in active for p in w.problems)]
        if self.mode == "streams" and len(todo) > 1:
            grads = self._on_streams(todo)
        elif self.overlap:
            return self._overlapped(todo)
        else:
            grads = {p: g for w in todo for p, g in zip(w.problems, w.compute())}
        if self.comm.distributed:
            self.comm.sum_([g for w in todo if not w.whole_batch for p in w.problems for g in grads[p]])
        return grads

    def _overlapped(self, todo: list[_Work]) -> dict[LocalProblem, list[Tensor]]:
        """The local gradients, each work item's summed over ranks in its own asynchronous bucket, on its
        way while the next items compute theirs (NCCL runs it on its own stream)."""
        grads, pending = {}, []
        for w in todo:
            grads.update(zip(w.problems, w.compute()))
            if not w.whole_batch:
                pending.append(self.comm.sum_start([g for p in w.problems for g in grads[p]]))
        for transfer in pending:
            transfer.wait()
        return grads

    # ------------------------------------------------------------ kernels
    # The kernels capture what they need, not ``self``: a plan -> kernel ->
    # plan cycle would keep every buffer of a step alive until the garbage
    # collector ran, into the next step.
    def _reference(self, problem: LocalProblem, low: torch.dtype | None) -> Callable[[], list[list[Tensor]]]:
        unit, variant, scale = problem.unit, problem.variant, problem.activation_lr * self.share

        def compute():
            delta = [p.detach() - q for p, q in zip(problem.params, problem.old_params)]
            grads = None
            for layer, uses in problem.uses_by_map():  # (one map, unless the uses took blocks of rows)
                part = local.divergence_grads(variant, unit.transfer, layer.forward, delta, uses, low,
                                              centred=unit.kind in MATRIX_KINDS)  # fmt: skip
                grads = part if grads is None else torch._foreach_add(grads, part)
            torch._foreach_add_(grads, problem.linear_terms(), alpha=scale)
            return [grads]

        return compute

    def _blocks(self, problem: LocalProblem, low: torch.dtype | None) -> Callable[[], list[list[Tensor]]]:
        """A matrix unit whose uses took blocks of its weight (experts of a stacked weight, cross-attention's
        rows): γ·G, plus each use's Jᵀr added into its block, without autograd. Rows of a = x·Wᵀ + b are W's
        rows (F.linear), of a = x·W + b its columns (a matmul), which is x·(Wᵀ)ᵀ. With ``low`` each use's two
        products run in it, on rows centred once a step (:func:`~locoprop.kernels.low_precision_divergence_grads`)."""
        unit, variant, scale = problem.unit, problem.variant, problem.activation_lr * self.share
        linear, adapter = unit.kind == "linear", unit.adapter
        uses, shared = [], _SharedBuffers()  # (the uses run one after another: one set of buffers serves them)
        for block, (x, anchor) in zip(problem.blocks, problem.uses):
            block = block if block is not None else Block((), 0, problem.params[0].shape[0])  # (the whole weight)
            rows = adapter.input_rows(x)
            if low is not None:
                d_out = block.of(problem.params[0]).shape[0 if linear else -1]
                rows = _LowPrecisionUse(kernels.low_precision_rows(rows, low), d_out, shared)
            uses.append((block, rows, tuple(adapter.output_rows(t) for t in anchor)))

        def compute():
            delta = [p.detach() - q for p, q in zip(problem.params, problem.old_params)]
            grads = torch._foreach_mul(problem.linear_terms(), scale)
            for block, x, anchor in uses:
                weight, weight_grad = block.of(delta[0]), block.of(grads[0])
                if not linear:  # (as a = x·Wᵀ: d_out × d_in)
                    weight, weight_grad = weight.T, weight_grad.T
                bias_block = block.bias_block(unit.kind, weight.shape[0])
                bias = bias_block.of(delta[1]) if len(delta) > 1 and block.bias else None
                if low is not None:
                    weight_part, r_sum = x.divergence_grads(variant, unit.transfer, anchor, weight, bias)
                    weight_grad.add_(weight_part)
                else:
                    delta_a = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
                    r = delta_a if variant == "S" else unit.transfer.change_from(anchor, delta_a)
                    weight_grad.addmm_(r.T, x)
                    r_sum = r.sum(0) if bias is not None else None
                if r_sum is not None:
                    bias_block.of(grads[1]).add_(r_sum)
            return [grads]

        return compute

    def _residual_kernel(self, problem: LocalProblem, low: bool, shape: tuple[int, ...]) -> ResidualKernel | None:
        """The compiled residual pass of ``problem``'s linear kernel (of outputs of ``shape``), if fused and one
        saves passes."""
        if not self.fused:
            return None
        return residual_kernel(problem.variant, problem.unit.transfer, low, math.prod(shape))

    def _linear(self, problem: LocalProblem, x, anchor: tuple, scratch: _Scratch) -> _Work:
        """``x``: the rows, or their :class:`~locoprop.kernels.LowPrecisionRows`."""
        transfer, variant = problem.unit.transfer, problem.variant
        grads = [torch.empty_like(p) for p in problem.params]
        delta = [torch.empty_like(p) for p in problem.params]
        linear_term, scale = problem.linear_terms(), problem.activation_lr * self.share
        low = isinstance(x, kernels.LowPrecisionRows)
        shape = ((x.centered if low else x).shape[0], problem.params[0].shape[0])  # (of Δa: rows × d_out)
        fused = self._residual_kernel(problem, low, shape)
        if low:
            product, delta_a = scratch.reserve(shape, x.centered), _delta_a_buffer(scratch, shape, problem, fused)
            buffers = kernels.low_precision_buffers(x, problem.params[0])

            def compute():
                for d, p, old in zip(delta, problem.params, problem.old_params):
                    torch.sub(p.detach(), old, out=d)
                return [kernels.low_precision_divergence_grads(variant, transfer, x, anchor, *_weight_and_bias(delta),
                                                               product(), delta_a(), buffers, grads, linear_term,
                                                               scale, fused)]  # fmt: skip

            return _Work([problem], compute)
        delta_a = scratch.reserve(shape, x)

        def compute():
            for d, p, old in zip(delta, problem.params, problem.old_params):
                torch.sub(p.detach(), old, out=d)
            return [kernels.divergence_grads(variant, transfer, x, anchor, *_weight_and_bias(delta),
                                             [delta_a(), *grads], linear_term, scale, fused)]  # fmt: skip

        return _Work([problem], compute)

    def _gram(self, problem: LocalProblem, low: torch.dtype | None) -> _Work:
        has_bias = len(problem.params) == 2
        # Low precision centres C in the parameters' dtype, so it needs Σx and N: the bias row, always.
        covariance = kernels.gram_covariance(input_rows(problem), has_bias or low is not None)
        self.comm.sum_lower_([covariance], [], mirror=True)  # the whole batch's C, once a step
        grads = [torch.empty_like(p) for p in problem.params]
        delta = [torch.empty_like(p) for p in problem.params]
        linear_term, activation_lr = problem.linear_terms(), problem.activation_lr
        if low is not None:
            gram = kernels.low_precision_gram(covariance, low)
            delta_weight_low = torch.empty_like(problem.params[0], dtype=low)

            def compute():
                for d, p, old in zip(delta, problem.params, problem.old_params):
                    torch.sub(p.detach(), old, out=d)
                return [kernels.low_precision_gram_grads(gram, *_weight_and_bias(delta), linear_term, activation_lr,
                                                         delta_weight_low, grads)]  # fmt: skip

            return _Work([problem], compute, whole_batch=True)

        def compute():
            for d, p, old in zip(delta, problem.params, problem.old_params):
                torch.sub(p.detach(), old, out=d)
            return [kernels.gram_grads(covariance, *_weight_and_bias(delta), linear_term, activation_lr, grads)]

        return _Work([problem], compute, whole_batch=True)

    def _batched(self, group: list[tuple[LocalProblem, Tensor, tuple]], scratch: _Scratch) -> _Work:
        problems = [g[0] for g in group]
        transfer, variant = problems[0].unit.transfer, problems[0].variant
        low = isinstance(group[0][1], kernels.LowPrecisionRows)
        if low:
            rows = kernels.LowPrecisionRows(*(torch.stack(parts) for parts in zip(*(g[1] for g in group))))
        x = rows.centered if low else torch.stack([g[1] for g in group])
        anchor = tuple(torch.stack(parts) for parts in zip(*(g[2] for g in group)))
        old = [torch.stack(parts) for parts in zip(*(p.old_params for p in problems))]
        # γ·G of each unit, stacked: γ may differ between the units (their param groups).
        linear_term = [torch.stack(parts) for parts in zip(*(
            [g * (p.activation_lr * self.share) for g in p.linear_terms()] for p in problems))]  # fmt: skip
        delta = [torch.empty_like(o) for o in old]
        shape = (*x.shape[:2], old[0].shape[1])
        delta_a = scratch.reserve(shape, x)
        grads = [torch.empty_like(o) for o in old]
        fused = self._residual_kernel(problems[0], low, shape)
        if low:
            buffers = kernels.low_precision_buffers(rows, old[0])
            delta_a_full = _delta_a_buffer(scratch, shape, problems[0], fused)

        def compute():
            # Δθ of every unit, stacked into the same buffers each time.
            for d, o, parts in zip(delta, old, zip(*(p.params for p in problems))):
                for i, q in enumerate(parts):
                    torch.sub(q.detach(), o[i], out=d[i])
            if low:
                kernels.low_precision_divergence_grads(
                    variant,
                    transfer,
                    rows,
                    anchor,
                    *_weight_and_bias(delta),
                    delta_a(),
                    delta_a_full(),
                    buffers,
                    grads,
                    linear_term,
                    1.0,
                    fused,
                )
            else:
                kernels.divergence_grads(variant, transfer, x, anchor, *_weight_and_bias(delta), [delta_a(), *grads],
                                         linear_term, 1.0, fused)  # fmt: skip
            return [list(unit_grads) for unit_grads in zip(*(g.unbind(0) for g in grads))]

        return _Work(problems, compute)

    def _on_streams(self, todo: list[_Work]) -> dict[LocalProblem, list[Tensor]]:
        main = torch.cuda.current_stream()
        results: dict[LocalProblem, list[Tensor]] = {}
        streams = [torch.cuda.Stream() for _ in todo]
        for work, stream in zip(todo, streams):
            stream.wait_stream(main)  # inputs written on the main stream
            with torch.cuda.stream(stream):
                for problem, grads in zip(work.problems, work.compute()):
                    results[problem] = grads
        for stream in streams:
            main.wait_stream(stream)
        for grads in results.values():
            for g in grads:
                g.record_stream(main)  # used and freed on the main stream
        return results


def uses_gram_form(problem: LocalProblem, mode: str, local_iters: int, ranks: int = 1) -> bool:
    """Whether the plan solves ``problem`` in the Gram form of variant S, on ``ranks`` ranks
    (:func:`locoprop.kernels.gram_is_cheaper`)."""
    if problem.variant != "S" or mode == "none" or problem.unit.kind != "linear" or problem.by_blocks:
        return False
    rows = sum(problem.unit.adapter.input_rows(x).shape[0] for x in problem.inputs)
    d_out, d_in = problem.params[0].shape
    return kernels.gram_is_cheaper(rows, d_in, d_out, local_iters, ranks)


def input_rows(problem: LocalProblem) -> Tensor:
    """A linear unit's recorded inputs x, as rows.

    A layer used several times has its inputs joined once: the joined rows
    replace them in ``problem.inputs`` (its objective sums over rows), so C
    and the solves do not each copy them again.
    """
    adapter = problem.unit.adapter
    x = kernels.concat_rows([adapter.input_rows(x) for x in problem.inputs])
    problem.inputs = [x]
    if problem.anchors and any(problem.anchors[0]):
        joined = tuple(kernels.concat_rows([adapter.output_rows(t) for t in parts]) for parts in zip(*problem.anchors))
        problem.anchors = [joined]
    else:
        problem.anchors = [()]
    return x


class _Scratch:
    """Pre-activation buffers of the linear kernels, reserved when a plan is
    built and allocated at first use: one buffer of the largest size when the
    kernels run one after another (``shared``), else one per kernel."""

    def __init__(self, shared: bool):
        self.shared = shared
        self.numel: dict[tuple, int] = {}
        self.buffers: dict[tuple, Tensor] = {}

    def reserve(self, shape: tuple[int, ...], like: Tensor) -> Callable[[], Tensor]:
        numel = math.prod(shape)
        key = (like.dtype, like.device) if self.shared else (len(self.numel),)
        self.numel[key] = max(self.numel.get(key, 0), numel)

        def buffer() -> Tensor:
            if key not in self.buffers:
                self.buffers[key] = like.new_empty(self.numel[key])
            return self.buffers[key][:numel].view(shape)

        return buffer


def _reads_rows(problem: LocalProblem) -> bool:
    """Whether the unit's residual can be computed on its output's rows, as the matrix kernels do: under S, and
    for every elementwise transfer function and the softmax over the last dimension; a softmax over another
    dimension (attention pooling's, over positions) needs the output's own shape (the reference path)."""
    return problem.variant == "S" or problem.unit.transfer.softmax_dim in (None, -1)


def _low(problem: LocalProblem, compute_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype of ``problem``'s matmuls when it differs from its parameters' (None: theirs): an embedding's
    gather has no matmul to speed up."""
    if compute_dtype is None or problem.unit.kind == "embedding" or compute_dtype == problem.params[0].dtype:
        return None
    return compute_dtype


class _SharedBuffers:
    """The buffers of one unit's block uses in the compute dtype, which run one after another: per matrix shape
    its rounded ΔW, rᵀx and results; per dtype one buffer of rows × d_out, of the largest size asked."""

    def __init__(self):
        self.by_shape: dict[tuple, tuple] = {}
        self.rows = _Scratch(shared=True)

    def for_weight(self, rows: kernels.LowPrecisionRows, weight: Tensor) -> tuple:
        key = tuple(weight.shape)
        if key not in self.by_shape:
            self.by_shape[key] = (kernels.low_precision_buffers(rows, weight),
                                  [torch.empty(weight.shape, dtype=weight.dtype, device=weight.device),
                                   torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)])  # fmt: skip
        return self.by_shape[key]


class _LowPrecisionUse:
    """One use of a block in the compute dtype: its centred rows, and the buffers of its products (shared with
    the unit's other uses, allocated at the first iteration and kept for the step's others)."""

    def __init__(self, rows: kernels.LowPrecisionRows, d_out: int, shared: _SharedBuffers):
        self.rows, self.shared = rows, shared
        like = rows.mean
        shape = (rows.centered.shape[0], d_out)
        self.product, self.delta_a = shared.rows.reserve(shape, rows.centered), shared.rows.reserve(shape, like)

    def divergence_grads(self, variant: str, transfer, anchor: tuple, weight: Tensor, bias: Tensor | None):
        """(Σ Jᵀr for W as d_out × d_in, Σr or None without a bias) at ΔW = ``weight``, Δb = ``bias``."""
        buffers, out = self.shared.for_weight(self.rows, weight)
        out = out if bias is not None else out[:1]
        kernels.low_precision_divergence_grads(variant, transfer, self.rows, anchor, weight, bias, self.product(),
                                               self.delta_a(), buffers, out)  # fmt: skip
        return out[0], (out[1] if bias is not None else None)


def _delta_a_buffer(scratch: _Scratch, shape: tuple[int, ...], problem: LocalProblem, fused) -> Callable:
    """The low-precision kernels' Δa in the parameters' dtype: none for a fused residual, which never forms it."""
    return (lambda: None) if fused is not None else scratch.reserve(shape, problem.params[0])


def _weight_and_bias(params: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    return params[0], (params[1] if len(params) > 1 else None)
