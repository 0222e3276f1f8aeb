"""The exact S solve of every unit, in one process or on W ranks: θ ← θ^old − γ·G(C + λI)⁻¹.

The math is :mod:`locoprop.exact`; this module drives it over a step's
problems. Every unit is solved before any parameter or state changes, so a
C + λI that does not factor refuses the step with nothing changed.

**Every step** (``covariance_refresh`` T = 1 and ``covariance_decay`` ρ = 0,
the defaults): C is this batch's, solved by Cholesky and two triangular
solves; nothing is kept. On W ranks C is summed over ranks once (G is
already the global mean), each unit's Cholesky solve runs on one owner rank
(greedy by d³) and its Δ is broadcast.

**Amortised** (T > 1 or ρ > 0; FOOF, Benzing 2022: K-FAC's input factor
alone, refreshed rarely). A unit keeps, in its weight's optimizer state:

- ``covariance_inverse``: P⁻¹ = (C̄ + λI)⁻¹, d × d (d = d_in + 1 with a bias);
- ``covariance_age``: how many steps have used it;
- ``covariance_prox``: the λ it was formed with;
- ``covariance`` (ρ > 0 only): the lower triangle of C̄ (zeros above).

A unit refreshes at a step where it has no P⁻¹, its age is T or more (so at
its steps 0, T, 2T, …; a skipped step does not count) or λ changed: C of
this batch (summed over ranks), C̄ ← ρ·C̄ + (1 − ρ)·C (the first C̄ is C),
P⁻¹ from C̄ + λI by Cholesky (on W ranks on one owner rank, which broadcasts
it, so every rank holds the same state). Every step, refresh or not, is
θ ← θ^old − γ·G·P⁻¹ (added into θ by one matmul per parameter, unless γ
adapts and its sensitivity needs Δ = G·P⁻¹) and age ← age + 1; on W ranks
every rank takes the product itself, so the steps between refreshes
communicate nothing but G.

C̄ averages refresh steps only: adding every step's C would cost a Gram
matrix per step (N·d²/2 multiply-adds, on the reference autoencoder at
batch 1000 a quarter of an Adam step), which is what T amortises. Between
refreshes a unit's step costs the product G·P⁻¹ (d_out·d² multiply-adds:
the same arithmetic as the two triangular solves, but as one matmul); a
refresh adds the Gram matrix, Cholesky and the inverse (about d³), once per
T steps. A batch of another size than the refresh's (an epoch's last) uses
P⁻¹ as it is: C is a sum over rows, so its step is the one of the refresh
batch's covariance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from locoprop.distributed import Communicator, greedy_owners
from locoprop.exact import (
    averaged_covariance,
    covariance_inverse,
    exact_s_direction,
    exact_s_solution,
    full_covariance,
    lower_covariance,
    solve_covariance,
)
from locoprop.local_gradients import input_rows
from locoprop.problem import LocalProblem

__all__ = ["COVARIANCE_STATE", "amortised", "solve_exact"]

# What an amortised unit keeps in its weight's state (dropped when T and ρ return to 1 and 0).
COVARIANCE_STATE = ("covariance_inverse", "covariance_age", "covariance_prox", "covariance")


def amortised(group: dict) -> bool:
    """Whether a param group's exact solve reuses its covariance (T > 1 or ρ > 0)."""
    return group["covariance_refresh"] > 1 or group["covariance_decay"] > 0


def solve_exact(
    problems: list[LocalProblem], param_groups: list[dict], mode: str, comm: Communicator, state: dict
) -> None:
    """The exact step of the units' ``problems``; ``mode`` "none" takes the readable reference; ``state`` is the
    optimizer's (per parameter), where amortised units keep their covariance."""
    reusing = [problem for problem in problems if amortised(param_groups[problem.group_index])]
    each_step = [problem for problem in problems if not amortised(param_groups[problem.group_index])]
    found: dict[LocalProblem, Tensor] = {}
    if each_step:
        found.update(zip(each_step, _each_step_directions(each_step, param_groups, mode, comm)))
    inverses, commit = _amortised_inverses(reusing, param_groups, mode, comm, state) if reusing else ([], None)
    # Nothing failed: from here on the step changes parameters and state.
    if commit is not None:
        commit()
    for problem in each_step:
        for key in COVARIANCE_STATE:  # T and ρ were set back: the kept covariance would only take memory
            state[problem.params[0]].pop(key, None)
    for problem, inverse in zip(reusing, inverses):
        if param_groups[problem.group_index]["hypergrad_lr"] > 0:  # its sensitivity −Δ needs Δ itself
            found[problem] = torch.mm(_joined(problem.linear_terms()), inverse)
        else:
            _step_in_place(problem, inverse)
    _apply_directions([problem for problem in problems if problem in found], [found[p] for p in problems if p in found])


def _each_step_directions(
    problems: list[LocalProblem], param_groups: list[dict], mode: str, comm: Communicator
) -> list[Tensor]:
    """Δ = G(C + λI)⁻¹ of each unit with C of this batch alone."""
    if comm.distributed:
        return _directions_on_ranks(problems, param_groups, comm)
    if mode == "none":
        return _reference_directions(problems, param_groups)
    directions, infos = [], []
    for problem in problems:
        prox = param_groups[problem.group_index]["prox"]
        direction, info = exact_s_direction(input_rows(problem), _joined(problem.linear_terms()), prox)
        directions.append(direction)
        infos.append(info)
    if torch.stack(infos).any():
        failed = [problem.unit.name for problem, info in zip(problems, infos) if info]
        raise _not_positive_definite(failed, directions[0].dtype)
    return directions


def _reference_directions(problems: list[LocalProblem], param_groups: list[dict]) -> list[Tensor]:
    """Δ = (θ^old − θ*)/γ of each unit from :func:`~locoprop.exact.exact_s_solution`."""
    directions, failed = [], []
    for problem in problems:
        prox = param_groups[problem.group_index]["prox"]
        try:
            solution = exact_s_solution(problem.params, problem.inputs, problem.linear_terms(),
                                        problem.activation_lr, prox)  # fmt: skip
        except torch.linalg.LinAlgError:
            failed.append(problem.unit.name)
            continue
        steps = [
            (p.detach() - new.reshape(p.shape)).reshape(p.shape[0], -1) for p, new in zip(problem.params, solution)
        ]
        directions.append(torch.cat(steps, dim=1).div_(problem.activation_lr))
    if failed:
        raise _not_positive_definite(failed, problems[0].params[0].dtype)
    return directions


def _directions_on_ranks(problems: list[LocalProblem], param_groups: list[dict], comm: Communicator) -> list[Tensor]:
    """Δ of every unit on W ranks: C = Σx̃ᵀx̃ summed over ranks in one bucket, each Cholesky solve on one
    owner rank, its Δ broadcast to the others."""
    covariances = [lower_covariance(input_rows(problem), has_bias=len(problem.params) == 2) for problem in problems]
    crosses = [_joined(problem.linear_terms()) for problem in problems]
    comm.sum_lower_(covariances, [])
    owners = greedy_owners([float(problem.params[0].shape[1] + 1) ** 3 for problem in problems], comm.world_size)
    directions, infos = [], []
    for problem, covariance, cross, owner in zip(problems, covariances, crosses, owners):
        if owner == comm.rank:
            direction, info = solve_covariance(covariance, cross, param_groups[problem.group_index]["prox"])
            direction = direction.contiguous()  # a broadcast sends memory as it lies: the receivers' layout
        else:
            direction, info = torch.empty_like(cross), cross.new_zeros((), dtype=torch.int32)
        directions.append(direction)
        infos.append(info.reshape(1).to(cross.dtype))
    for direction, info, owner in zip(directions, infos, owners):
        comm.broadcast_(direction, owner)
        comm.broadcast_(info, owner)
    if torch.cat(infos).any():
        failed = [problem.unit.name for problem, info in zip(problems, infos) if info.item()]
        raise _not_positive_definite(failed, directions[0].dtype)
    return directions


def _refresh_due(kept: dict, group: dict, weight: Tensor) -> bool:
    """Whether a unit forms P⁻¹ anew at this step: none yet, T steps used it, λ changed, or the weight moved
    to another device or dtype since."""
    inverse = kept.get("covariance_inverse")
    return (
        inverse is None
        or kept["covariance_age"] >= group["covariance_refresh"]
        or kept["covariance_prox"] != group["prox"]
        or inverse.device != weight.device
        or inverse.dtype != weight.dtype
    )


def _amortised_inverses(
    problems: list[LocalProblem], param_groups: list[dict], mode: str, comm: Communicator, state: dict
) -> tuple[list[Tensor], Callable[[], None]]:
    """P⁻¹ of each amortised unit, refreshed where due, and the function that keeps the new state (called
    once every unit of the step has been solved)."""
    groups = [param_groups[problem.group_index] for problem in problems]
    due = [i for i, (problem, group) in enumerate(zip(problems, groups))
           if _refresh_due(state[problem.params[0]], group, problem.params[0])]  # fmt: skip
    inverses = [state[problem.params[0]].get("covariance_inverse") for problem in problems]
    averages: dict[int, Tensor] = {}
    if due:
        if mode == "none" and not comm.distributed:  # the readable reference: x̃ formed, all of C
            covariances = [full_covariance(problems[i].inputs, len(problems[i].params) == 2, problems[i].params[0])
                           for i in due]  # fmt: skip
        else:
            covariances = [lower_covariance(input_rows(problems[i]), len(problems[i].params) == 2) for i in due]
        comm.sum_lower_(covariances, [])
        owners = greedy_owners([float(c.shape[0]) ** 3 for c in covariances], comm.world_size)
        infos = []
        for i, covariance, owner in zip(due, covariances, owners):
            decay, kept = groups[i]["covariance_decay"], state[problems[i].params[0]]
            if decay > 0:  # identical on every rank: the same sums, the same arithmetic
                averages[i] = averaged_covariance(kept.get("covariance"), covariance, decay)
                covariance = averages[i].clone()  # C̄ is kept without λ
            if owner == comm.rank:
                inverse, info = covariance_inverse(covariance, groups[i]["prox"])
            else:
                inverse, info = torch.empty_like(covariance), covariance.new_zeros((), dtype=torch.int32)
            inverses[i] = inverse
            infos.append(info.reshape(1).to(covariance.dtype))
        for i, info, owner in zip(due, infos, owners):
            comm.broadcast_(inverses[i], owner)
            comm.broadcast_(info, owner)
        if torch.cat(infos).any():
            failed = [problems[i].unit.name for i, info in zip(due, infos) if info.item()]
            raise _not_positive_definite(failed, covariances[0].dtype)

    def commit() -> None:
        for i, (problem, group) in enumerate(zip(problems, groups)):
            kept = state[problem.params[0]]
            if i in due:
                kept.update(covariance_inverse=inverses[i], covariance_age=0, covariance_prox=group["prox"])
                if i in averages:
                    kept["covariance"] = averages[i]
                else:
                    kept.pop("covariance", None)
            kept["covariance_age"] += 1

    return inverses, commit


def _step_in_place(problem: LocalProblem, inverse: Tensor) -> None:
    """θ ← θ^old − γ·G·P⁻¹, each parameter's product added into it (no Δ formed, no pass of its own), for a
    unit whose γ does not adapt (nothing needs Δ). A parameter whose ``.grad`` is None is left as it is."""
    weight, *bias = problem.params
    cross, d_in = _joined(problem.linear_terms()), weight.shape[1]
    if problem.linear_term[0] is not None:
        weight.addmm_(cross, inverse[:, :d_in], alpha=-problem.activation_lr)
    if bias and problem.linear_term[1] is not None:
        bias[0].addmv_(cross, inverse[:, d_in], alpha=-problem.activation_lr)


def _apply_directions(problems: list[LocalProblem], directions: list[Tensor]) -> None:
    """θ ← θ^old − γ·Δ for each unit's [weight | bias] direction Δ, kept on the problem (views, no copy) for
    the sensitivity ∂θ/∂γ = −Δ of the next step's hypergradient. A parameter whose ``.grad`` is None is left
    as it is (as torch.optim leaves it)."""
    for problem, direction in zip(problems, directions):
        weight, *bias = problem.params
        problem.exact_direction = [direction[:, : weight.shape[1]], *([direction[:, -1]] if bias else [])]
        for p, d, term in zip(problem.params, problem.exact_direction, problem.linear_term):
            if term is not None:
                p.add_(d, alpha=-problem.activation_lr)


def _joined(terms: list[Tensor]) -> Tensor:
    """[∇W | ∇b] of a linear unit as one matrix (no copy without a bias)."""
    return torch.cat([terms[0], terms[1][:, None]], dim=1) if len(terms) == 2 else terms[0]


def _not_positive_definite(units: list[str], dtype: torch.dtype) -> torch.linalg.LinAlgError:
    return torch.linalg.LinAlgError(
        f"Exact solve: C + λI of unit(s) {units} is not positive definite in {dtype}; "
        "no parameter was changed. Raise prox"
    )
