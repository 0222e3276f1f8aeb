"""Shampoo (pytorch_optimizer.ScalableShampoo) with a state_dict of plain data.

ScalableShampoo keeps two objects per parameter in its state, a
``PreConditioner`` and a graft; ``torch.load(weights_only=True)`` refuses
them, so a checkpoint of it could not be resumed. Here ``state_dict()``
stores the tensors those objects hold instead of the objects, and
``load_state_dict()`` builds fresh objects for each parameter (as the first
step does, from the parameter's shape and the hyperparameters) and puts the
tensors back. Everything else about the objects is derived from the
parameter and the hyperparameters, so the reloaded optimizer continues
exactly.
"""

from __future__ import annotations

import torch
from pytorch_optimizer import ScalableShampoo
from pytorch_optimizer.optimizer.utils.graft import build_graft
from pytorch_optimizer.optimizer.utils.preconditioner import PreConditioner

__all__ = ["Shampoo"]

# The attributes of each per-parameter object that change while training
# (its state); a graft has "statistics" only for the AdaGrad and RMSProp kinds.
STATE_TENSORS = {"pre_conditioner": ("statistics", "pre_conditioners"), "graft": ("momentum", "statistics")}


class Shampoo(ScalableShampoo):
    """ScalableShampoo whose state_dict holds only tensors, numbers and containers."""

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        state_dict["state"] = {
            index: {key: _held_tensors(key, value) if key in STATE_TENSORS else value for key, value in state.items()}
            for index, state in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        # The objects are rebuilt and filled first, so that a state that does
        # not fit is refused before anything changes. Their tensors go back
        # uncast: torch would cast them to the parameter's dtype, but the
        # statistics keep their own.
        params = [p for group in self.param_groups for p in group["params"]]
        beta2 = {index: group["betas"][1] for group in state_dict["param_groups"] for index in group["params"]}
        rebuilt = {}
        for index, state in state_dict["state"].items():
            held = {key: value for key, value in state.items() if key in STATE_TENSORS and isinstance(value, dict)}
            if not held:
                continue
            if not 0 <= index < len(params):
                raise ValueError(f"Shampoo state for parameter {index}, but this optimizer has {len(params)}")
            fresh = self._fresh_objects(params[index], beta2[index])
            for key, saved in held.items():
                _restore_tensors(fresh[key], key, saved)
            rebuilt[index] = {key: fresh[key] for key in held}
        plain_state = {
            index: {key: value for key, value in state.items() if key not in rebuilt.get(index, {})}
            for index, state in state_dict["state"].items()
        }
        super().load_state_dict({**state_dict, "state": plain_state})
        for index, objects in rebuilt.items():
            self.state[params[index]].update(objects)

    def _fresh_objects(self, param: torch.Tensor, beta2: float) -> dict:
        """The per-parameter objects as ScalableShampoo.init_group makes them."""
        pre_conditioner = PreConditioner(
            param,
            beta2,
            self.inverse_exponent_override,
            self.block_size,
            self.skip_preconditioning_rank_lt,
            self.no_preconditioning_for_layers_with_dim_gt,
            self.shape_interpretation,
            self.pre_conditioner_type,
            self.matrix_eps,
            self.use_svd,
        )
        return {"pre_conditioner": pre_conditioner, "graft": build_graft(param, self.graft_type, self.diagonal_eps)}


def _held_tensors(key: str, obj) -> dict:
    return {name: getattr(obj, name) for name in STATE_TENSORS[key] if hasattr(obj, name)}


def _restore_tensors(obj, key: str, saved: dict) -> None:
    expected = {name for name in STATE_TENSORS[key] if hasattr(obj, name)}
    if set(saved) != expected:
        raise ValueError(
            f"Shampoo state for {key!r} holds {sorted(saved)}, this optimizer's holds {sorted(expected)}; "
            "was it saved with other hyperparameters (graft_type)?"
        )
    for name, value in saved.items():
        setattr(obj, name, _like(value, getattr(obj, name), f"{key}.{name}"))


def _like(saved, fresh, what: str):
    """``saved`` copied to the device and dtype of ``fresh`` (a tensor or a list of tensors)."""
    if isinstance(fresh, torch.Tensor) and isinstance(saved, torch.Tensor) and saved.shape == fresh.shape:
        return saved.to(device=fresh.device, dtype=fresh.dtype, copy=True)
    if isinstance(fresh, list) and isinstance(saved, (list, tuple)) and len(saved) == len(fresh):
        return [_like(s, f, what) for s, f in zip(saved, fresh)]
    raise ValueError(f"Shampoo state {what} does not fit this parameter (saved {_shape(saved)}, needs {_shape(fresh)})")


def _shape(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return type(value).__name__
