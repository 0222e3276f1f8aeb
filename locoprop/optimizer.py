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
from locoprop.gradient_checks import outside_use_tolerance
from locoprop.hypergrad import (
    HYPERGRAD_MODES,
    adapted_activation_lr,
    implicit_sensitivity,
    inner_tangent,
    unrolled_sensitivity,
)
from locoprop.inner import INNER_SCHEDULES, RMSpropTF, inner_lr, resolve_inner
from locoprop.layers import no_backward_error, unrecorded_gradient_error
from locoprop.local import add_prox_grad_, layer_backprop_grads, make_target
from locoprop.local_gradients import (
    PARALLEL_MODES,
    LocalGradients,
    backprop_cross,
    backprop_reusable,
    backprop_rows,
    uses_gram_form,
)
from locoprop.problem import LocalProblem
from locoprop.transfer import TRANSFER_NAMES, transfer_by_name
from locoprop.units import GradientSketch, OutputUnitFinder, Unit, discover_units

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
    backward pass, one step

    1. sets a target: â = a − γ·g (variant "S") or ŷ = f(a) − γ·g ("M");
    2. runs K inner-optimizer steps on the unit's local objective
       ℓ_S(θ) = ½Σ‖layer_θ(x) − â‖² + (λ/2)‖θ − θ^old‖² or
       ℓ_M(θ) = Σ[F(layer_θ(x)) − ŷ·layer_θ(x)] + (λ/2)‖θ − θ^old‖²,
       at inner learning rate η_t = η·max(1 − t/K, 0.25) ("linear-floor")
       or η_t = η ("constant"), t = 0..K−1.

    ∇ℓ(θ^old) = γ·∇L(θ^old), so one local SGD step at η is a backprop SGD
    step at η·γ. Parameters outside every unit (norms, embeddings) take one
    inner step at η on γ·∇L, the same first step. ``solve="exact"`` (variant
    S, linear units, λ > 0) replaces the K steps by the minimiser
    θ^old − γ·Gᵀx̃(C + λI)⁻¹ with x̃ = [x, 1], C = Σx̃ᵀx̃.

    There is one parameter group per unit (plus one for the other
    parameters), each with its own ``lr``, ``activation_lr``, ``local_iters``,
    ``inner_schedule`` and ``prox``; lr schedulers act on ``lr`` (η). A
    parameter tied between units sits in the first one's group and follows
    the sum of their local objectives; a unit parameter that a module outside
    every unit also holds (an embedding tied to the output layer), or that a
    function call also uses (``F.embedding(t, head.weight)``, found because
    its backward gradient differs from the part through the unit's recorded
    uses), adds the linear objective γ·⟨∇L of that use, θ⟩ to its local
    objective (``solve="exact"`` refuses such a step).

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
            The fast paths take Gᵀx̃, the layer's backprop gradient (γ·Gᵀx̃
            is the first local gradient, and the exact solve's right-hand
            side), from ``p.grad`` when a randomised check finds it
            unchanged, and from the records otherwise: clipping ``p.grad``
            does not change the local problems.
        compile: fuse the inner update, run K times per step: "rmsprop-tf"
            through ``torch.compile`` (a few seconds once), torch's Adam,
            AdamW, SGD and Adagrad through their ``fused`` kernels.
        process_group: the ranks that train together (default: the default
            group of torch.distributed when it is initialised). On W ranks,
            each with its shard of the batch and its own mean loss, one step
            equals the single-process step on the concatenated batch with the
            mean loss, for M, S and the exact solve, with or without DDP
            around the model; every rank ends with the same parameters and
            inner state. The recorded g is divided by W to put it on the
            footing of DDP's averaged gradients; a rank whose loss is a sum
            over its examples multiplies it by W to get the global sum's step.
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
        # the first; its local gradient sums theirs. One that a module outside
        # every unit also holds adds that use's share of ∇L (_set_targets).
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
        if self.comm.distributed and self._tied:
            raise ValueError(
                f"Tied weights are not supported on {self.comm.world_size} ranks yet ({self._describe_tied()}): "
                "their outside share needs the global gradient of each use; train them in one process"
            )
        if solve == "exact" and self._tied:
            raise ValueError(
                f"solve='exact' cannot update tied weights ({self._describe_tied()}): its closed form solves each "
                "unit alone; use solve='iterative'"
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
        # The backward gradient of every unit parameter, sketched, shows a use
        # that no unit recorded, through a function call (_find_outside_uses).
        self._sketches = {
            p: GradientSketch(p)
            for unit in found
            if GradientSketch.supports(unit)
            for p in unit.params
            if p not in self._held_outside_units
        }
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

    def _describe_tied(self) -> str:
        """The tied parameters and their users, for messages."""
        described = []
        for p, used_by in self._tied.items():
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
        for sketch in self._sketches.values():
            sketch.remove()
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
        for sketch in self._sketches.values():
            sketch.reset()

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
                self._set_targets(problems)
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
        for sketch in self._sketches.values():
            sketch.reset()
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
            if any(problem.outside_uses for problem in adapting):
                raise RuntimeError(
                    "hypergrad_lr > 0 is not supported for a unit whose weight is also used outside the units (a "
                    "function call such as F.embedding(tokens, layer.weight)); no parameter was changed"
                )
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
        """What the sensitivities need from before the solve changes it: the (x, g) pairs, and for
        "unrolled" θ^old, the inner state and the K inner learning rates."""
        before = {}
        for problem in adapting:
            saved = {"backprop": problem.backprop, "param_grads": problem.param_grads}
            if self.solve == "iterative" and self.hypergrad == "unrolled":
                group, index = self.param_groups[problem.group_index], problem.group_index
                rule = inner_tangent(self.inner, index)
                k = group["local_iters"]
                saved.update(
                    old=[p.detach().clone() for p in problem.params],
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
            if self.solve == "exact":
                sensitivity = [-d for d in problem.exact_direction]  # θ* = θ^old − γ·Δ
            elif self.hypergrad == "implicit":
                params = [p.detach() for p in problem.params]
                known = saved["param_grads"] if problem.grads_are_backprop else None  # Jᵀg from the backward pass
                sensitivity = implicit_sensitivity(self.variant, unit.transfer, unit.adapter.forward, params,
                                                   saved["backprop"], group["prox"], self.hypergrad_iters, linear,
                                                   known)  # fmt: skip
            else:
                sensitivity, _ = unrolled_sensitivity(
                    self.variant, unit.transfer, unit.adapter.forward, saved["old"], saved["backprop"],
                    problem.activation_lr, group["prox"], saved["rule"], saved["states"], saved["lrs"], linear,
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
        """Everything the step needs, checked before any parameter changes."""
        if self._output_finder is not None:
            self._output_finder.decide_now()  # the model's own forward never ran: the last unit to run
        if self._output_unit_error is not None:
            raise type(self._output_unit_error)(*self._output_unit_error.args)
        problems, idle = [], []
        for index, (group, unit) in enumerate(zip(self.param_groups, self._unit_of_group)):
            if unit is None:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    problems.append(LocalProblem(index, params, grads=[p.grad for p in params]))
                continue
            records = unit.backpropagated_records()
            if not records:
                idle.append(unit)  # the layer took no part in this loss
                continue
            for record in records:
                unit.check_record(record)
            # (x, g) in the parameters' dtype: records of a forward under autocast are in a lower precision.
            dtype = unit.params[0].dtype
            backprop = [(r.x.to(dtype), r.g.to(dtype)) for r in records]
            problems.append(LocalProblem(index, unit.params, unit=unit, records=records, backprop=backprop))
        covered = set()
        if idle or self._held_outside_units:  # (not needed in the usual step)
            covered = {p for problem in problems if problem.unit is not None for p in problem.params}
        for unit in idle:
            # A tied parameter gets gradients from its other uses too.
            if any(p.grad is not None and p not in covered and p not in self._held_outside_units for p in unit.params):
                raise unrecorded_gradient_error("Unit", unit.name)
        for p in self._held_outside_units:
            if p.grad is not None and p not in covered:
                # Its units took no part in this loss: only its use outside them, one step on γ·∇L.
                problems.append(LocalProblem(self._group_index(p), [p], grads=[p.grad]))
        self._find_outside_uses([problem for problem in problems if problem.unit is not None])
        if not problems:
            raise no_backward_error("LocoPropOptimizer")
        if self.comm.distributed:
            self._to_global_footing(problems)
        return problems

    def _to_global_footing(self, problems: list[LocalProblem]) -> None:
        """On W ranks: each recorded g divided by W (its share of the global mean loss, see
        :mod:`locoprop.distributed`), and the ordinary gradients of the parameters outside units averaged
        over ranks, unless DDP averaged them already."""
        if any(problem.outside_uses for problem in problems):
            raise RuntimeError(
                "A unit's weight is also used outside the units (a function call such as F.embedding(tokens, "
                f"layer.weight)); that is not supported on {self.comm.world_size} ranks yet"
            )
        scale = 1.0 / self.comm.world_size
        for problem in problems:
            problem.backprop = [(x, g * scale) for x, g in problem.backprop]
        if not self._grads_averaged:
            outside = [problem for problem in problems if problem.unit is None]
            problem_grads = [g for problem in outside for g in problem.grads]
            averaged = [g.clone() for g in problem_grads]  # p.grad itself stays the user's
            self.comm.mean_(averaged)
            for problem in outside:
                problem.grads, averaged = averaged[: len(problem.grads)], averaged[len(problem.grads) :]

    def _find_outside_uses(self, problems: list[LocalProblem]) -> None:
        """Mark in ``problem.outside_uses`` each unit parameter with a gradient
        from a use outside the units: held by a module outside them (known
        from the model), or used through a function call such as
        ``F.embedding(t, head.weight)``, which shows as a backward gradient
        (:class:`~locoprop.units.GradientSketch`) that the unit's recorded uses
        do not account for (one device sync). The exact solve refuses those."""
        expected: dict[Tensor, Tensor] = {}
        tolerances: dict[Tensor, float] = {}
        for problem in problems:
            for p in problem.params:
                sketch = self._sketches.get(p)
                if sketch is None or sketch.total is None:
                    continue
                part = sketch.through_records(problem.unit, problem.backprop)
                expected[p] = expected[p] + part if p in expected else part
                # records of a forward under autocast round the gradient more
                rounding = max(outside_use_tolerance(r.g.dtype) for r in problem.records)
                tolerances[p] = max(tolerances.get(p, 0.0), rounding)
        unrecorded = set()
        if expected:
            mismatch = torch.stack([self._sketches[p].mismatch(e) for p, e in expected.items()]).tolist()
            unrecorded = {p for p, m in zip(expected, mismatch) if m > tolerances[p]}
        for problem in problems:
            problem.outside_uses = [
                i
                for i, p in enumerate(problem.params)
                if p.grad is not None and (p in unrecorded or p in self._held_outside_units)
            ]
        if self.solve == "exact" and unrecorded:
            used = [
                (problem.unit.name, self._param_names.get(p, "a parameter"))
                for problem in problems
                for p in problem.params
                if p in unrecorded
            ]
            raise RuntimeError(
                f"solve='exact' cannot update {', '.join(f'{name!r} of unit {unit!r}' for unit, name in used)}: the "
                "backward pass gave it a gradient from a use that the unit did not record (a function call such as "
                "F.embedding(tokens, layer.weight)), and the closed form solves each unit alone. Use "
                "solve='iterative', or pass units= without that layer; no parameter was changed"
            )

    def _group_index(self, p: Tensor) -> int:
        """The index of the param group that holds ``p``."""
        return next(i for i, group in enumerate(self.param_groups) if any(p is q for q in group["params"]))

    def _set_targets(self, problems: list[LocalProblem]) -> None:
        """Each unit's (x, target) pairs for the iterative solve (except in
        the Gram form of S, which needs none), from the (x, g) pairs that
        :meth:`_collect_problems` gathered; and the share of ∇L from uses
        outside units of tied parameters.

        A unit's records are released as soon as its targets exist, so that
        its pre-activations do not outlive their use.
        """
        for problem in problems:
            unit = problem.unit
            if unit is None:
                continue
            problem.activation_lr = self.param_groups[problem.group_index]["activation_lr"]
            problem.param_grads = [p.grad for p in problem.params]
            problem.gram_form = self.solve == "iterative" and uses_gram_form(
                problem, self.variant, self._parallel_mode(), self._iterations(problem), self.comm.world_size
            )
            if self.solve == "iterative" and not problem.gram_form:  # the Gram form needs only x and g
                problem.batches = [
                    (
                        x,
                        make_target(self.variant, unit.transfer, unit.output(r), g, problem.activation_lr),
                    )
                    for r, (x, g) in zip(problem.records, problem.backprop)
                ]
            problem.records = []
            unit.records.clear()
        if any(problem.outside_uses for problem in problems):
            self._set_outside_shares([problem for problem in problems if problem.unit is not None])

    def _set_outside_shares(self, problems: list[LocalProblem]) -> None:
        """For a unit parameter used outside every unit too (held by a module,
        such as an embedding tied to the output layer, or passed to a function
        such as ``F.embedding``), its local objective adds
        γ·⟨∇L − Σ_units ∇L_unit, θ⟩: the linear objective of the outside use,
        whose gradient, constant, joins every local iteration. ∇L is its
        ``.grad``, ∇L_unit the part through each unit's recorded uses."""
        shares: dict[Tensor, Tensor] = {}
        first_use: dict[Tensor, tuple[LocalProblem, int]] = {}
        for problem in problems:
            tied = problem.outside_uses
            if not tied:
                continue
            through_unit = layer_backprop_grads(problem.unit.adapter.forward, problem.params, problem.backprop)
            for i in tied:
                p = problem.params[i]
                shares[p] = shares.get(p, p.grad) - through_unit[i]
                first_use.setdefault(p, (problem, i))
        for p, share in shares.items():
            problem, i = first_use[p]
            activation_lr = self.param_groups[self._group_index(p)]["activation_lr"]
            problem.outside_grads.append((i, share.mul_(activation_lr)))

    def _solve_iterative(self, problems: list[LocalProblem]) -> None:
        """K lockstep iterations of the inner optimizer over all units."""
        if not problems:
            return
        saved_grads = {p: p.grad for group in self.param_groups for p in group["params"]}
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        iterations = {problem: self._iterations(problem) for problem in problems}
        unit_problems = [problem for problem in problems if problem.unit is not None]
        for problem in unit_problems:
            if self.param_groups[problem.group_index]["prox"]:
                problem.old_params = [p.detach().clone() for p in problem.params]
        plan = LocalGradients(unit_problems, self.variant, self._parallel_mode(), self.comm)
        for problem in unit_problems:
            problem.backprop, problem.param_grads = [], []  # the plan holds what it needs
        # The inner lr of each group that steps: a tied parameter steps in its own group.
        schedules = {problem.group_index: iterations[problem] for problem in problems}
        tied = {p for problem in unit_problems for p in problem.params if p in self._tied} if self._tied else set()
        for p in tied:
            index = self._group_index(p)
            schedules.setdefault(index, self.param_groups[index]["local_iters"])
        try:
            for t in range(max(iterations.values())):
                for problem in problems:
                    for p in problem.params:
                        p.grad = None  # last iteration's gradients: free them first
                local = plan({problem for problem in unit_problems if t < iterations[problem]})
                for problem in problems:
                    group = self.param_groups[problem.group_index]
                    if t >= iterations[problem]:
                        continue
                    if problem.unit is None:
                        # Parameters outside units: one step on γ·∇L.
                        grads = [group["activation_lr"] * g for g in problem.grads]
                    else:
                        grads = local[problem]
                        if group["prox"]:
                            add_prox_grad_(grads, problem.params, problem.old_params, group["prox"])
                        for i, outside in problem.outside_grads:
                            grads[i].add_(outside)
                    for p, grad in zip(problem.params, grads):
                        # A tied parameter's local objectives add up.
                        p.grad = p.grad + grad if tied and p.grad is not None else grad
                for index, local_iters in schedules.items():
                    group = self.param_groups[index]
                    lr = inner_lr(group["inner_schedule"], group["lr"], t, local_iters)
                    self.inner.param_groups[index]["lr"] = lr
                self.inner.step()
        finally:
            # Callers see the backprop gradients they computed, not ours.
            for p, grad in saved_grads.items():
                p.grad = grad

    def _parallel_mode(self) -> str:
        if self.parallel != "auto":
            return self.parallel
        on_cuda = any(unit.module.weight.is_cuda for unit in self.units)
        return "streams" if on_cuda else "batched"

    def _iterations(self, problem: LocalProblem) -> int:
        # Parameters outside units have no local problem: one step on γ·∇L.
        return self.param_groups[problem.group_index]["local_iters"] if problem.unit is not None else 1

    def _solve_exact(self, problems: list[LocalProblem]) -> None:
        """θ ← θ^old − γ·Gᵀx̃(C + λI)⁻¹ for every unit, all solved before any changes."""
        if self.comm.distributed:
            self._solve_exact_distributed(problems)
            return
        if self._parallel_mode() == "none":
            solutions, failed = [], []
            for problem in problems:
                prox = self.param_groups[problem.group_index]["prox"]
                try:
                    solutions.append(exact_s_solution(problem.params, problem.backprop, problem.activation_lr, prox))
                except torch.linalg.LinAlgError:
                    failed.append(problem.unit.name)
            if failed:
                raise _not_positive_definite(failed, problems[0].params[0].dtype)
            for problem, solution in zip(problems, solutions):
                if self.param_groups[problem.group_index]["hypergrad_lr"] > 0:  # Δ = (θ^old − θ*)/γ, for h
                    problem.exact_direction = [(p - new.reshape(p.shape)) / problem.activation_lr
                                               for p, new in zip(problem.params, solution)]  # fmt: skip
                for p, new in zip(problem.params, solution):
                    p.copy_(new.reshape(p.shape))
            return
        directions, infos = [], []
        reusable = backprop_reusable(problems)
        for problem in problems:
            x, _ = backprop_rows(problem)
            prox = self.param_groups[problem.group_index]["prox"]
            direction, info = exact_s_direction(x, backprop_cross(problem, problem in reusable), prox)
            directions.append(direction)
            infos.append(info)
        if torch.stack(infos).any():
            failed = [problem.unit.name for problem, info in zip(problems, infos) if info]
            raise _not_positive_definite(failed, directions[0].dtype)
        _apply_directions(problems, directions)

    def _solve_exact_distributed(self, problems: list[LocalProblem]) -> None:
        """The exact step on W ranks: C = Σx̃ᵀx̃ and Gᵀx̃ summed over ranks once (one bucket), each unit's
        Cholesky solve on one owner rank (greedy by d³), its Δ broadcast to the others."""
        covariances, crosses = [], []
        for problem in problems:
            x, _ = backprop_rows(problem)
            crosses.append(backprop_cross(problem, reuse=False))  # this rank's part (p.grad may be DDP's average)
            covariances.append(lower_covariance(x, has_bias=len(problem.params) == 2))
        self.comm.sum_lower_(covariances, crosses)
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
    the sensitivity ∂θ/∂γ = −Δ of the next step's hypergradient."""
    for problem, direction in zip(problems, directions):
        weight, *bias = problem.params
        problem.exact_direction = [direction[:, : weight.shape[1]], *([direction[:, -1]] if bias else [])]
        weight.add_(problem.exact_direction[0], alpha=-problem.activation_lr)
        if bias:
            bias[0].add_(problem.exact_direction[1], alpha=-problem.activation_lr)


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
    """Whether every stored input, target and gradient is finite.

    A sum is NaN or ±inf as soon as one term is, and costs one fast pass
    (``isfinite().all()`` takes several, about 20× longer); only sums beyond
    the float range (values near 1e32 and more) would count a finite batch as
    non-finite, and such a batch is lost anyway.
    """
    tensors = [t for pr in problems for pair in pr.backprop for t in pair]
    tensors += [target for pr in problems for _, target in pr.batches] + [g for pr in problems for g in pr.grads]
    tensors += [g for pr in problems for _, g in pr.outside_grads]
    return bool(torch.stack([t.sum() for t in tensors]).isfinite().all())
