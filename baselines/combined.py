"""One optimizer made of several, each over its own parameters."""

from __future__ import annotations

import torch

__all__ = ["CombinedOptimizer"]


class CombinedOptimizer(torch.optim.Optimizer):
    """Steps several optimizers as one (for example Muon on 2-D weights and
    AdamW on the rest).

    ``param_groups`` is the concatenation of the parts' groups, the same
    dictionaries, so lr schedulers and per-group settings reach the parts.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        super().__init__(params, {})
        self.optimizers = list(optimizers)
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict["optimizers"]
        if len(parts) != len(self.optimizers):
            raise ValueError(f"State dict has {len(parts)} optimizers, this one has {len(self.optimizers)}")
        for opt, part in zip(self.optimizers, parts):
            opt.load_state_dict(part)
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]
