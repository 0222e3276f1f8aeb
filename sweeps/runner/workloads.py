"""Workloads (SPEC §5): a model, its loss and what LocoProp needs to know.

A workload builds its network for a data set, computes the mini-batch loss
the optimizer sees, and names the loss kind ("bce", "cross_entropy"), from
which LocoProp-M takes its output transfer function and K-FAC its sampled
Fisher. Evaluation losses use the same definition over a split.

Each workload also says what data it takes (images or token sequences, and
whether it needs labels: :func:`check_data`), its default data set and batch
size, and how many examples of a split its evaluations read.

- ``autoencoder``: the reference deep autoencoder (tanh), BCE;
- ``mlp``, ``cnn``: small classifiers, cross-entropy;
- ``curves``: the CURVES autoencoder of Hinton & Salakhutdinov (2006) and
  Martens (2010), logistic units, BCE;
- ``resnet``: a small ResNet with BatchNorm (:mod:`sweeps.runner.resnet`),
  cross-entropy;
- ``transformer``: a small decoder-only language model
  (:mod:`sweeps.runner.language_model`), next-token cross-entropy.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sweeps.runner.data import DATASETS, DataShape, data_shape
from sweeps.runner.language_model import DecoderLM
from sweeps.runner.resnet import SmallResNet

__all__ = ["WORKLOADS", "Workload", "build_model", "check_data", "check_width_mult", "get_workload"]

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
        inputs: the kind of data it takes: "images" or "tokens" (``DataShape.kind``).
        default_data: the data set of a run that names none.
        default_batch_size: the batch size of a run that names none.
        eval_examples: how many examples of each split an evaluation reads at
            most (a fixed subset of a larger split: ``Dataset.evaluated``);
            None: whole splits. Set where whole splits would cost more than
            the training between evaluations on two CPU cores.
    """

    name: str
    loss_kind: str
    description: str
    inputs: str = "images"
    default_data: str = "mnist5k"
    default_batch_size: int = 1000
    eval_examples: int | None = None

    def build_model(self, shape: DataShape, width_mult: float = 1.0, depth_mult: int = 1) -> nn.Module:
        raise NotImplementedError

    def target(self, x: Tensor, y: Tensor) -> Tensor:
        """What the model's output is compared with."""
        return x if self.loss_kind == "bce" else y

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mini-batch loss: BCE summed over pixels, or cross-entropy averaged over every prediction (an
        example's label, or every position's next token), averaged over the batch."""
        if self.loss_kind == "bce":
            return F.binary_cross_entropy_with_logits(output, target, reduction="none").sum(1).mean()
        return F.cross_entropy(output.flatten(0, -2), target.flatten())

    def metrics(self, output: Tensor, target: Tensor) -> dict[str, float]:
        """Extra per-split metrics, summed over examples (the caller averages): a classifier's error rate,
        for token sequences the share of wrong next-token predictions in each example."""
        if self.loss_kind == "cross_entropy":
            wrong = (output.argmax(-1) != target).reshape(len(target), -1).float().mean(1)
            return {"error": wrong.sum().item()}
        return {}

    def split_metrics(self, loss: float) -> dict[str, float]:
        """Metrics of a whole split derived from its mean loss: a language model's perplexity."""
        if self.inputs == "tokens":
            return {"perplexity": math.exp(loss) if loss < _LARGEST_EXP else math.inf}
        return {}


_LARGEST_EXP = math.log(torch.finfo(torch.float64).max)  # math.exp overflows beyond


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


# The CURVES autoencoder: 784-400-200-100-50-25-6, mirrored.
CURVES_WIDTHS = (400, 200, 100, 50, 25)
CURVES_CODE = 6
SPARSE_INIT_CONNECTIONS = 15  # Martens (2010): incoming weights of a unit that start non-zero


def _sparse_init_(model: nn.Module) -> nn.Module:
    """Martens' (2010) sparse initialisation: each unit gets :data:`SPARSE_INIT_CONNECTIONS` non-zero
    incoming weights (all of them where it has fewer inputs), drawn from N(0, 1); biases are zero."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                out_features, in_features = module.weight.shape
                keep = min(SPARSE_INIT_CONNECTIONS, in_features)
                chosen = torch.rand(out_features, in_features).argsort(dim=1)[:, :keep]  # a random subset per unit
                module.weight.zero_().scatter_(1, chosen, torch.randn(out_features, keep))
                module.bias.zero_()
    return model


class CurvesAutoencoder(Workload):
    """The CURVES deep autoencoder of Hinton & Salakhutdinov (2006), as Martens (2010) trained it without
    pre-training and the K-FAC paper after him: 784-400-200-100-50-25-6 and the mirror image, logistic
    (sigmoid) hidden units, a linear 6-unit code, logistic outputs folded into BCE (summed over pixels,
    averaged over the batch), Martens' sparse initialisation.

    ``width_mult`` scales every hidden width (the code too); ``depth_mult`` repeats each hidden layer of the
    encoder and decoder that many times.
    """

    def build_model(self, shape: DataShape, width_mult: float = 1.0, depth_mult: int = 1) -> nn.Module:
        widths = [_scaled(w, width_mult) for w in CURVES_WIDTHS for _ in range(depth_mult)]
        code = _scaled(CURVES_CODE, width_mult)
        layers: list[nn.Module] = []
        previous = shape.num_features
        for width in widths:
            layers += [nn.Linear(previous, width), nn.Sigmoid()]
            previous = width
        layers.append(nn.Linear(previous, code))  # linear code
        previous = code
        for width in reversed(widths):
            layers += [nn.Linear(previous, width), nn.Sigmoid()]
            previous = width
        layers.append(nn.Linear(previous, shape.num_features))
        return _sparse_init_(nn.Sequential(*layers))


# The small ResNet: channels of its three stages, basic blocks per stage.
RESNET_CHANNELS = (8, 16, 32)


class ResNetClassifier(Workload):
    """A small ResNet with BatchNorm (:class:`~sweeps.runner.resnet.SmallResNet`): a stride-2 stem, three
    stages of 8, 16 and 32 channels (× ``width_mult``) at 14, 7 and 4 pixels a side, ``depth_mult`` CIFAR-style
    basic blocks each (one: ResNet-8), cross-entropy."""

    def build_model(self, shape: DataShape, width_mult: float = 1.0, depth_mult: int = 1) -> nn.Module:
        channels = tuple(_scaled(c, width_mult) for c in RESNET_CHANNELS)
        return SmallResNet(shape.image_shape, shape.num_classes, channels, blocks=depth_mult)


# The language model: width, heads, MLP width, blocks.
TRANSFORMER_WIDTH, TRANSFORMER_HEADS, TRANSFORMER_MLP, TRANSFORMER_LAYERS = 64, 4, 256, 2


class TransformerLM(Workload):
    """A small decoder-only language model (:class:`~sweeps.runner.language_model.DecoderLM`): 2 pre-LayerNorm
    blocks of width 64 (× ``width_mult``, rounded to a multiple of the 4 heads), MLP 4× as wide with ReLU,
    ``2 × depth_mult`` blocks; next-token cross-entropy averaged over every position of the batch."""

    def build_model(self, shape: DataShape, width_mult: float = 1.0, depth_mult: int = 1) -> nn.Module:
        heads = TRANSFORMER_HEADS
        width = heads * max(1, round(TRANSFORMER_WIDTH * check_width_mult(width_mult) / heads))
        mlp_width = width * TRANSFORMER_MLP // TRANSFORMER_WIDTH
        return DecoderLM(shape.num_classes, shape.sequence_length, width, TRANSFORMER_LAYERS * depth_mult, heads,
                         mlp_width)  # fmt: skip


WORKLOADS: dict[str, Workload] = {
    "autoencoder": Autoencoder("autoencoder", "bce", "deep autoencoder 784-1000-500-250-30 (tanh), BCE"),
    "mlp": MLPClassifier("mlp", "cross_entropy", "MLP classifier 784-500-250-10 (tanh), cross-entropy"),
    "cnn": CNNClassifier("cnn", "cross_entropy", "CNN classifier, two 5x5 conv layers (ReLU), cross-entropy"),
    "curves": CurvesAutoencoder(
        "curves", "bce", "CURVES autoencoder 784-400-200-100-50-25-6 (logistic), BCE",
        default_data="curves", default_batch_size=250, eval_examples=5000,
    ),
    "resnet": ResNetClassifier(
        "resnet", "cross_entropy", "small ResNet with BatchNorm, 3 stages of 8-16-32 channels, cross-entropy",
        default_data="fashion-mnist", default_batch_size=128, eval_examples=2000,
    ),
    "transformer": TransformerLM(
        "transformer", "cross_entropy", "decoder-only language model, 2 blocks of width 64 (ReLU MLP), "
        "next-token cross-entropy", inputs="tokens", default_data="fortunes", default_batch_size=16,
        eval_examples=256,
    ),
}  # fmt: skip


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"Unknown workload: {name!r}; expected one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


def _fits(workload: Workload, shape: DataShape) -> bool:
    if shape.kind != workload.inputs:
        return False
    return not (shape.kind == "images" and workload.loss_kind == "cross_entropy" and shape.num_classes == 0)


def check_data(workload: str, data: str) -> None:
    """Refuse a data set the workload cannot train on (token sequences for an image model, images for the
    language model, unlabelled images for a classifier), naming the data sets it takes."""
    chosen, shape = get_workload(workload), data_shape(data)
    if _fits(chosen, shape):
        return
    takes = [name for name in DATASETS if _fits(chosen, data_shape(name))]
    what = "token sequences" if shape.kind == "tokens" else "images" if shape.num_classes else "unlabelled images"
    raise ValueError(f"Workload {workload!r} cannot train on {data!r} ({what}); its data sets are {', '.join(takes)}")
