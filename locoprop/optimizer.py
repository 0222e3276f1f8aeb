"""``LocoPropOptimizer``: LocoProp as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import inspect
import math
import numbers
import time
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from locoprop.distributed import Communicator, greedy_owners
from locoprop.exact import exact_s_direction, exact_s_solution, lower_covariance, solve_covariance
from locoprop.hypergrad import (
    HYPERGRAD_MODES,
    adapted_activation_lr,
    implicit_sensitivity,
    inner_tangent,
    unrolled_sensitivity,
)
from locoprop.inner import INNER_SCHEDULES, RMSpropTF, inner_lr, resolve_inner
from locoprop.layers import no_backward_error, unrecorded_gradient_error
from locoprop.local import add_prox_grad_
from locoprop.local_gradients import PARALLEL_MODES, LocalGradients, input_rows, uses_gram_form
from locoprop.problem import LocalProblem
from locoprop.transfer import TRANSFER_NAMES, transfer_by_name
from locoprop.units import OutputUnitFinder, Unit, discover_units

__all__ = ["LocoPropOptimizer"]

VARIANTS = ("M", "S")
SOLVES = ("iterative", "exact")


class LocoPropOptimizer(torch.optim.Optimizer):
    r"""LocoProp (Amid, Anil, Warmuth, AISTATS 2022): backprop sets targets,
    each layer then solves its own local matching problem.

    Use it like any optimizer::

        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

    For every unit m (an nn.Linear / nn.Conv2d and its transfer function f),
    with input x, pre-activation a and backprop gradient g = dL/da from the
    backward pass, one step runs K inner-optimizer steps on the unit's local
    objective (SPEC §2: the target â = a − γ·g of variant "S", or
    ŷ = f(a) − γ·g of "M")

        ℓ_S(θ) = ½Σ‖layer_θ(x) − â‖² + (λ/2)‖θ − θ^old‖²  or
        ℓ_M(θ) = Σ[F(layer_θ(x)) − ŷ·layer_θ(x)] + (λ/2)‖θ − θ^old‖²,

    at inner learning rate η_t = η·max(1 − t/K, 0.25) ("linear-floor") or
    η_t = η ("constant"), t = 0..K−1. It solves them in the equal form
    ℓ(θ) = Σ D(Δa) + γ·⟨G, Δθ⟩ + (λ/2)‖Δθ‖² (:mod:`locoprop.local`), D the
    divergence of the unit's output from its value at θ^old and G the
    gradient handed over in ``p.grad``: whatever the user did to ``p.grad``
    after ``backward()`` (clipping, rescaling, noise, an all-reduce) is what
    every local problem starts from, and in float32 nothing cancels, so the
    step is as precise as float32 SGD's at any γ.

    ∇ℓ(θ^old) = γ·G, so one local SGD step at η is an SGD step at η·γ on the
    handed-over gradient. Parameters outside every unit (norms, embeddings)
    take one inner step at η on γ·G, the same first step. A parameter whose
    ``.grad`` is None takes no step, as in torch.optim.
    ``solve="exact"`` (variant S, linear units, λ > 0) replaces the K steps
    by the minimiser θ^old − γ·G(C + λI)⁻¹ with x̃ = [x, 1], C = Σx̃ᵀx̃.

    There is one parameter group per unit (plus one for the other
    parameters), each with its own ``lr``, ``activation_lr``, ``local_iters``,
    ``inner_schedule`` and ``prox``; lr schedulers act on ``lr`` (η). A
    parameter tied between units sits in the first one's group and follows
    the sum of their local objectives, with its linear term γ·⟨G, θ⟩ once (γ
    of that group); a unit parameter that a module outside every unit also
    holds (an embedding tied to the output layer), or that a function call
    also uses (``F.embedding(t, head.weight)``), needs nothing more: G, its
    whole gradient, includes that use (``solve="exact"`` refuses only
    weights shared by two units).

    The hooks keep each forward's records as long as its autograd graph; a
    pre-activation that an in-place operation overwrote (``nn.ReLU(inplace=
    True)``) is recomputed from the unit's recorded input.

    Args:
        model: the network; units are found with module hooks.
        variant: "M" (post-activation targets) or "S" (pre-activation).
        lr: inner learning rate η.
        activation_lr: activation learning rate γ > 0.
        local_iters: inner steps K ≥ 1 per outer step.
        inner: a name in ``locoprop.inner.INNER_NAMES`` ("sgd", "momentum",
            "nesterov", "adam", "rmsprop", "adagrad", "rmsprop-tf") or a
            ``torch.optim.Optimizer`` class; its state persists across steps.
        inner_kwargs: keyword arguments for the inner optimizer.
        inner_schedule: "linear-floor" or "constant".
        prox: proximal weight λ ≥ 0 of the local objectives.
        output_activation: transfer function of the unit that produces the
            model's output (the model usually folds it into the loss):
            "sigmoid" for BCE with logits, "softmax" for cross-entropy,
            "identity" for MSE. ``None`` keeps what discovery found. The
            last unit holds it until the first forward pass shows which unit
            that is (``locoprop.units.OutputUnitFinder``); a forward that does
            not tell (two heads) refuses the step: pass ``units=`` then.
        units: explicit ``[(layer, transfer), ...]`` replacing discovery.
        solve: "iterative" or "exact".
        parallel: how the local solves run (``locoprop.local_gradients``): "batched"
            (no autograd for linear units, Gram form of S, equal-shape units
            in batched matmuls, foreach inner updates; for the exact solve,
            ``locoprop.exact.exact_s_direction``), "streams" (the same,
            unit groups on separate CUDA streams), "none" (the readable
            reference path) or "auto" (streams on CUDA, batched otherwise).
            Every path solves the same problems from the same ``p.grad``.
        compile: fuse the inner update, run K times per step: "rmsprop-tf"
            through ``torch.compile`` (a few seconds once), torch's Adam,
            AdamW, SGD and Adagrad through their ``fused`` kernels.
        process_group: the ranks that train together (default: the default
            group of torch.distributed when it is initialised). On W ranks,
            each with its shard of the batch and its own mean loss, one step
            equals the single-process step on the concatenated batch with the
            mean loss, for M, S and the exact solve, with or without DDP
            around the model; every rank ends with the same parameters and
            inner state. G is the mean of the ranks' ``.grad`` (DDP's average,
            when DDP wraps the model); a rank whose loss is a sum over its
            examples multiplies it by W to get the global sum's step. Tied
            weights train on several ranks as in one process.
            What is communicated, per variant: :mod:`locoprop.distributed`.
        hypergrad_lr: β ≥ 0. With β > 0 each unit's γ adapts online by
            hypergradient descent (:mod:`locoprop.hypergrad`): at every step,
            h = ⟨∇L(θ), ∂θ/∂γ⟩ with the sensitivity ∂θ/∂γ of the unit's last
            local solve, then γ ← γ·exp(−β·h·γ), the factor clipped to [½, 2].
            The adapted γ are the groups' ``activation_lr`` (logged,
            checkpointed, resumed), the sensitivities are in ``state_dict``,
            ``last_hypergradients`` maps unit name to its last h. β = 0
            (the default) computes nothing. The γ of the parameters outside
            every unit stays as set. Not yet on several ranks, nor with tied
            weights.
        hypergrad: how ∂θ/∂γ is computed for the iterative solve:
            "implicit" (the implicit function theorem at the local optimum,
            ``hypergrad_iters`` conjugate-gradient steps on Hessian-vector
            products) or "unrolled" (the exact derivative of the K inner
            steps, by forward mode; about as costly as the solve itself).
            The exact S solve always uses its closed form.
        hypergrad_iters: conjugate-gradient steps of "implicit" (≥ 1). One
            (the default) gives s = −(bᵀb / bᵀHb)·b with b = Jᵀg, the best
            multiple of the backprop gradient; each more step costs about
            one local iteration (on the reference autoencoder the step costs
            +19% with 1, +27% with 2, +49% with 4) and changed little here.
    """

    # The phases of a step it times (``last_step_seconds``), for the runner.
    step_phases = ("targets", "local_solve")
    # It communicates over the ranks itself (locoprop.distributed): a runner gives it the model without DDP.
    data_parallel = True

    def __init__(
        self,
        model: nn.Module,
        variant: str = "M",
        lr: float = 1e-5,
        activation_lr: float = 10.0,
        local_iters: int = 10,
        inner="rmsprop",
        inner_kwargs: dict | None = None,
        inner_schedule: str = "linear-floor",
        prox: float = 0.0,
        output_activation: str | None = None,
        units: Sequence[tuple[nn.Module, str | nn.Module]] | None = None,
        solve: str = "iterative",
        parallel: str = "auto",
        compile: bool = False,
        process_group=None,
        hypergrad_lr: float = 0.0,
        hypergrad: str = "implicit",
        hypergrad_iters: int = 1,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"LocoPropOptimizer needs the model (an nn.Module), got {type(model).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"Invalid variant: {variant!r}; expected 'M' or 'S'")
        if solve not in SOLVES:
            raise ValueError(f"Invalid solve: {solve!r}; expected 'iterative' or 'exact'")
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"Invalid parallel: {parallel!r}; expected one of {', '.join(PARALLEL_MODES)}")
        if not isinstance(compile, bool):
            raise ValueError(f"Invalid compile: {compile!r}; expected True or False")
        meta = [name for name, p in model.named_parameters() if p.is_meta]
        if meta:
            raise ValueError(
                f"Parameters {meta[:3]}{' …' if len(meta) > 3 else ''} are on the meta device, which holds no values; "
                "materialise the model (model.to_empty(device=...) and initialise it) before building the optimizer"
            )
        if parallel == "streams" and not torch.cuda.is_available():
            raise ValueError("Invalid parallel: 'streams' needs a CUDA device; use 'batched' or 'auto'")
        defaults = dict(
            lr=_plain_float(lr),
            activation_lr=_plain_float(activation_lr),
            local_iters=local_iters,
            inner_schedule=inner_schedule,
            prox=_plain_float(prox),
            hypergrad_lr=_plain_float(hypergrad_lr),
        )
        _check_hyperparameters(defaults)
        if hypergrad not in HYPERGRAD_MODES:
            raise ValueError(f"Invalid hypergrad: {hypergrad!r}; expected one of {', '.join(HYPERGRAD_MODES)}")
        if isinstance(hypergrad_iters, bool) or not isinstance(hypergrad_iters, int) or hypergrad_iters < 1:
            raise ValueError(f"Invalid hypergrad_iters: {hypergrad_iters!r}; expected an integer ≥ 1")
        if solve == "exact" and variant != "S":
            raise ValueError(f"solve='exact' needs variant 'S', got variant {variant!r}")
        if solve == "exact" and not prox > 0:
            raise ValueError(f"solve='exact' needs prox > 0 (C + λI must be invertible), got prox={prox}")
        inner_factory = resolve_inner(inner)
        if output_activation is not None and output_activation not in TRANSFER_NAMES:
            raise ValueError(
                f"Invalid output_activation: {output_activation!r}; expected one of {', '.join(TRANSFER_NAMES)}"
            )
        found = discover_units(model, units)
        # Until the first forward pass shows which unit produces the output,
        # output_activation goes to the last unit (_output_unit_found moves it).
        self._output_transfer = transfer_by_name(output_activation) if output_activation is not None else None
        self._output_unit, self._displaced_transfer = found[-1], found[-1].transfer
        if self._output_transfer is not None:
            found[-1].transfer = self._output_transfer
        for unit in found:
            _check_unit(unit, variant, solve)

        self._param_names = {p: name for name, p in model.named_parameters()}
        # A parameter shared by units (tied weights) belongs to the group of
        # the first; its local gradient sums theirs, with its linear term γ·G
        # once. One that a module outside every unit also holds needs nothing
        # more: G, its whole gradient, includes that use.
        users: dict[Tensor, list[Unit]] = {}
        for unit in found:
            for p in unit.params:
                users.setdefault(p, []).append(unit)
        unit_modules = {unit.module for unit in found}
        # parameter -> the name of a module outside every unit that holds it
        self._held_outside_units = {
            p: name or type(module).__name__
            for name, module in model.named_modules()
            if module not in unit_modules
            for p in module.parameters(recurse=False)
            if p in users
        }
        # tied parameter -> the units that use it
        self._tied = {p: used_by for p, used_by in users.items() if len(used_by) > 1 or p in self._held_outside_units}
        self.comm = Communicator(process_group)
        # DDP averages the parameter gradients over ranks itself.
        self._grads_averaged = isinstance(model, nn.parallel.DistributedDataParallel)
        shared = {p: used_by for p, used_by in self._tied.items() if len(used_by) > 1}
        if solve == "exact" and shared:
            raise ValueError(
                f"solve='exact' cannot update weights shared by units ({self._describe_tied(shared)}): its closed "
                "form solves each unit alone; use solve='iterative'"
            )
        others = [p for p in model.parameters() if p.requires_grad and p not in users]
        owned = [[p for p in unit.params if users[p][0] is unit] for unit in found]
        groups = [{"params": ps, "unit": u.name, "transfer": u.transfer.name} for u, ps in zip(found, owned)]
        if others:
            groups.append({"params": others, "unit": None, "transfer": None})
        super().__init__(groups, defaults)

        self.variant = variant
        self.solve = solve
        self.parallel = parallel
        self.units: list[Unit] = found
        # param_groups[i] belongs to units[i]; a last group, if any, to the rest.
        self._unit_of_group: list[Unit | None] = [*found, None][: len(self.param_groups)]
        inner_groups = [{"params": group["params"], "lr": group["lr"]} for group in self.param_groups]
        inner_kwargs = dict(inner_kwargs or {})
        if compile and "compiled" not in inner_kwargs and "fused" not in inner_kwargs:
            if inner == "rmsprop-tf" or inner is RMSpropTF:
                inner_kwargs["compiled"] = True
            elif _accepts(inner_factory, "fused"):
                inner_kwargs["fused"] = True
        try:
            self.inner = inner_factory(inner_groups, **inner_kwargs)
        except TypeError as err:
            raise ValueError(f"Invalid inner_kwargs for inner optimizer {inner!r}: {inner_kwargs!r} ({err})") from err
        self.hypergrad, self.hypergrad_iters = hypergrad, hypergrad_iters
        # unit name -> h of the last step (units with a sensitivity from the step before)
        self.last_hypergradients: dict[str, float] = {}
        self._check_hypergrad_supported()
        self.skipped_steps = 0
        # Seconds of the last step's phases: setting targets, local solves.
        self.last_step_seconds: dict[str, float] = {}
        self.synchronize_timing = False
        for unit in found:
            unit.attach()
        self._output_unit_error: Exception | None = None
        self._output_finder: OutputUnitFinder | None = None
        if self._output_transfer is not None and len(found) > 1:
            self._output_finder = OutputUnitFinder(model, found, _weak_callback(self._output_unit_found))

    # ----------------------------------------------------------------- info
    def parameter_roles(self) -> dict[str, str]:
        """Each trainable parameter's name and the unit that updates it
        locally, or ``"backprop"`` for parameters outside every unit. A tied
        parameter lists all its uses: ``"fc1 + fc2"``, ``"head + backprop"``."""
        roles = {}
        for group, unit in zip(self.param_groups, self._unit_of_group):
            for p in group["params"]:
                roles[self._param_names.get(p, f"<param {id(p)}>")] = unit.name if unit else "backprop"
        for p, used_by in self._tied.items():
            uses = [u.name for u in used_by] + (["backprop"] if p in self._held_outside_units else [])
            roles[self._param_names.get(p, f"<param {id(p)}>")] = " + ".join(uses)
        return roles

    def adapted_hyperparameters(self) -> dict[str, float]:
        """The γ that hypergradients adapt, by metrics column ``gamma/UNIT`` (empty when β = 0 everywhere)."""
        return {
            f"gamma/{unit.name}": group["activation_lr"]
            for group, unit in zip(self.param_groups, self._unit_of_group)
            if unit is not None and group["hypergrad_lr"] > 0
        }

    def _describe_tied(self, tied: dict | None = None) -> str:
        """The tied parameters and their users, for messages."""
        described = []
        for p, used_by in (self._tied if tied is None else tied).items():
            uses = [f"unit {u.name!r}" for u in used_by]
            if p in self._held_outside_units:
                uses.append(f"module {self._held_outside_units[p]!r}")
            described.append(f"{self._param_names.get(p, 'a parameter')!r} is shared by {' and '.join(uses)}")
        return "; ".join(described)

    def _output_unit_found(self, reached: list[Unit]) -> None:
        """Give ``output_activation`` to the unit that the forward pass showed
        produces the model's output (:class:`~locoprop.units.OutputUnitFinder`);
        the unit that held it until then gets back its discovered transfer.
        An ambiguous forward, or a transfer the unit cannot use, refuses the
        steps that follow."""
        if len(reached) != 1:
            names = [u.name for u in self.units if u in reached]
            where = f"units {names} all reach it" if reached else "no unit reaches it"
            self._output_unit_error = RuntimeError(
                f"output_activation={self._output_transfer.name!r} is the transfer function of the unit that produces "
                f"the model's output, but the forward pass does not tell which unit that is: {where}. Pass "
                "units=[(layer, transfer), ...] naming every unit's transfer function instead of output_activation"
            )
            return
        unit, previous = reached[0], self._output_unit
        if unit is previous:
            return
        previous.transfer, self._displaced_transfer = self._displaced_transfer, unit.transfer
        unit.transfer, self._output_unit = self._output_transfer, unit
        for changed in (previous, unit):
            self.param_groups[self._unit_of_group.index(changed)]["transfer"] = changed.transfer.name
        try:
            for changed in (previous, unit):
                _check_unit(changed, self.variant, self.solve)
        except ValueError as err:
            self._output_unit_error = err

    def remove_hooks(self) -> None:
        """Detach the recording hooks from the model (the optimizer then
        cannot step any more)."""
        for unit in self.units:
            unit.detach()
        if self._output_finder is not None:
            self._output_finder.remove()

    def add_param_group(self, param_group: dict) -> None:
        """Add parameters outside every unit, updated like the model's other
        non-unit parameters: one inner step at η on γ·∇L per outer step.

        Units come from the model (discovery or ``units=``), so a new group
        cannot be a unit. Nothing changes when the group is refused.
        """
        if not hasattr(self, "inner"):  # torch.optim.Optimizer.__init__ adding the constructor's groups
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise ValueError(f"Invalid param group {param_group!r}: expected a dict with 'params'")
        if param_group.get("unit") is not None:
            raise ValueError(
                f"Cannot add unit {param_group['unit']!r} with add_param_group: units come from the model; "
                "pass units=[(layer, transfer), ...] to the constructor instead"
            )
        group = {**param_group, "unit": None, "transfer": None}
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        _check_hyperparameters({**self.defaults, **group})
        super().add_param_group(group)  # refuses parameters that already belong to a group
        self._unit_of_group.append(None)
        self.inner.add_param_group({"params": group["params"], "lr": group["lr"]})

    # ----------------------------------------------------------------- step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, with the units' records of the backward passes
        that produced them: a step refused after a backward pass must not
        solve that batch again after the next one."""
        super().zero_grad(set_to_none)
        for unit in self.units:
            unit.records.clear()

    @torch.no_grad()
    def step(self, closure=None):
        """One LocoProp step from the gradients of the last backward pass.

        Returns the closure's loss, if a closure is given. A batch whose
        gradients or activations are not finite is skipped: parameters and
        inner states stay as they were and ``skipped_steps`` grows by one.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_hyperparameters(group)
        _check_not_meta(self.units)
        # The local problems are solved in the parameters' dtype, also when
        # the forward pass ran under autocast (its records are cast up).
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            started = self._clock()
            problems = self._collect_problems()  # may refuse the step: nothing has changed yet
            adapting = self._adapting(problems)
            gammas = [group["activation_lr"] for group in self.param_groups]
            try:
                # h of the last step's γ, and the new γ that this step's targets use
                hypergradients = self._adapt_activation_lrs(adapting) if adapting else {}
                self._set_anchors(problems)
                targets_set = self._clock()
                finite = all(map(math.isfinite, hypergradients.values()))
                if not self.comm.all_true(finite and _all_finite(problems), self.units[0].module.weight.device):
                    self._restore_activation_lrs(gammas)
                    self.skipped_steps += 1  # on every rank: the ranks must stay identical
                else:
                    before = self._before_solve(adapting) if adapting else {}
                    if self.solve == "exact":
                        self._solve_exact([p for p in problems if p.unit is not None])
                        self._solve_iterative([p for p in problems if p.unit is None])
                    else:
                        self._solve_iterative(problems)
                    if adapting or any("gamma_sensitivity" in state for state in self.state.values()):
                        self._record_sensitivities(adapting, before)
                    self.last_hypergradients = hypergradients
            except BaseException:
                self._restore_activation_lrs(gammas)  # a refused step changes nothing
                raise
        for unit in self.units:
            unit.records.clear()
        self.last_step_seconds = {"targets": targets_set - started, "local_solve": self._clock() - targets_set}
        return loss

    # ------------------------------------------------------ hypergradients
    def _check_hypergrad_supported(self) -> None:
        """Refuse β > 0 where the sensitivities are not computed yet: several ranks, tied weights, and
        (for "unrolled") inner optimizers whose update rule :mod:`locoprop.hypergrad` does not know."""
        if not any(group["hypergrad_lr"] > 0 for group, unit in zip(self.param_groups, self._unit_of_group) if unit):
            return
        if self.comm.distributed:
            raise ValueError(
                f"hypergrad_lr > 0 is not supported on {self.comm.world_size} ranks yet: the sensitivities need the "
                "global batch's local problems; train with hypergrad_lr=0 or in one process"
            )
        if self._tied:
            raise ValueError(
                f"hypergrad_lr > 0 is not supported with tied weights ({self._describe_tied()}): a tied parameter's "
                "update depends on several units' γ"
            )
        if self.hypergrad == "unrolled" and self.solve == "iterative":
            for index, unit in enumerate(self._unit_of_group):
                if unit is not None:
                    inner_tangent(self.inner, index)

    def _adapting(self, problems: list[LocalProblem]) -> list[LocalProblem]:
        """The units' problems whose γ adapts (β > 0) in this step."""
        adapting = [p for p in problems if p.unit is not None and self.param_groups[p.group_index]["hypergrad_lr"] > 0]
        if adapting:
            self._check_hypergrad_supported()  # β may have been raised in param_groups since construction
        return adapting

    def _adapt_activation_lrs(self, adapting: list[LocalProblem]) -> dict[str, float]:
        """h = ⟨∇L, ∂θ/∂γ⟩ of each adapting unit that has a sensitivity from its last solve; its group's γ
        moves to γ·exp(−β·h·γ) (clipped) if every h is finite. One device sync."""
        measured = []
        for problem in adapting:
            pairs = [(p.grad, self.state[p].get("gamma_sensitivity")) for p in problem.params if p.grad is not None]
            if pairs and all(s is not None for _, s in pairs):
                h = sum(torch.vdot(g.reshape(-1), s.reshape(-1)) for g, s in pairs)
                measured.append((problem, h))
        if not measured:
            return {}
        values = torch.stack([h for _, h in measured]).tolist()
        hypergradients = {problem.unit.name: h for (problem, _), h in zip(measured, values)}
        if all(map(math.isfinite, values)):
            for (problem, _), h in zip(measured, values):
                group = self.param_groups[problem.group_index]
                group["activation_lr"] = adapted_activation_lr(group["activation_lr"], h, group["hypergrad_lr"])
        return hypergradients

    def _restore_activation_lrs(self, gammas: list[float]) -> None:
        for group, gamma in zip(self.param_groups, gammas):
            group["activation_lr"] = gamma

    def _before_solve(self, adapting: list[LocalProblem]) -> dict[LocalProblem, dict]:
        """What the sensitivities need from before the solve changes it: the recorded uses and G, and for
        "unrolled" the inner state and the K inner learning rates."""
        before = {}
        for problem in adapting:
            saved = {"uses": problem.uses, "linear_term": problem.linear_terms()}
            if self.solve == "iterative" and self.hypergrad == "unrolled":
                group, index = self.param_groups[problem.group_index], problem.group_index
                rule = inner_tangent(self.inner, index)
                k = group["local_iters"]
                saved.update(
                    rule=rule,
                    states=[rule.start(self.inner.state.get(p, {}), p) for p in problem.params],
                    lrs=[inner_lr(group["inner_schedule"], group["lr"], t, k) for t in range(k)],
                )
            before[problem] = saved
        return before

    def _record_sensitivities(self, adapting: list[LocalProblem], before: dict[LocalProblem, dict]) -> None:
        """∂θ/∂γ of this step's solve for every adapting unit, into ``state[p]["gamma_sensitivity"]``; the
        other parameters lose theirs (their θ did not move with γ)."""
        for state in self.state.values():
            state.pop("gamma_sensitivity", None)
        for problem in adapting:
            group, unit = self.param_groups[problem.group_index], problem.unit
            linear = isinstance(unit.module, nn.Linear)
            saved = before[problem]
            inputs = [x for x, _ in saved["uses"]]
            if self.solve == "exact":
                sensitivity = [-d for d in problem.exact_direction]  # θ* = θ^old − γ·Δ
            elif self.hypergrad == "implicit":
                params = [p.detach() for p in problem.params]
                sensitivity = implicit_sensitivity(self.variant, unit.transfer, unit.adapter.forward, params, inputs,
                                                   saved["linear_term"], group["prox"], self.hypergrad_iters,
                                                   linear)  # fmt: skip
            else:
                sensitivity, _ = unrolled_sensitivity(
                    self.variant, unit.transfer, unit.adapter.forward, problem.old_params, saved["uses"],
                    saved["linear_term"], problem.activation_lr, group["prox"], saved["rule"], saved["states"],
                    saved["lrs"], linear,
                )  # fmt: skip
            for p, s in zip(problem.params, sensitivity):
                self.state[p]["gamma_sensitivity"] = s.reshape(p.shape)

    def _clock(self) -> float:
        # Kernels run asynchronously on a GPU: wait for them when asked to,
        # so that the phase split is real (it costs a little speed).
        if self.synchronize_timing and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _collect_problems(self) -> list[LocalProblem]:
        """Everything the step needs, checked before any parameter changes.

        Each unit that took part in the loss gets a problem with its recorded
        inputs and, as its linear term G, the gradients the user handed over in
        ``.grad`` (a parameter tied between units carries it in the first
        problem that holds it, so that the sum of their objectives has it once).
        """
        if self._output_finder is not None:
            self._output_finder.decide_now()  # the model's own forward never ran: the last unit to run
        if self._output_unit_error is not None:
            raise type(self._output_unit_error)(*self._output_unit_error.args)
        problems, idle, carried = [], [], set()
        for index, (group, unit) in enumerate(zip(self.param_groups, self._unit_of_group)):
            if unit is None:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    problems.append(LocalProblem(index, params, linear_term=[p.grad for p in params]))
                continue
            records = unit.backpropagated_records()
            if not records:
                idle.append(unit)  # the layer took no part in this loss
                continue
            for record in records:
                unit.check_record(record)
            # x in the parameters' dtype: records of a forward under autocast are in a lower precision.
            dtype = unit.params[0].dtype
            linear_term = [p.grad if p not in carried else None for p in unit.params]
            carried.update(unit.params)
            problems.append(LocalProblem(index, unit.params, unit=unit, records=records, linear_term=linear_term,
                                         inputs=[r.x.to(dtype) for r in records]))  # fmt: skip
        for unit in idle:
            # A tied parameter gets gradients from its other uses too.
            if any(p.grad is not None and p not in carried and p not in self._held_outside_units for p in unit.params):
                raise unrecorded_gradient_error("Unit", unit.name)
        for p in self._held_outside_units:
            if p.grad is not None and p not in carried:
                # Its units took no part in this loss: only its use outside them, one step on γ·G.
                problems.append(LocalProblem(self._group_index(p), [p], linear_term=[p.grad]))
        if not problems:
            raise no_backward_error("LocoPropOptimizer")
        if self.comm.distributed and not self._grads_averaged:
            self._average_linear_terms(problems)
        return problems

    def _average_linear_terms(self, problems: list[LocalProblem]) -> None:
        """On W ranks: G is the gradient of the global mean loss, the mean over ranks of each rank's ``.grad``
        (copies: ``.grad`` stays the user's). DDP has averaged them already when it wraps the model."""
        terms = [g for problem in problems for g in problem.linear_term if g is not None]
        averaged = iter(terms_copy := [g.clone() for g in terms])
        self.comm.mean_(terms_copy)
        for problem in problems:
            problem.linear_term = [next(averaged) if g is not None else None for g in problem.linear_term]

    def _group_index(self, p: Tensor) -> int:
        """The index of the param group that holds ``p``."""
        return next(i for i, group in enumerate(self.param_groups) if any(p is q for q in group["params"]))

    def _set_anchors(self, problems: list[LocalProblem]) -> None:
        """Each unit's γ, θ^old, the anchors of its recorded pre-activations (variant M; the S residual Δa
        needs none), and whether S takes its Gram form.

        A unit's records are released as soon as its anchors exist, so that
        its pre-activations do not outlive their use.
        """
        for problem in problems:
            problem.activation_lr = self.param_groups[problem.group_index]["activation_lr"]
            unit = problem.unit
            if unit is None:
                continue
            problem.old_params = [p.detach().clone() for p in problem.params]
            dtype = unit.params[0].dtype
            if self.variant == "M":
                problem.anchors = [unit.transfer.anchor_at(unit.output(r).to(dtype)) for r in problem.records]
            else:
                problem.anchors = [() for _ in problem.records]
            problem.gram_form = self.solve == "iterative" and uses_gram_form(
                problem, self.variant, self._parallel_mode(), self._iterations(problem), self.comm.world_size
            )
            problem.records = []
            unit.records.clear()

    def _solve_iterative(self, problems: list[LocalProblem]) -> None:
        """K lockstep iterations of the inner optimizer over all units.

        Iteration t hands the inner optimizer ∇ℓ = Σ Jᵀr + γ·G + λΔθ per unit
        (:mod:`locoprop.local`): at t = 0 that is γ·G, for t ≥ 1 the plan gives
        Σ Jᵀr + γ·G. A parameter tied between units sums its units'
        gradients; one whose ``.grad`` is None takes no step, as in torch.optim.
        """
        if not problems:
            return
        saved_grads = {p: p.grad for group in self.param_groups for p in group["params"]}
        iterations = {problem: self._iterations(problem) for problem in problems}
        unit_problems = [problem for problem in problems if problem.unit is not None]
        plan = LocalGradients(unit_problems, self.variant, self._parallel_mode(), self.comm)
        # The inner lr of each group that steps: a tied parameter steps in its own group.
        schedules = {problem.group_index: iterations[problem] for problem in problems}
        tied = {p for problem in unit_problems for p in problem.params if p in self._tied} if self._tied else set()
        for p in tied:
            index = self._group_index(p)
            schedules.setdefault(index, self.param_groups[index]["local_iters"])
        try:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            for t in range(max(iterations.values())):
                active = [problem for problem in problems if t < iterations[problem]]
                planned = plan({problem for problem in active if problem.unit is not None}) if t else {}
                totals: dict[Tensor, Tensor] = {}
                for problem in active:
                    for p, grad in zip(problem.params, self._local_gradient(problem, planned.get(problem))):
                        if grad is not None:
                            totals[p] = totals[p] + grad if p in totals else grad
                for group in self.param_groups:
                    for p in group["params"]:
                        # torch.optim skips a parameter without a gradient; so does the step.
                        p.grad = totals.get(p) if saved_grads[p] is not None else None
                for index, local_iters in schedules.items():
                    group = self.param_groups[index]
                    lr = inner_lr(group["inner_schedule"], group["lr"], t, local_iters)
                    self.inner.param_groups[index]["lr"] = lr
                self.inner.step()
        finally:
            # Callers see the gradients they handed over, not ours.
            for p, grad in saved_grads.items():
                p.grad = grad

    def _local_gradient(self, problem: LocalProblem, planned: list[Tensor] | None) -> list[Tensor | None]:
        """∇ℓ of ``problem``: γ·G at the first inner iteration (Δθ = 0, nothing ``planned``), later the plan's
        Σ Jᵀr + γ·G plus λΔθ; None for a parameter that gets no gradient from this problem."""
        if planned is None:
            return [term * problem.activation_lr if term is not None else None for term in problem.linear_term]
        group = self.param_groups[problem.group_index]
        if group["prox"]:
            add_prox_grad_(planned, problem.params, problem.old_params, group["prox"])
        return planned

    def _parallel_mode(self) -> str:
        if self.parallel != "auto":
            return self.parallel
        on_cuda = any(unit.module.weight.is_cuda for unit in self.units)
        return "streams" if on_cuda else "batched"

    def _iterations(self, problem: LocalProblem) -> int:
        # Parameters outside units have no local problem: one step on γ·G.
        return self.param_groups[problem.group_index]["local_iters"] if problem.unit is not None else 1

    def _solve_exact(self, problems: list[LocalProblem]) -> None:
        """θ ← θ^old − γ·G(C + λI)⁻¹ for every unit, all solved before any changes."""
        if self.comm.distributed:
            self._solve_exact_distributed(problems)
            return
        if self._parallel_mode() == "none":
            solutions, failed = [], []
            for problem in problems:
                prox = self.param_groups[problem.group_index]["prox"]
                try:
                    solutions.append(exact_s_solution(problem.params, problem.inputs, problem.linear_terms(),
                                                      problem.activation_lr, prox))  # fmt: skip
                except torch.linalg.LinAlgError:
                    failed.append(problem.unit.name)
            if failed:
                raise _not_positive_definite(failed, problems[0].params[0].dtype)
            directions = [torch.cat([(p.detach() - new.reshape(p.shape)).reshape(p.shape[0], -1) for p, new in
                                     zip(problem.params, solution)], dim=1).div_(problem.activation_lr)
                          for problem, solution in zip(problems, solutions)]  # fmt: skip
            _apply_directions(problems, directions)
            return
        directions, infos = [], []
        for problem in problems:
            prox = self.param_groups[problem.group_index]["prox"]
            direction, info = exact_s_direction(input_rows(problem), _joined(problem.linear_terms()), prox)
            directions.append(direction)
            infos.append(info)
        if torch.stack(infos).any():
            failed = [problem.unit.name for problem, info in zip(problems, infos) if info]
            raise _not_positive_definite(failed, directions[0].dtype)
        _apply_directions(problems, directions)

    def _solve_exact_distributed(self, problems: list[LocalProblem]) -> None:
        """The exact step on W ranks: C = Σx̃ᵀx̃ summed over ranks once (one bucket; G is already the global
        mean), each unit's Cholesky solve on one owner rank (greedy by d³), its Δ broadcast to the others."""
        covariances = [lower_covariance(input_rows(problem), has_bias=len(problem.params) == 2) for problem in problems]
        crosses = [_joined(problem.linear_terms()) for problem in problems]
        self.comm.sum_lower_(covariances, [])
        owners = greedy_owners([float(problem.params[0].shape[1] + 1) ** 3 for problem in problems],
                               self.comm.world_size)  # fmt: skip
        directions, infos = [], []
        for problem, covariance, cross, owner in zip(problems, covariances, crosses, owners):
            if owner == self.comm.rank:
                prox = self.param_groups[problem.group_index]["prox"]
                direction, info = solve_covariance(covariance, cross, prox)
                direction = direction.contiguous()  # a broadcast sends memory as it lies: the receivers' layout
            else:
                direction, info = torch.empty_like(cross), cross.new_zeros((), dtype=torch.int32)
            directions.append(direction)
            infos.append(info.reshape(1).to(cross.dtype))
        for direction, info, owner in zip(directions, infos, owners):
            self.comm.broadcast_(direction, owner)
            self.comm.broadcast_(info, owner)
        if torch.cat(infos).any():
            failed = [problem.unit.name for problem, info in zip(problems, infos) if info.item()]
            raise _not_positive_definite(failed, directions[0].dtype)
        _apply_directions(problems, directions)

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Outer state, inner-optimizer state and the skipped-step count."""
        state = super().state_dict()
        state["inner"] = self.inner.state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if not (isinstance(state_dict, dict) and "inner" in state_dict and "param_groups" in state_dict):
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"Not a LocoPropOptimizer state dict (it has {keys}, but no 'inner' optimizer state); "
                "it was saved by another optimizer"
            )
        state_dict = dict(state_dict)
        inner = state_dict.pop("inner")
        skipped = state_dict.pop("skipped_steps", 0)
        saved_units = [group.get("unit") for group in state_dict["param_groups"]]
        units = [group["unit"] for group in self.param_groups]
        if saved_units != units:
            raise ValueError(f"State dict is for units {saved_units}, but this optimizer has units {units}")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("hypergrad_lr", 0.0)  # a state dict from before hypergradients
        self.inner.load_state_dict(inner)
        self.skipped_steps = skipped


def _apply_directions(problems: list[LocalProblem], directions: list[Tensor]) -> None:
    """θ ← θ^old − γ·Δ for each unit's [weight | bias] direction Δ, kept on the problem (views, no copy) for
    the sensitivity ∂θ/∂γ = −Δ of the next step's hypergradient. A parameter whose ``.grad`` is None is left
    as it is (as torch.optim leaves it)."""
    for problem, direction in zip(problems, directions):
        weight, *bias = problem.params
        problem.exact_direction = [direction[:, : weight.shape[1]].reshape(weight.shape),
                                   *([direction[:, -1]] if bias else [])]  # fmt: skip
        for p, d, term in zip(problem.params, problem.exact_direction, problem.linear_term):
            if term is not None:
                p.add_(d, alpha=-problem.activation_lr)


def _joined(terms: list[Tensor]) -> Tensor:
    """[∇W | ∇b] of a linear unit as one matrix (no copy without a bias)."""
    return torch.cat([terms[0], terms[1][:, None]], dim=1) if len(terms) == 2 else terms[0]


def _check_hyperparameters(group: dict) -> None:
    lr, activation_lr, local_iters = group["lr"], group["activation_lr"], group["local_iters"]
    for name, value in (("learning rate", lr), ("activation_lr", activation_lr), ("prox", group["prox"])):
        if isinstance(value, Tensor):
            raise ValueError(f"Invalid {name}: a tensor ({value!r}); LocoPropOptimizer needs a float (.item())")
    if not (_is_real(lr) and 0 < lr < math.inf):
        raise ValueError(f"Invalid learning rate: {lr!r}; expected a finite number > 0")
    if not (_is_real(activation_lr) and 0 < activation_lr < math.inf):
        raise ValueError(f"Invalid activation_lr: {activation_lr!r}; expected a finite number > 0")
    if isinstance(local_iters, bool) or not isinstance(local_iters, int) or local_iters < 1:
        raise ValueError(f"Invalid local_iters: {local_iters}; expected an integer ≥ 1")
    if group["inner_schedule"] not in INNER_SCHEDULES:
        raise ValueError(
            f"Invalid inner_schedule: {group['inner_schedule']!r}; expected one of {', '.join(INNER_SCHEDULES)}"
        )
    prox = group["prox"]
    if not (_is_real(prox) and 0 <= prox < math.inf):
        raise ValueError(f"Invalid prox: {prox!r}; expected a finite number ≥ 0")
    beta = group.get("hypergrad_lr", 0.0)
    if isinstance(beta, Tensor) or not (_is_real(beta) and 0 <= beta < math.inf):
        raise ValueError(f"Invalid hypergrad_lr: {beta!r}; expected a finite number ≥ 0")


def _check_not_meta(units: list[Unit]) -> None:
    """Refuse units whose layers were moved to the meta device after the optimizer was built.

    (``model.to("meta")`` gives the modules new parameters: look at theirs.)
    """
    meta = [f"{unit.name}.{name}" for unit in units for name, p in unit.module.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(
            f"Parameters {meta[:3]}{' …' if len(meta) > 3 else ''} are on the meta device, which holds no values, "
            "so there is nothing to step; move the model to a real device before training"
        )


def _plain_float(value):
    """A NumPy scalar as a float (torch.optim takes them too): param_groups
    then hold plain numbers, which a weights_only checkpoint loads."""
    # (np.float64 is a float subclass, np.float32 is not: test the exact type.)
    if isinstance(value, numbers.Real) and type(value) not in (bool, int, float) and not isinstance(value, Tensor):
        return float(value)
    return value


def _is_real(value) -> bool:
    # bool is an int to Python, but lr=True is a mistake, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_unit(unit: Unit, variant: str, solve: str) -> None:
    kind = type(unit.module).__name__
    if solve == "exact" and not isinstance(unit.module, nn.Linear):
        raise ValueError(f"solve='exact' supports nn.Linear units only; unit {unit.name!r} is a {kind}")
    if variant != "M":
        return
    transfer = unit.transfer
    if not transfer.supports_matching_loss:
        raise ValueError(
            f"Variant 'M' cannot use the transfer function of unit {unit.name!r} ({kind}): "
            f"{transfer.unsupported_reason}. Use variant='S', or pass units=[(layer, 'identity'), ...] "
            "to choose the transfer functions explicitly"
        )
    if transfer.name.startswith("softmax") and isinstance(unit.module, nn.Conv2d):
        raise ValueError(f"Softmax over the last dimension does not apply to Conv2d unit {unit.name!r}")


def _not_positive_definite(units: list[str], dtype: torch.dtype) -> torch.linalg.LinAlgError:
    return torch.linalg.LinAlgError(
        f"Exact solve: C + λI of unit(s) {units} is not positive definite in {dtype}; "
        "no parameter was changed. Raise prox"
    )


def _weak_callback(method):
    """``method``, called through a weak reference: hooks that the model keeps
    do not keep the optimizer alive."""
    ref = weakref.WeakMethod(method)

    def call(*args) -> None:
        alive = ref()
        if alive is not None:
            alive(*args)

    return call


def _accepts(factory, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _all_finite(problems: list[LocalProblem]) -> bool:
    """Whether every stored input, anchor and gradient G is finite.

    A sum is NaN or ±inf as soon as one term is, and costs one fast pass
    (``isfinite().all()`` takes several, about 20× longer); only sums beyond
    the float range (values near 1e32 and more) would count a finite batch as
    non-finite, and such a batch is lost anyway.
    """
    tensors = [x for pr in problems for x in pr.inputs] + [t for pr in problems for a in pr.anchors for t in a]
    tensors += [g for pr in problems for g in pr.linear_term if g is not None]
    return bool(torch.stack([t.sum() for t in tensors]).isfinite().all())
