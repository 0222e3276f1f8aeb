"""The exact S solve of every unit, in one process or on W ranks: θ ← θ^old − γ·G(C + λI)⁻¹.

The math is :mod:`locoprop.exact`; this module drives it over a step's
problems. Every unit is solved before any parameter changes, so a C + λI
that does not factor refuses the step with nothing changed. On W ranks C is
summed over ranks once (G is already the global mean), each unit's Cholesky
solve runs on one owner rank (greedy by d³) and its Δ is broadcast.
"""

from __future__ import annotations

import torch
from torch import Tensor

from locoprop.distributed import Communicator, greedy_owners
from locoprop.exact import exact_s_direction, exact_s_solution, lower_covariance, solve_covariance
from locoprop.local_gradients import input_rows
from locoprop.problem import LocalProblem

__all__ = ["solve_exact"]


def solve_exact(problems: list[LocalProblem], param_groups: list[dict], mode: str, comm: Communicator) -> None:
    """The exact step of the units' ``problems``; ``mode`` "none" takes the readable reference."""
    if comm.distributed:
        directions = _directions_on_ranks(problems, param_groups, comm)
    elif mode == "none":
        directions = _reference_directions(problems, param_groups)
    else:
        directions, infos = [], []
        for problem in problems:
            prox = param_groups[problem.group_index]["prox"]
            direction, info = exact_s_direction(input_rows(problem), _joined(problem.linear_terms()), prox)
            directions.append(direction)
            infos.append(info)
        if torch.stack(infos).any():
            failed = [problem.unit.name for problem, info in zip(problems, infos) if info]
            raise _not_positive_definite(failed, directions[0].dtype)
    _apply_directions(problems, directions)


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
