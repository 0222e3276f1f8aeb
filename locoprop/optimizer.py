"""``LocoPropOptimizer``: LocoProp as a drop-in ``torch.optim.Optimizer``.

The class is a shell: it checks its arguments (:mod:`locoprop.arguments`),
makes one param group per unit (:mod:`locoprop.ownership`) and runs a step
as a pipeline of stages, each in a module of its own:

1. collect the local problems, refusing before anything changes (:mod:`locoprop.collect`);
2. adapt γ by hypergradients, when β > 0 (:mod:`locoprop.adaptation`);
3. prepare the solves: θ^old and anchors (:func:`locoprop.collect.prepare_solves`);
4. solve, iteratively (:mod:`locoprop.solve_iterative`) or exactly (:mod:`locoprop.solve_exact`);
5. record the sensitivities ∂θ/∂γ for the next step's hypergradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Container, Sequence

import torch
from torch import Tensor, nn

from locoprop import adaptation, relative_gamma
from locoprop.arguments import (
    check_hyperparameters,
    check_not_meta,
    check_options,
    check_state_dict,
    check_unit,
    checked_param_group,
    plain_float,
)
from locoprop.collect import all_finite, collect_problems, prepare_solves, unit_variant
from locoprop.describe import Description, describe, warn_fallbacks, warn_if_mostly_not_local, warn_unheld
from locoprop.distributed import Communicator
from locoprop.inner import make_inner, takes_sparse
from locoprop.output_unit import OutputActivation
from locoprop.ownership import ParameterOwnership
from locoprop.recording import ForwardRecorder
from locoprop.solve_exact import solve_exact
from locoprop.solve_iterative import solve_iterative
from locoprop.units import Unit, discover_units

__all__ = ["LocoPropOptimizer"]


class _Every(Container):
    """Contains every parameter."""

    def __contains__(self, item) -> bool:
        return True


_EVERY_PARAMETER = _Every()


class LocoPropOptimizer(torch.optim.Optimizer):
    r"""LocoProp (Amid, Anil, Warmuth, AISTATS 2022): backprop sets targets,
    each layer then solves its own local matching problem.

    Use it like any optimizer::

        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

    For every unit m (a linear map applied to a model parameter, whatever
    calls it, and the transfer function f that consumes its output:
    :mod:`locoprop.units`), with input x, pre-activation a and backprop
    gradient g = dL/da, one step runs K inner-optimizer steps on the unit's local
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
    by the minimiser θ^old − γ·G(C + λI)⁻¹ with x̃ = [x, 1], C = Σx̃ᵀx̃, or,
    amortised (``covariance_refresh`` T > 1 or ``covariance_decay`` ρ > 0),
    by θ^old − γ·G(C̄ + λI)⁻¹ with C̄ and its inverse refreshed every T steps.

    There is one parameter group per unit (plus one for the other
    parameters), each with its own ``lr``, ``activation_lr``, ``local_iters``,
    ``inner_schedule`` and ``prox``; lr schedulers act on ``lr`` (η). Tied
    and outside-held parameters: :mod:`locoprop.ownership` (G, the whole
    gradient, includes every use; ``solve="exact"`` refuses only weights
    shared by two units).

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
            model's output, which the loss usually folds in: "sigmoid" for
            BCE with logits, "softmax" for cross-entropy, "identity" for MSE;
            ``None`` keeps what discovery found (:mod:`locoprop.output_unit`).
        units: explicit ``[(layer, transfer), ...]`` replacing discovery.
        solve: "iterative" or "exact".
        parallel: how the local solves run (:mod:`locoprop.local_gradients`):
            "batched" (autograd-free kernels, batched matmuls), "streams"
            (the same on CUDA streams), "none" (the readable reference) or
            "auto" (streams on CUDA, batched otherwise).
        compile: fuse the elementwise work run K times per step: the inner
            update ("rmsprop-tf" through ``torch.compile``, a few seconds
            once; torch's Adam, AdamW, SGD and Adagrad through their
            ``fused`` kernels) and the linear kernels' residuals (M's
            f(a^old + Δa) − f(a^old) for identity, tanh, sigmoid, ReLU and
            leaky ReLU units, its rounding and Σr: :mod:`locoprop.fused`).
        process_group: the ranks that train together (default: torch.distributed's
            default group when initialised); one step on W ranks equals the
            step on the concatenated batch (:mod:`locoprop.distributed`).
        hypergrad_lr: β ≥ 0. With β > 0 each unit's γ adapts online
            (:mod:`locoprop.adaptation`): γ ← γ·exp(−β·h·γ), h = ⟨∇L(θ), ∂θ/∂γ⟩
            of its last solve, the factor clipped to [½, 2]; the groups'
            ``activation_lr`` hold it, ``last_hypergradients`` the h. β = 0
            computes nothing. Not yet on several ranks, nor with tied weights.
        hypergrad: how ∂θ/∂γ is computed for the iterative solve:
            "implicit" (the implicit function theorem at the local optimum,
            by conjugate gradients) or "unrolled" (forward mode through the
            K inner steps; about as costly as the solve itself) or
            "gradient" (−G, implicit's first CG direction without its
            length: free, for hypergrad_rule="normalized"). The exact S
            solve always uses its closed form (:mod:`locoprop.hypergrad`).
        hypergrad_iters: conjugate-gradient steps of "implicit" (≥ 1); each
            costs about one local iteration.
        hypergrad_rule: "plain" (SPEC §12: a step of β·h·γ on log γ) or
            "normalized" (an Adam step of at most about β on log γ, the same
            for any scale of the loss; :mod:`locoprop.hypergrad`).
        hypergrad_scope: "unit" (each unit's γ by its own hypergradient) or
            "shared" (every unit's γ by one factor, from the sum of their
            hypergradients: the paper's single γ, adapted).
        relative_activation_lr: ρ > 0, or None (the default: γ is
            ``activation_lr``). With ρ, the first step sets γ (of every group)
            to ρ·‖a‖/‖g‖, the norms over every unit's pre-activations and
            their gradients g = ∂L/∂a in that step, so that the targets move
            the pre-activations by a share ρ of their size whatever the
            loss's scale, reduction or batch size; γ then stays (or adapts,
            β > 0) and is checkpointed (:mod:`locoprop.relative_gamma`).
        max_relative_activation_lr: ρ̄ > 0, or None (the default). With ρ̄,
            the first step caps γ at ρ̄·‖a‖/‖g‖ (the same norms), so that a
            γ given far too large starts where a step moves the
            pre-activations by at most a share ρ̄ of their size, while a
            smaller γ stays (``ADAPTIVE_GAMMA`` sets the start with ρ
            instead: from a γ far too small hypergradients climb slowly;
            :mod:`locoprop.relative_gamma`).
        relative_activation_lr_ceiling: ρ_max > 0, or None (the default).
            With ρ_max, every step keeps each unit's γ at most
            ρ_max·‖a_m‖/‖g_m‖ (that unit's norms in that step), after the
            hypergradients moved it: adapted γ cannot drift past the point
            where the targets saturate (:mod:`locoprop.relative_gamma`).
        covariance_refresh: T ≥ 1, ``solve="exact"`` only: each unit's
            (C̄ + λI)⁻¹ is formed at its steps 0, T, 2T, … (the steps it
            takes part in; a skipped step does not count) and reused in
            between, so that a step costs one product G·(C̄ + λI)⁻¹ more than
            backprop (FOOF, Benzing 2022). T = 1 with ρ = 0 (the defaults) is
            the exact step of every batch, and keeps no state.
        covariance_decay: ρ in [0, 1), ``solve="exact"`` only: the input
            covariance is an exponential moving average of the refresh steps'
            batches, C̄ ← ρ·C̄ + (1 − ρ)·C (the first C̄ is C; ρ = 0 keeps the
            refresh step's C). Only refresh steps contribute: adding every
            step's C would cost a Gram matrix per step, as much as the solve
            that T amortises (:mod:`locoprop.solve_exact`).
        local_dtype: None (the parameters' dtype) or "bfloat16": the inner
            iterations' matmuls (linear and convolution units) run in
            bfloat16 with float32 accumulation, several times float32's
            rate on AMX CPUs and tensor cores, while the step stays accurate
            to about 1% of itself: each product computes a change (the
            output's Δa from Δθ = θ − θ^old, never the output minus a
            target), and θ, M's residual, the bias sums and γ·G stay in the
            parameters' dtype (:mod:`locoprop.kernels`). Iterative solve only.
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
        hypergrad_rule: str = "plain",
        hypergrad_scope: str = "unit",
        relative_activation_lr: float | None = None,
        max_relative_activation_lr: float | None = None,
        relative_activation_lr_ceiling: float | None = None,
        covariance_refresh: int = 1,
        covariance_decay: float = 0.0,
        local_dtype: str | None = None,
    ):
        check_options(model, variant=variant, solve=solve, parallel=parallel, compile=compile, prox=prox,
                      hypergrad=hypergrad, hypergrad_iters=hypergrad_iters, hypergrad_rule=hypergrad_rule,
                      hypergrad_scope=hypergrad_scope, output_activation=output_activation,
                      local_dtype=local_dtype)  # fmt: skip
        defaults = dict(lr=plain_float(lr), activation_lr=plain_float(activation_lr), local_iters=local_iters,
                        inner_schedule=inner_schedule, prox=plain_float(prox),
                        hypergrad_lr=plain_float(hypergrad_lr), covariance_refresh=covariance_refresh,
                        covariance_decay=plain_float(covariance_decay),
                        relative_activation_lr=plain_float(relative_activation_lr),
                        max_relative_activation_lr=plain_float(max_relative_activation_lr),
                        relative_activation_lr_ceiling=plain_float(relative_activation_lr_ceiling))  # fmt: skip
        check_hyperparameters(defaults, solve)
        found = discover_units(model, units)
        # The last unit holds output_activation until a forward pass shows which unit produces the output.
        self._output = OutputActivation(found, output_activation) if output_activation is not None else None
        for unit in found:
            check_unit(unit, solve, variant)
        self.ownership = ParameterOwnership(model, found)
        if solve == "exact":
            self.ownership.check_solved_alone()
        self.comm = Communicator(process_group)
        # DDP averages the parameter gradients over ranks itself (also when it wraps the model later: the
        # recorder sees the forward run inside DDP's).
        self._grads_averaged = isinstance(model, nn.parallel.DistributedDataParallel)
        super().__init__(self.ownership.param_groups(), defaults)
        self.variant, self.solve, self.parallel = variant, solve, parallel
        self.local_dtype = local_dtype
        self.compile = compile
        self._compute_dtype = getattr(torch, local_dtype) if local_dtype is not None else None
        self.units: list[Unit] = found
        # param_groups[i] belongs to units[i]; a last group, if any, to the rest.
        self.unit_of_group: list[Unit | None] = [*found, None][: len(self.param_groups)]
        inner_groups = [{"params": group["params"], "lr": group["lr"]} for group in self.param_groups]
        self.inner = make_inner(inner, inner_kwargs, compile, inner_groups)
        self.hypergrad, self.hypergrad_iters, self.hypergrad_rule = hypergrad, hypergrad_iters, hypergrad_rule
        self.hypergrad_scope = hypergrad_scope
        adaptation.check_supported(self)
        self._attach(model)

    def _attach(self, model: nn.Module) -> None:
        """Record the units' uses in every forward pass of ``model`` (and, first, find its output unit); start
        the step bookkeeping that the runner (:mod:`sweeps.runner.contract`) and the warnings read."""
        # unit name -> h of the last step (units with a sensitivity from the step before)
        self.last_hypergradients: dict[str, float] = {}
        self.skipped_steps = 0
        # Seconds of the last step's phases: setting targets, local solves.
        self.last_step_seconds: dict[str, float] = {}
        self.synchronize_timing = False
        self._fallbacks_said: set[str] = set()
        self._share_said = False
        # Parameters no group holds; one unfrozen later has a gradient and no step (warn_unheld).
        self._frozen_at_build = {p: name for p, name in self.ownership.names.items() if not p.requires_grad}
        self._unheld_said: set[str] = set()
        if self._output is not None:  # (before the recorder: see OutputActivation.attach)
            self._output.attach(model, self._output_moved)
        output = self._output
        pending = (lambda: output.pending) if output is not None else None
        self._recorder = ForwardRecorder(self.units, on_output=output.note if output is not None else None,
                                         on_transfers=self._transfers_found, output_pending=pending)  # fmt: skip
        self._recorder.attach(model)
        self._measure_if_pending()

    # ----------------------------------------------------------------- info
    def parameter_roles(self) -> dict[str, str]:
        """Each trainable parameter's name and the unit that updates it
        locally, or ``"backprop"`` for parameters outside every unit. A tied
        parameter lists all its uses: ``"fc1 + fc2"``, ``"head + backprop"``."""
        # A candidate that no forward pass used in a linear map takes plain steps, as describe() says, and so
        # does a bias that the unit's map does not add.
        seen = self._forward_seen()
        groups = []
        for group, unit in zip(self.param_groups, self.unit_of_group):
            if unit is None or (seen and unit.adapter is None):
                groups.append((group["params"], None))
                continue
            mine = {id(p) for p in unit.params}
            groups.append(([p for p in group["params"] if id(p) in mine], unit))
            groups.append(([p for p in group["params"] if id(p) not in mine], None))
        return self.ownership.roles(groups)

    def describe(self) -> Description:
        """What is solved locally: one row per unit (kind of map, shape, transfer function, variant, share of
        the trainable parameters) and the parameters that are not local, largest first; ``print`` it for a
        table (:mod:`locoprop.describe`)."""
        trainable = [p for group in self.param_groups for p in group["params"]]
        return describe(self.units, lambda unit: unit_variant(self.variant, unit), self.ownership.names, trainable,
                        self._forward_seen())  # fmt: skip

    def _averaged_by_ddp(self) -> Container[Tensor]:
        """The parameters whose gradients DDP averaged over the ranks: all, when the optimizer was given the DDP
        model; else those of the modules that a DDP ran (wrapped later, or only a part of the model)."""
        return _EVERY_PARAMETER if self._grads_averaged else self._recorder.averaged_by_ddp()

    def _forward_seen(self) -> bool:
        """Whether a forward pass has shown how the units' weights are used: a training forward ran, or a unit
        has its map (a state restored). Before, every unit counts as local; after, one that no linear map used
        (all of them, when every weight is computed, as weight norm does) is not."""
        return self._recorder.trained_forward_seen or any(unit.adapter is not None for unit in self.units)

    def adapted_hyperparameters(self) -> dict[str, float]:
        """The γ that the optimizer sets itself, by metrics column ``gamma/UNIT``: adapted by hypergradients
        (β > 0), or set, capped or bounded from the norms (ρ, ρ̄, a ceiling); empty when γ is given and fixed."""
        return {
            f"gamma/{unit.name}": group["activation_lr"]
            for group, unit in zip(self.param_groups, self.unit_of_group)
            if unit is not None and (group["hypergrad_lr"] > 0 or relative_gamma.chooses_gamma(group))
        }

    def _output_moved(self, changed: list[Unit]) -> None:
        """The output unit found by the forward pass took ``output_activation`` from the last unit."""
        self._transfers_found(changed)
        for unit in changed:
            check_unit(unit, self.solve, self.variant)

    def _transfers_found(self, units: list[Unit]) -> None:
        """A forward pass decided these units' transfer functions: their groups say so."""
        for unit in units:
            self.param_groups[self.unit_of_group.index(unit)]["transfer"] = unit.transfer.name

    def remove_hooks(self) -> None:
        """Detach the recording hooks from the model (the optimizer then
        cannot step any more)."""
        self._recorder.detach()
        if self._output is not None:
            self._output.remove()

    def add_param_group(self, param_group: dict) -> None:
        """Add parameters outside every unit, updated like the model's other
        non-unit parameters: one inner step at η on γ·∇L per outer step.

        Units come from the model (discovery or ``units=``), so a new group
        cannot be a unit. Nothing changes when the group is refused.
        """
        if not hasattr(self, "inner"):  # torch.optim.Optimizer.__init__ adding the constructor's groups
            super().add_param_group(param_group)
            return
        group = checked_param_group(param_group, self.defaults, self.solve)
        super().add_param_group(group)  # refuses parameters that already belong to a group
        self.unit_of_group.append(None)
        self.inner.add_param_group({"params": group["params"], "lr": group["lr"]})
        self._measure_if_pending()

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
            if loss is None and not any(p.grad is not None for group in self.param_groups for p in group["params"]):
                # The closure skipped its batch (Lightning's training_step returning None): no loss, no
                # gradient. As torch's optimizers, take no step; a bare step() with nothing to step is refused.
                self._end_step()
                return None
        for group in self.param_groups:
            check_hyperparameters(group, self.solve)
        check_not_meta(self.units)
        if self._output is not None:
            self._output.check()
        # The local problems are solved in the parameters' dtype, also when
        # the forward pass ran under autocast (its records are cast up).
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            started = self._clock()
            # Every refusal happens here, before anything has changed.
            problems = collect_problems(self.param_groups, self.unit_of_group, self.ownership, self.comm,
                                        self._averaged_by_ddp(), self.variant, self.solve,
                                        takes_sparse(self.inner))  # fmt: skip
            # (Each warning names the caller's line: the first frame outside torch and locoprop.)
            warn_fallbacks([p.unit for p in problems if p.unit is not None and p.variant != self.variant],
                           self._fallbacks_said)  # fmt: skip
            warn_unheld(self._frozen_at_build, self.param_groups, self._unheld_said)
            if not self._share_said:
                self._share_said = True
                warn_if_mostly_not_local(self.describe())
            adapting = adaptation.adapting_problems(self, problems)
            saved = adaptation.saved(self, adapting)
            try:
                relative_gamma.start(self, problems)  # γ = ρ·‖a‖/‖g‖ at a group's first step, if ρ is given
                # h of the last step's γ, and the new γ that this step's solves use
                hypergradients = adaptation.adapt(self, adapting) if adapting else {}
                relative_gamma.apply_ceiling(self, problems)  # γ_m ≤ ρ_max·‖a_m‖/‖g_m‖, if a ceiling is given
                prepare_solves(problems, self.param_groups, self.solve, self._parallel_mode(), self.comm.world_size)
                prepared = self._clock()
                finite = all(map(math.isfinite, hypergradients.values())) and all_finite(problems)
                if self.comm.all_true(finite, self.units[0].weight.device):
                    self._solve(problems, adapting)
                    self.last_hypergradients = hypergradients
                else:
                    adaptation.restore(self, saved)
                    self.skipped_steps += 1  # on every rank: the ranks must stay identical
            except BaseException:
                adaptation.restore(self, saved)  # a refused step changes nothing
                raise
        self._end_step()
        self._measure_if_pending()
        self.last_step_seconds = {"targets": prepared - started, "local_solve": self._clock() - prepared}
        return loss

    def _end_step(self) -> None:
        """The step's records are spent, and so is what the forwards showed about DDP."""
        for unit in self.units:
            unit.records.clear()
        self._recorder.step_done()

    def _solve(self, problems: list, adapting: list) -> None:
        """The solves of this step's problems, and the sensitivities of the adapting units' γ."""
        before = adaptation.before_solve(self, adapting) if adapting else {}
        units = [problem for problem in problems if problem.unit is not None]
        others = [problem for problem in problems if problem.unit is None]
        tied = set(self.ownership.shared_by_units)
        if self.solve == "exact":
            solve_exact(units, self.param_groups, self._parallel_mode(), self.comm, self.state)
            solve_iterative(others, self.param_groups, self.inner, self._parallel_mode(), self.comm, tied)
        else:
            solve_iterative(problems, self.param_groups, self.inner, self._parallel_mode(), self.comm, tied,
                            self._compute_dtype, self.compile)  # fmt: skip
        if adapting or any("gamma_sensitivity" in state for state in self.state.values()):
            adaptation.record_sensitivities(self, adapting, before)

    def _measure_if_pending(self) -> None:
        """Have the forward passes keep ‖g‖² while a relative γ start is pending, and only then."""
        self._recorder.measure_gradients = relative_gamma.measures(self.param_groups)

    def _parallel_mode(self) -> str:
        if self.parallel != "auto":
            return self.parallel
        return "streams" if any(unit.weight.is_cuda for unit in self.units) else "batched"

    def _clock(self) -> float:
        # Kernels run asynchronously on a GPU: wait for them when asked to,
        # so that the phase split is real (it costs a little speed).
        if self.synchronize_timing and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Outer state, inner-optimizer state and the skipped-step count."""
        state = super().state_dict()
        state["inner"] = self.inner.state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        check_state_dict(state_dict, [group["unit"] for group in self.param_groups])
        state_dict = dict(state_dict)
        inner = state_dict.pop("inner")
        skipped = state_dict.pop("skipped_steps", 0)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("hypergrad_lr", 0.0)  # a state dict from before hypergradients
            group.setdefault("covariance_refresh", 1)  # ... or from before the amortised exact solve
            group.setdefault("covariance_decay", 0.0)
        self.inner.load_state_dict(inner)
        self.skipped_steps = skipped
        self._measure_if_pending()
