"""How precise is a float32 LocoProp step, against float32 SGD's, at γ from 1e-4 to 1e4?

For a Linear and a Conv2d unit (ResNet-like shapes, scaled down for a CPU),
each variant and solve path, one LocoProp step in float32 is compared with
the same step in float64 from the same (float32-representable) start:

    error = ‖Δθ_float32 − Δθ_float64‖ / ‖Δθ_float64‖   over all parameters.

With one local SGD iteration (SPEC §2's identity) the step is an SGD step at
η·γ; η = STEP/γ keeps that step the same at every γ, so that only LocoProp's
own arithmetic changes with γ, and float32 SGD's error at lr STEP is the
yardstick. With K = 5 iterations (Adam inside, η = 1e-3) there is no SGD to
compare with, and the column shows how far the float32 solve drifts from the
float64 one. Run:

    python examples/float32_precision.py
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from locoprop import LocoPropOptimizer

GAMMAS = (1e-4, 1e-2, 1.0, 1e2, 1e4)
STEP = 1e-2  # η·γ of the one-iteration steps, and SGD's learning rate


def linear_model() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 10))


def conv_model() -> nn.Module:
    # A ResNet stage: 64 → 64 channels, 3×3 kernels, then a classifier.
    convolutions = [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)]
    return nn.Sequential(*convolutions, nn.Flatten(), nn.Linear(64 * 64, 10))


def _data(kind: str):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=generator) if kind == "Linear" else torch.randn(8, 64, 8, 8, generator=generator)
    return x, torch.randint(0, 10, (x.shape[0],), generator=generator)


def _step(model, x, y, optimizer: str, gamma: float, **kwargs) -> list[torch.Tensor]:
    """Δθ of one step, in the model's dtype."""
    start = [p.detach().clone() for p in model.parameters()]
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=STEP)
    else:
        opt = LocoPropOptimizer(model, activation_lr=gamma, **kwargs)
    F.cross_entropy(model(x.to(start[0].dtype)), y).backward()
    opt.step()
    return [p.detach() - q for p, q in zip(model.parameters(), start)]


def step_error(kind: str, optimizer: str, gamma: float = 1.0, **kwargs) -> float:
    torch.manual_seed(0)
    model = (linear_model if kind == "Linear" else conv_model)()
    x, y = _data(kind)
    low = _step(copy.deepcopy(model), x, y, optimizer, gamma, **kwargs)
    high = _step(copy.deepcopy(model).double(), x, y, optimizer, gamma, **kwargs)
    difference = torch.cat([(a.double() - b).flatten() for a, b in zip(low, high)])
    return (difference.norm() / torch.cat([b.flatten() for b in high]).norm()).item()


IDENTITY = dict(local_iters=1, inner="sgd", inner_schedule="constant")
ADAM = dict(local_iters=5, inner="adam", lr=1e-3)
SOLVES = {
    "M batched": dict(variant="M", parallel="batched"),
    "M none": dict(variant="M", parallel="none"),
    "S batched": dict(variant="S", parallel="batched"),
    "S none": dict(variant="S", parallel="none"),
}


def main() -> None:
    print("| unit | solve | γ | float32 SGD | LocoProp K=1 | ratio | LocoProp K=5, Adam |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("Linear", "Conv2d"):
        sgd = step_error(kind, "sgd")
        for name, solve in SOLVES.items():
            for gamma in GAMMAS:
                one = step_error(kind, "locoprop", gamma, lr=STEP / gamma, **solve, **IDENTITY)
                five = step_error(kind, "locoprop", gamma, **solve, **ADAM)
                print(f"| {kind} | {name} | {gamma:g} | {sgd:.2e} | {one:.2e} | {one / sgd:.2f} | {five:.2e} |")


if __name__ == "__main__":
    main()
