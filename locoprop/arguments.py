"""The checks of ``LocoPropOptimizer``'s arguments and hyperparameters.

Every check raises before anything changes, with the bad value in the
message (``ValueError(f"Invalid learning rate: {lr!r}; ...")``, as
torch.optim does). The per-group hyperparameters are checked again at every
step, since users edit ``param_groups`` between steps.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from locoprop.hypergrad import HYPERGRAD_MODES, HYPERGRAD_RULES, HYPERGRAD_SCOPES
from locoprop.inner import INNER_SCHEDULES
from locoprop.local_gradients import PARALLEL_MODES
from locoprop.transfer import TRANSFER_NAMES
from locoprop.units import Unit

__all__ = [
    "LOCAL_DTYPES",
    "SOLVES",
    "VARIANTS",
    "check_hyperparameters",
    "check_not_meta",
    "check_options",
    "check_state_dict",
    "check_unit",
    "checked_param_group",
    "plain_float",
]

VARIANTS = ("M", "S")
# The dtypes the inner iterations' matmuls may run in (locoprop.kernels, "Low precision").
LOCAL_DTYPES = ("bfloat16",)
SOLVES = ("iterative", "exact")


def check_options(
    model,
    *,
    variant: str,
    solve: str,
    parallel: str,
    compile: bool,
    prox,
    hypergrad: str,
    hypergrad_iters,
    output_activation: str | None,
    hypergrad_rule: str = "plain",
    local_dtype: str | None = None,
    hypergrad_scope: str = "unit",
) -> None:
    """The constructor's options that are not per-group hyperparameters."""
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
    if hypergrad not in HYPERGRAD_MODES:
        raise ValueError(f"Invalid hypergrad: {hypergrad!r}; expected one of {', '.join(HYPERGRAD_MODES)}")
    if isinstance(hypergrad_iters, bool) or not isinstance(hypergrad_iters, int) or hypergrad_iters < 1:
        raise ValueError(f"Invalid hypergrad_iters: {hypergrad_iters!r}; expected an integer ≥ 1")
    if hypergrad_rule not in HYPERGRAD_RULES:
        raise ValueError(f"Invalid hypergrad_rule: {hypergrad_rule!r}; expected one of {', '.join(HYPERGRAD_RULES)}")
    if hypergrad_scope not in HYPERGRAD_SCOPES:
        raise ValueError(f"Invalid hypergrad_scope: {hypergrad_scope!r}; expected one of {', '.join(HYPERGRAD_SCOPES)}")
    if solve == "exact" and variant != "S":
        raise ValueError(f"solve='exact' needs variant 'S', got variant {variant!r}")
    if solve == "exact" and not prox > 0:
        raise ValueError(f"solve='exact' needs prox > 0 (C + λI must be invertible), got prox={prox}")
    if local_dtype is not None and local_dtype not in LOCAL_DTYPES:
        raise ValueError(
            f"Invalid local_dtype: {local_dtype!r}; expected None (the parameters' dtype) or one of "
            f"{', '.join(map(repr, LOCAL_DTYPES))}"
        )
    if local_dtype is not None and solve == "exact":
        raise ValueError(
            f"local_dtype={local_dtype!r} sets the dtype of the iterative solve's inner matmuls; solve='exact' has "
            "none: leave local_dtype=None"
        )
    if output_activation is not None and output_activation not in TRANSFER_NAMES:
        raise ValueError(
            f"Invalid output_activation: {output_activation!r}; expected one of {', '.join(TRANSFER_NAMES)}"
        )


def check_hyperparameters(group: dict, solve: str = "iterative") -> None:
    """A param group's lr, activation_lr, local_iters, inner_schedule, prox, hypergrad_lr, relative_activation_lr,
    max_relative_activation_lr, relative_activation_lr_ceiling and, for ``solve``, covariance_refresh and
    covariance_decay."""
    lr, activation_lr, local_iters = group["lr"], group["activation_lr"], group["local_iters"]
    for name, value in (("learning rate", lr), ("activation_lr", activation_lr), ("prox", group["prox"])):
        if isinstance(value, Tensor):
            raise ValueError(f"Invalid {name}: a tensor ({value!r}); LocoPropOptimizer needs a float (.item())")
    if not (_is_real(lr) and 0 < lr < math.inf):
        # A schedule that reaches 0 (transformers' warm-up from 0, LinearLR(start_factor=0)) is the usual cause.
        hint = "; if a schedule set it, start and end the schedule above 0" if lr == 0 else ""
        raise ValueError(f"Invalid learning rate: {lr!r}; expected a finite number > 0{hint}")
    if not (_is_real(activation_lr) and 0 < activation_lr < math.inf):
        raise ValueError(f"Invalid activation_lr: {activation_lr!r}; expected a finite number > 0")
    if isinstance(local_iters, bool) or not isinstance(local_iters, int) or local_iters < 1:
        raise ValueError(f"Invalid local_iters: {local_iters!r}; expected an integer ≥ 1 (a Python int)")
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
    for name in ("relative_activation_lr", "max_relative_activation_lr", "relative_activation_lr_ceiling"):
        rho = group.get(name)
        if rho is not None and (isinstance(rho, Tensor) or not (_is_real(rho) and 0 < rho < math.inf)):
            raise ValueError(f"Invalid {name}: {rho!r}; expected None or a finite number > 0")
    _check_covariance(group.get("covariance_refresh", 1), group.get("covariance_decay", 0.0), solve)


def checked_param_group(param_group, defaults: dict, solve: str) -> dict:
    """A group for ``add_param_group``: parameters outside every unit (units come from the model), with
    valid hyperparameters."""
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
    check_hyperparameters({**defaults, **group}, solve)
    return group


def check_state_dict(state_dict, units: list) -> None:
    """Refuse a state dict that another optimizer saved, or one for other units."""
    if not (isinstance(state_dict, dict) and "inner" in state_dict and "param_groups" in state_dict):
        keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(
            f"Not a LocoPropOptimizer state dict (it has {keys}, but no 'inner' optimizer state); "
            "it was saved by another optimizer"
        )
    saved_units = [group.get("unit") for group in state_dict["param_groups"]]
    if saved_units != units:
        raise ValueError(f"State dict is for units {saved_units}, but this optimizer has units {units}")


def _check_covariance(refresh, decay, solve: str) -> None:
    """T = covariance_refresh and ρ = covariance_decay of the exact solve (:mod:`locoprop.solve_exact`)."""
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise ValueError(f"Invalid covariance_refresh: {refresh!r}; expected an integer ≥ 1 (steps between refreshes)")
    if isinstance(decay, Tensor) or not (_is_real(decay) and 0 <= decay < 1):
        raise ValueError(f"Invalid covariance_decay: {decay!r}; expected a number in [0, 1)")
    # The iterative solve keeps no covariance from step to step: T and ρ would silently change nothing.
    if solve != "exact" and (refresh != 1 or decay != 0):
        name, value = ("covariance_refresh", refresh) if refresh != 1 else ("covariance_decay", decay)
        raise ValueError(
            f"{name}={value!r} applies to solve='exact' only (the iterative solve keeps no input covariance); "
            "leave it at its default or use solve='exact'"
        )


def check_unit(unit: Unit, solve: str, variant: str) -> None:
    """Whether ``unit``, as far as its module tells before a forward pass, can take part in ``solve`` of
    ``variant`` (the maps seen at run time are checked when the step collects its problems)."""
    if solve == "exact" and unit.kind not in (None, "linear"):
        raise ValueError(
            f"solve='exact' supports nn.Linear units only; unit {unit.name!r} is a {type(unit.module).__name__}: "
            "use solve='iterative', or pass units=[(layer, transfer), ...] with nn.Linear layers only"
        )
    # A convolution's output is N × C × spatial: the softmax over its last dimension, a spatial one, is what
    # output_activation names when nothing tells which dimension the loss reads (the output is pooled or
    # summed from the convolution's); cross-entropy's is over the channels, dim=1, or the positions of a span
    # head, which the output activation gets as softmax(dim=…) when the model's output shows them.
    # (Variant S matches pre-activations: it reads no transfer function.)
    if variant == "M" and unit.transfer.name == "softmax" and (unit.kind or "").startswith("conv"):
        raise ValueError(
            f"Softmax over the last dimension does not apply to {type(unit.module).__name__} unit {unit.name!r}: "
            "output_activation names it where nothing shows which dimension of the convolution's output the loss "
            "reads (the model's output is pooled, upsampled or summed from it, not a view of it). A convolution's "
            "softmax is over its channels, nn.Softmax(dim=1), or a dimension named by its index (nn.Softmax(dim=2): "
            "a span head's positions); name it with units=[(layer, nn.Softmax(dim=1)), ...] if that is what the "
            "loss applies, or use variant='S'"
        )


def check_not_meta(units: list[Unit]) -> None:
    """Refuse units whose layers were moved to the meta device after the optimizer was built.

    (``model.to("meta")`` gives the modules new parameters: look at theirs.)
    """
    meta = [f"{unit.name}.{name}" for unit in units for name, p in unit.module.named_parameters(recurse=False)
            if p.is_meta]  # fmt: skip
    if meta:
        raise RuntimeError(
            f"Parameters {meta[:3]}{' …' if len(meta) > 3 else ''} are on the meta device, which holds no values, "
            "so there is nothing to step; move the model to a real device before training"
        )


def plain_float(value):
    """A NumPy scalar as a float (torch.optim takes them too): param_groups
    then hold plain numbers, which a weights_only checkpoint loads."""
    # (np.float64 is a float subclass, np.float32 is not: test the exact type.)
    if isinstance(value, numbers.Real) and type(value) not in (bool, int, float) and not isinstance(value, Tensor):
        return float(value)
    return value


def _is_real(value) -> bool:
    # bool is an int to Python, but lr=True is a mistake, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool)
