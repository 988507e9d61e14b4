"""ResNet-18 for small images (CIFAR stem: a 3×3 stride-1 conv and no max-pool).

Four stages of two BasicBlocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2), global average pooling, then a
``Linear(512, K)`` head named ``classifier``. With batch norm (default) or instance norm the backbone has
11,168,832 parameters for 3-channel inputs, matching the constant LAD hard-codes for ResNet18.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ltdd.errors import LtddError
from ltdd.models.layers import EmbedClassifier, make_norm
from ltdd.models.registry import register_model

__all__ = ["BasicBlock", "ResNet", "resnet18"]

_RESNET_NORMS = ("batchnorm", "instancenorm", "none")


def _norm(norm: str, channels: int, norm_impl: str | None) -> nn.Module:
    layer = make_norm(norm, channels, None, norm_impl)
    return nn.Identity() if layer is None else layer


class BasicBlock(nn.Module):
    """conv3×3 → norm → ReLU → conv3×3 → norm, plus a (1×1 conv → norm when the shape changes) shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, norm_impl: str | None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, planes, norm_impl)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = _norm(norm, planes, norm_impl)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                _norm(norm, planes, norm_impl),
            )
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(EmbedClassifier):
    def __init__(
        self,
        num_classes: int,
        channels: int = 3,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
        norm: str = "batchnorm",
        norm_impl: str | None = None,
    ):
        super().__init__()
        norm = str(norm).lower()
        if norm not in _RESNET_NORMS:
            raise LtddError(f"resnet norm must be one of: {', '.join(_RESNET_NORMS)}; got {norm!r}")
        if int(width) < 1:
            raise LtddError(f"resnet width must be >= 1, got {width}")
        width = int(width)
        self.conv1 = nn.Conv2d(channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm1 = _norm(norm, width, norm_impl)
        in_planes = width
        stages = []
        for i, n_blocks in enumerate(blocks):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(n_blocks):
                layer.append(BasicBlock(in_planes, planes, stride if j == 0 else 1, norm, norm_impl))
                in_planes = planes
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feat_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@register_model("resnet18")
def resnet18(
    num_classes: int,
    channels: int = 3,
    im_size: tuple[int, int] = (32, 32),
    norm: str = "batchnorm",
    width: int = 64,
    norm_impl: str | None = None,
) -> ResNet:
    """ResNet-18 with a CIFAR stem; ``norm="instancenorm"`` gives the DC-codebase instance-norm variant.

    Works for any input of at least 1×1 (global average pooling makes the embedding 512-d regardless of size).
    """
    del im_size  # size-independent thanks to the global pool
    return ResNet(num_classes, channels, (2, 2, 2, 2), width, norm, norm_impl)
