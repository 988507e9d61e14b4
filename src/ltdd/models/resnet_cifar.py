"""ResNet-32 for CIFAR (He et al. 2016, section 4.2): the observer / teacher network of RLDD.

A 3×3 stem conv (``width`` channels) → norm → ReLU, then three stages of ``blocks`` basic blocks with ``width``,
``2·width`` and ``4·width`` channels (strides 1, 2, 2), global average pooling and a ``Linear`` head named
``classifier``. ``resnet32`` is 5 blocks per stage (6·5 + 2 = 32 weighted layers) with 16/32/64 channels and batch
norm. Shortcuts are the paper's option A: identity, and where a block halves the map and widens the channels, the
input subsampled with stride 2 and zero channels appended (no parameters). With 3 input channels and 10 classes the
model has 464,154 parameters (463,504 backbone + 650 head).

Parameter names: ``conv1`` / ``norm1`` (stem), ``stages.<s>.<b>.conv{1,2}`` / ``norm{1,2}``, ``classifier``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltdd.errors import LtddError
from ltdd.models.layers import EmbedClassifier, make_norm
from ltdd.models.registry import register_model

__all__ = ["CifarBasicBlock", "CifarResNet", "resnet32"]

_NORMS = ("batchnorm", "instancenorm", "none")


def _norm(norm: str, channels: int) -> nn.Module:
    layer = make_norm(norm, channels, None)
    return nn.Identity() if layer is None else layer


class CifarBasicBlock(nn.Module):
    """conv3×3(stride) → norm → ReLU → conv3×3 → norm, plus the option-A shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = _norm(norm, planes)
        self.stride = stride
        self.extra = planes - in_planes
        if self.extra < 0:
            raise LtddError("a CIFAR ResNet block cannot reduce the number of channels")

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]  # same size as the stride-2, padding-1 conv's output
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))  # zero channels appended
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(EmbedClassifier):
    def __init__(self, num_classes: int, channels: int = 3, blocks: int = 5, width: int = 16,
                 norm: str = "batchnorm"):
        super().__init__()
        norm = str(norm).lower()
        if norm not in _NORMS:
            raise LtddError(f"CIFAR resnet norm must be one of: {', '.join(_NORMS)}; got {norm!r}")
        if int(blocks) < 1 or int(width) < 1:
            raise LtddError(f"CIFAR resnet needs blocks >= 1 and width >= 1, got {blocks}, {width}")
        blocks, width = int(blocks), int(width)
        self.conv1 = nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False)
        self.norm1 = _norm(norm, width)
        stages, in_planes = [], width
        for s in range(3):
            planes = width * 2**s
            stage = []
            for b in range(blocks):
                stage.append(CifarBasicBlock(in_planes, planes, 2 if (s > 0 and b == 0) else 1, norm))
                in_planes = planes
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.feat_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def embed(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(out), 1), 1)


@register_model("resnet32")
def resnet32(num_classes: int, channels: int = 3, im_size: tuple[int, int] = (32, 32), norm: str = "batchnorm",
             width: int = 16) -> CifarResNet:
    """ResNet-32 (CIFAR): 3 stages × 5 basic blocks, 16/32/64 channels, batch norm, option-A shortcuts."""
    del im_size  # global average pooling: any input of at least 1×1
    return CifarResNet(num_classes, channels, 5, width, norm)
