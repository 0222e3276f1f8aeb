"""How the local gradients of all units are computed in one inner iteration.

A :class:`LocalGradients` plan is built once per step from the units' stored
inputs and targets, then asked for every unit's local gradient at the
current parameters, K times. Three ways (``parallel``):

- "none": the readable reference, :func:`locoprop.local.local_grads` (the
  layer's vector-Jacobian product by autograd), one unit after the other;
- "batched": linear units without autograd (:mod:`locoprop.kernels`), their
  first iteration from the backprop record (no forward matmul); variant S
  through its Gram statistics where that costs fewer FLOPs; linear units of
  equal shape and transfer function stacked into batched matmuls;
- "streams" (CUDA): as "batched", with each group of units issued on its own
  CUDA stream so that units of different shapes run concurrently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from locoprop import kernels
from locoprop.distributed import Communicator
from locoprop.gradient_checks import backprop_gradient_mismatch, reuse_tolerance
from locoprop.local import local_grads
from locoprop.problem import LocalProblem

__all__ = [
    "PARALLEL_MODES",
    "LocalGradients",
    "backprop_cross",
    "backprop_reusable",
    "backprop_rows",
    "uses_gram_form",
]

PARALLEL_MODES = ("auto", "batched", "streams", "none")


@dataclasses.dataclass(eq=False)
class _Work:
    """Computes the local gradients of one or more units: problems -> grads."""

    problems: list[LocalProblem]
    compute: Callable[[], list[list[Tensor]]]
    # The gradients at θ^old from the recorded backprop pass, used by the
    # first iteration instead of ``compute`` (fast paths only).
    initial: list[list[Tensor]] | None = None
    # On several ranks: whether ``compute`` gives the whole batch's gradients
    # already (the Gram form, from statistics summed once), not this rank's part.
    whole_batch: bool = False


class LocalGradients:
    """The local gradients of a step's unit problems, by the chosen method.

    Args:
        problems: the units' problems of this step (their ``params``,
            ``batches`` of (x, target), ``backprop`` of (x, g), γ).
        variant: "M" or "S".
        mode: "none", "batched" or "streams".
        comm: the ranks (:mod:`locoprop.distributed`): each rank computes its
            examples' part of every local gradient, and the parts are summed
            over ranks in one bucket per iteration; the Gram form sums its
            statistics once instead.

    A problem's ``gram_form`` (from :func:`uses_gram_form`, decided when its
    targets are, since the Gram form needs none) selects the Gram form of S.
    """

    def __init__(self, problems: list[LocalProblem], variant: str, mode: str, comm: Communicator | None = None):
        self.variant = variant
        self.mode = mode
        self.comm = comm if comm is not None else Communicator()
        self.overlap = self.comm.distributed and self.comm.overlaps(problems)
        self.work: list[_Work] = []
        if mode == "none":
            self.work = [_Work([p], self._reference(p)) for p in problems]
            return
        batchable: dict[tuple, list[tuple[LocalProblem, Tensor, Tensor]]] = {}
        gram = []
        for problem in problems:
            module = problem.unit.module
            if not isinstance(module, nn.Linear):
                self.work.append(_Work([problem], self._reference(problem)))
                continue
            if problem.gram_form:
                gram.append(problem)
                continue
            x = kernels.concat_rows([problem.unit.adapter.input_rows(x) for x, _ in problem.batches])
            target = kernels.concat_rows([problem.unit.adapter.output_rows(t) for _, t in problem.batches])
            key = (tuple(module.weight.shape), module.bias is not None, tuple(x.shape), problem.unit.transfer.name,
                   x.dtype, x.device)  # fmt: skip
            batchable.setdefault(key, []).append((problem, x, target))
        # The first iteration's gradients, γ·[gᵀx, Σg]: γ·p.grad where that is
        # still the backprop gradient (one check for all units).
        reusable = set()
        if not self.comm.distributed:  # on several ranks p.grad is not this rank's part (DDP averaged it)
            reusable = backprop_reusable(gram + [problem for group in batchable.values() for problem, _, _ in group])
        for problem in reusable:
            problem.grads_are_backprop = True
        self.work += [self._gram(problem, problem in reusable) for problem in gram]
        # Linear units run one after another, except on streams: then one
        # pre-activation buffer serves them all.
        scratch = _Scratch(shared=mode != "streams")
        for group in batchable.values():
            if len(group) == 1:
                self.work.append(self._linear(*group[0], scratch, reusable))
            else:
                self.work.append(self._batched(group, scratch, reusable))

    def __call__(self, active: set) -> dict[LocalProblem, list[Tensor]]:
        """Local gradients of the ``active`` problems at the current parameters."""
        todo = [w for w in self.work if any(p in active for p in w.problems)]
        if self.mode == "streams" and len(todo) > 1:
            grads = self._on_streams(todo)
        elif self.overlap:
            return self._overlapped(todo)
        else:
            grads = {p: g for w in todo for p, g in zip(w.problems, _grads(w))}
        if self.comm.distributed:
            self.comm.sum_([g for w in todo if not w.whole_batch for p in w.problems for g in grads[p]])
        return grads

    def _overlapped(self, todo: list[_Work]) -> dict[LocalProblem, list[Tensor]]:
        """The local gradients, each work item's summed over ranks in its own asynchronous bucket, on its way
        while the next items compute theirs (NCCL runs it on its own stream)."""
        grads, pending = {}, []
        for w in todo:
            grads.update(zip(w.problems, _grads(w)))
            if not w.whole_batch:
                pending.append(self.comm.sum_start([g for p in w.problems for g in grads[p]]))
        for transfer in pending:
            transfer.wait()
        return grads

    # ------------------------------------------------------------ kernels
    # The kernels capture what they need, not ``self``: a plan -> kernel ->
    # plan cycle would keep every buffer of a step alive until the garbage
    # collector ran, into the next step.
    def _reference(self, problem: LocalProblem) -> Callable[[], list[list[Tensor]]]:
        unit, variant = problem.unit, self.variant

        def compute():
            return [local_grads(variant, unit.transfer, unit.adapter.forward, problem.params, problem.batches)]

        return compute

    def _linear(self, problem: LocalProblem, x: Tensor, target: Tensor, scratch: _Scratch, reusable: set) -> _Work:
        module, transfer, variant = problem.unit.module, problem.unit.transfer, self.variant
        activation = scratch.reserve((x.shape[0], module.out_features), x)
        grads = kernels.linear_workspace(x, module.weight, module.bias)[1:]

        def compute():
            out = [activation(), *grads]
            return [kernels.linear_grads(variant, transfer, x, target, module.weight.detach(), _bias(module), out)]

        return _Work([problem], compute, [_backprop_grads(problem, grads, problem in reusable)])

    def _gram(self, problem: LocalProblem, reuse: bool) -> _Work:
        module = problem.unit.module
        weight, bias = module.weight.detach(), _bias(module)
        x, _ = backprop_rows(problem)
        cross = backprop_cross(problem, reuse)
        covariance = kernels.gram_covariance(x, bias is not None)
        self.comm.sum_lower_([covariance], [cross], mirror=True)  # the whole batch's C and Gᵀx̃, once a step
        statistic = kernels.gram_statistic(covariance, weight, bias, cross, problem.activation_lr)
        grads = kernels.linear_workspace(x, weight, bias)[1:]
        torch.mul(cross[:, : weight.shape[1]], problem.activation_lr, out=grads[0])  # the first iteration: γ·Gᵀx̃
        if bias is not None:
            torch.mul(cross[:, -1], problem.activation_lr, out=grads[1])

        def compute():
            return [kernels.gram_grads(covariance, statistic, module.weight.detach(), _bias(module), grads)]

        return _Work([problem], compute, [grads], whole_batch=True)

    def _batched(self, group: list[tuple[LocalProblem, Tensor, Tensor]], scratch: _Scratch, reusable: set) -> _Work:
        problems = [g[0] for g in group]
        modules = [p.unit.module for p in problems]
        transfer, variant = problems[0].unit.transfer, self.variant
        x = torch.stack([g[1] for g in group])
        target = torch.stack([g[2] for g in group])
        weight = torch.stack([m.weight.detach() for m in modules])
        bias = torch.stack([m.bias.detach() for m in modules]) if modules[0].bias is not None else None
        activation = scratch.reserve((*x.shape[:2], weight.shape[1]), x)
        grads = kernels.linear_workspace(x, weight, bias)[1:]

        def compute():
            # The current parameters, stacked into the same buffers each time.
            torch.stack([m.weight.detach() for m in modules], out=weight)
            if bias is not None:
                torch.stack([m.bias.detach() for m in modules], out=bias)
            kernels.linear_grads(variant, transfer, x, target, weight, bias, [activation(), *grads])
            return [list(unit_grads) for unit_grads in zip(*(g.unbind(0) for g in grads))]

        initial = [_backprop_grads(p, [g[i] for g in grads], p in reusable) for i, p in enumerate(problems)]
        return _Work(problems, compute, initial)

    def _on_streams(self, todo: list[_Work]) -> dict[LocalProblem, list[Tensor]]:
        main = torch.cuda.current_stream()
        results: dict[LocalProblem, list[Tensor]] = {}
        streams = [torch.cuda.Stream() for _ in todo]
        for work, stream in zip(todo, streams):
            stream.wait_stream(main)  # inputs written on the main stream
            with torch.cuda.stream(stream):
                for problem, grads in zip(work.problems, _grads(work)):
                    results[problem] = grads
        for stream in streams:
            main.wait_stream(stream)
        for grads in results.values():
            for g in grads:
                g.record_stream(main)  # used and freed on the main stream
        return results


def _grads(work: _Work) -> list[list[Tensor]]:
    if work.initial is None:
        return work.compute()
    grads, work.initial = work.initial, None  # only for the first iteration
    return grads


def uses_gram_form(problem: LocalProblem, variant: str, mode: str, local_iters: int, ranks: int = 1) -> bool:
    """Whether the plan solves ``problem`` in the Gram form of variant S (which
    needs no targets), on ``ranks`` ranks (:func:`locoprop.kernels.gram_is_cheaper`)."""
    module = problem.unit.module
    if variant != "S" or mode == "none" or not isinstance(module, nn.Linear):
        return False
    rows = sum(problem.unit.adapter.input_rows(x).shape[0] for x, _ in problem.backprop)
    return kernels.gram_is_cheaper(rows, module.in_features, module.out_features, local_iters, ranks)


def backprop_rows(problem: LocalProblem) -> tuple[Tensor, Tensor]:
    """A linear unit's recorded inputs x and backprop gradients g, as rows.

    A layer used several times has its records joined once: the joined pair
    replaces them in ``problem.backprop`` (its objective sums over rows), so
    the check, Gᵀx̃ and C do not each copy them again.
    """
    adapter = problem.unit.adapter
    x = kernels.concat_rows([adapter.input_rows(x) for x, _ in problem.backprop])
    g = kernels.concat_rows([adapter.output_rows(g) for _, g in problem.backprop])
    problem.backprop = [(x, g)]
    return x, g


def backprop_reusable(problems: list[LocalProblem]) -> set:
    """The linear-unit problems whose ``param_grads`` (the parameters' ``.grad``
    at the start of the step) still equal their backprop gradient [gᵀx, Σg],
    by :func:`locoprop.gradient_checks.backprop_gradient_mismatch` (one device sync)."""
    if not problems:
        return set()
    mismatch = torch.stack([backprop_gradient_mismatch(p.param_grads, *backprop_rows(p)) for p in problems])
    tolerances = [reuse_tolerance(p.params[0].dtype) for p in problems]
    return {p for p, m, tol in zip(problems, mismatch.tolist(), tolerances) if m <= tol}


def backprop_cross(problem: LocalProblem, reuse: bool) -> Tensor:
    """Gᵀx̃ = [gᵀx | Σg] of a linear unit: from ``param_grads`` when ``reuse``
    (the backward pass computed it), else from the records."""
    if not reuse:
        x, g = backprop_rows(problem)
        return kernels.backprop_cross(x, g, len(problem.params) == 2)
    weight_grad, *bias_grad = problem.param_grads
    return torch.cat([weight_grad, bias_grad[0][:, None]], dim=1) if bias_grad else weight_grad


def _backprop_grads(problem: LocalProblem, out: list[Tensor], reuse: bool) -> list[Tensor]:
    if reuse:  # the backward pass computed them already
        for buffer, grad in zip(out, problem.param_grads):
            torch.mul(grad, problem.activation_lr, out=buffer)
        return out
    return kernels.backprop_grads(*backprop_rows(problem), problem.activation_lr, out)


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


def _bias(module: nn.Module) -> Tensor | None:
    return module.bias.detach() if module.bias is not None else None
