"""Workloads (SPEC §5): a model, its loss and what LocoProp needs to know.

A workload builds its network for a data set, computes the mini-batch loss
the optimizer sees, and names the loss kind ("bce", "cross_entropy"), from
which LocoProp-M takes its output transfer function and K-FAC its sampled
Fisher. Evaluation losses use the same definition over a whole split.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sweeps.runner.data import DataShape

__all__ = ["WORKLOADS", "Workload", "build_model", "check_width_mult", "get_workload"]

# The official deep autoencoder: 784-1000-500-250-30-250-500-1000-784.
AUTOENCODER_WIDTHS = (1000, 500, 250)
AUTOENCODER_CODE = 30


@dataclasses.dataclass(frozen=True)
class Workload:
    """One model family and its loss.

    Attributes:
        name: registry name.
        loss_kind: "bce" or "cross_entropy" (see ``baselines.registry``).
        description: one line for reports.
    """

    name: str
    loss_kind: str
    description: str

    def build_model(self, shape: DataShape, width_mult: float = 1.0, depth_mult: int = 1) -> nn.Module:
        raise NotImplementedError

    def target(self, x: Tensor, y: Tensor) -> Tensor:
        """What the model's output is compared with."""
        return x if self.loss_kind == "bce" else y

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mini-batch loss: BCE summed over pixels or cross-entropy, averaged over the batch."""
        if self.loss_kind == "bce":
            return F.binary_cross_entropy_with_logits(output, target, reduction="none").sum(1).mean()
        return F.cross_entropy(output, target)

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """Extra per-split metrics (summed over examples; the caller averages)."""
        if self.loss_kind == "cross_entropy":
            return {"error": (output.argmax(1) != target).sum().item()}
        return {}


# Beyond it the reference autoencoder's widest layer has over 100,000 units
# (billions of weights): a mistyped value, not an experiment.
MAX_WIDTH_MULT = 100.0


def build_model(
    workload: Workload, shape: DataShape, width_mult: float, depth_mult: int, device: torch.device
) -> nn.Module:
    """The workload's model on ``device``; a model too large for its memory is bad input, said in one line."""
    try:
        return workload.build_model(shape, width_mult, depth_mult).to(device)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
            raise
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"The {workload.name} model with width_mult={width_mult} and depth_mult={depth_mult} does not fit in the "
            f"memory of {device} ({type(err).__name__}: {first_line}); lower --width-mult or --depth-mult"
        ) from None


def check_width_mult(width_mult: float) -> float:
    """``width_mult`` if it is a number in (0, MAX_WIDTH_MULT]; a ValueError naming it otherwise."""
    if isinstance(width_mult, bool) or not isinstance(width_mult, numbers.Real) or not 0 < width_mult < math.inf:
        raise ValueError(f"Invalid width_mult: {width_mult!r}; expected a finite number > 0")
    if width_mult > MAX_WIDTH_MULT:
        raise ValueError(f"Invalid width_mult: {width_mult!r}; at most {MAX_WIDTH_MULT:g} (layers 100× the reference)")
    return width_mult


def _scaled(width: int, mult: float) -> int:
    return max(1, round(width * check_width_mult(mult)))


def _glorot_uniform_(model: nn.Module) -> nn.Module:
    # The official code initialises with Glorot-uniform weights and zero biases.
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


class Autoencoder(Workload):
    """The reference deep autoencoder of SPEC §2 with tanh hidden units, a
    linear 30-unit bottleneck and a sigmoid output folded into BCE.

    ``width_mult`` scales every hidden width (the code too); ``depth_mult``
    repeats each hidden layer of the encoder and decoder that many times.
    """

    def build_model(self, shape: DataShape, width_mult: float = 1.0, depth_mult: int = 1) -> nn.Module:
        widths = [_scaled(w, width_mult) for w in AUTOENCODER_WIDTHS for _ in range(depth_mult)]
        code = _scaled(AUTOENCODER_CODE, width_mult)
        layers: list[nn.Module] = []
        previous = shape.num_features
        for width in widths:
            layers += [nn.Linear(previous, width), nn.Tanh()]
            previous = width
        layers.append(nn.Linear(previous, code))  # linear bottleneck
        previous = code
        for width in reversed(widths):
            layers += [nn.Linear(previous, width), nn.Tanh()]
            previous = width
        layers.append(nn.Linear(previous, shape.num_features))
        return _glorot_uniform_(nn.Sequential(*layers))


class MLPClassifier(Workload):
    """A tanh MLP classifier: 784-500-250-classes (widths × width_mult)."""

    def build_model(self, shape: DataShape, width_mult: float = 1.0, depth_mult: int = 1) -> nn.Module:
        layers: list[nn.Module] = []
        previous = shape.num_features
        for width in (500, 250):
            for _ in range(depth_mult):
                layers += [nn.Linear(previous, _scaled(width, width_mult)), nn.Tanh()]
                previous = _scaled(width, width_mult)
        layers.append(nn.Linear(previous, shape.num_classes))
        return _glorot_uniform_(nn.Sequential(*layers))


class CNNClassifier(Workload):
    """A small ReLU CNN: two 5×5 conv layers with stride 2 (more of stride 1
    with ``depth_mult``), then a linear head."""

    def build_model(self, shape: DataShape, width_mult: float = 1.0, depth_mult: int = 1) -> nn.Module:
        channels, height, width = shape.image_shape
        c1, c2 = _scaled(16, width_mult), _scaled(32, width_mult)
        layers: list[nn.Module] = [
            nn.Unflatten(1, shape.image_shape),
            nn.Conv2d(channels, c1, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 5, stride=2, padding=2),
            nn.ReLU(),
        ]
        for _ in range(depth_mult - 1):
            layers += [nn.Conv2d(c2, c2, 5, padding=2), nn.ReLU()]
        # Each stride-2 convolution (padding 2, kernel 5) halves a side, rounding up.
        positions = math.ceil(height / 4) * math.ceil(width / 4)
        layers += [nn.Flatten(), nn.Linear(c2 * positions, shape.num_classes)]
        return _glorot_uniform_(nn.Sequential(*layers))


WORKLOADS: dict[str, Workload] = {
    "autoencoder": Autoencoder("autoencoder", "bce", "deep autoencoder 784-1000-500-250-30 (tanh), BCE"),
    "mlp": MLPClassifier("mlp", "cross_entropy", "MLP classifier 784-500-250-10 (tanh), cross-entropy"),
    "cnn": CNNClassifier("cnn", "cross_entropy", "CNN classifier, two 5x5 conv layers (ReLU), cross-entropy"),
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"Unknown workload: {name!r}; expected one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]
