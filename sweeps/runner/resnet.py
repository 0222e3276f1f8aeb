"""A small ResNet with BatchNorm for 28×28 grey images (the ``resnet`` workload).

CIFAR-style basic blocks (He et al. 2016, §4.2): two 3×3 convolutions,
each followed by BatchNorm, ReLU after the sum with the shortcut; the first
block of a later stage halves the side with stride 2 and has a 1×1
convolution with BatchNorm on its shortcut. A 3×3 stem comes first, then
the stages, global average pooling and a linear classifier. Convolutions
have no bias (BatchNorm's shift replaces it).

The stem has stride 2 (28×28 images become 14×14 maps), where CIFAR's has
stride 1: on two CPU cores the full-resolution first stage would cost
about three quarters of every step, and a LocoProp step costs several
Adam steps, so a 30-second comparison would give LocoProp a dozen steps.

Written for what LocoProp and K-FAC look for: every convolution and the
classifier are ordinary nn.Conv2d / nn.Linear modules; each convolution
is followed by BatchNorm, not by an activation, so its unit's transfer
function is the identity (LocoProp's "pre-activation" of a convolution is
its output before BatchNorm); the BatchNorm parameters take the
optimizer's plain (inner) steps. No operation works in place, so every
recorded layer output stays as the forward pass made it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "SmallResNet"]


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), the shortcut a 1×1 convolution with BatchNorm where
    the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.first = _conv_bn(in_channels, out_channels, 3, stride)
        self.second = _conv_bn(out_channels, out_channels, 3, 1)
        changes = stride != 1 or in_channels != out_channels
        self.shortcut = _conv_bn(in_channels, out_channels, 1, stride) if changes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.second(F.relu(self.first(x))) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem (stride ``stem_stride``), then one stage per entry of ``channels`` (``blocks`` basic blocks each,
    the later ones starting with stride 2), global average pooling, a linear classifier. Input: flattened
    images of ``image_shape``."""

    def __init__(
        self, image_shape: tuple[int, int, int], num_classes: int, channels: tuple[int, ...], blocks: int,
        stem_stride: int = 2,
    ):  # fmt: skip
        super().__init__()
        self.unflatten = nn.Unflatten(1, image_shape)
        self.stem = _conv_bn(image_shape[0], channels[0], 3, stem_stride)
        stages, previous = [], channels[0]
        for index, width in enumerate(channels):
            stride = 1 if index == 0 else 2
            stages += [BasicBlock(previous if i == 0 else width, width, stride if i == 0 else 1) for i in range(blocks)]
            previous = width
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        features = self.stages(F.relu(self.stem(self.unflatten(x))))
        return self.classifier(features.mean(dim=(2, 3)))
