"""VGG-11 and AlexNet sized for small images (CIFAR / MNIST / Tiny-ImageNet), as used for cross-architecture
evaluation in dataset-distillation papers.

Both end in flatten → a single ``Linear`` head named ``classifier``; the embedding is the flattened conv output.
2×2 max-pools that would shrink the map below 1×1 are skipped, so 8×8 inputs work.
"""

from __future__ import annotations

from torch import Tensor, nn

from ltdd.errors import LtddError
from ltdd.models.layers import EmbedClassifier, can_pool, make_norm
from ltdd.models.registry import register_model

__all__ = ["VGG", "AlexNet", "vgg11", "alexnet", "VGG11_CFG"]

_CNN_NORMS = ("instancenorm", "batchnorm", "none")
VGG11_CFG: tuple = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _check_norm(arch: str, norm: str) -> str:
    norm = str(norm).lower()
    if norm not in _CNN_NORMS:
        raise LtddError(f"{arch} norm must be one of: {', '.join(_CNN_NORMS)}; got {norm!r}")
    return norm


def _conv_block(in_ch: int, out_ch: int, kernel: int, padding: int, norm: str, norm_impl: str | None) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=padding)]
    norm_layer = make_norm(norm, out_ch, None, norm_impl)
    if norm_layer is not None:
        layers.append(norm_layer)
    layers.append(nn.ReLU())
    return layers


class _ConvStack(EmbedClassifier):
    """``features`` (conv blocks and pools, built from a spec) → flatten → ``classifier``."""

    def __init__(self, spec, num_classes: int, channels: int, im_size: tuple[int, int], norm: str, norm_impl: str | None):
        super().__init__()
        h, w = int(im_size[0]), int(im_size[1])
        layers: list[nn.Module] = []
        in_ch = channels
        for item in spec:
            if item == "M":
                if can_pool(h, w):
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    h, w = h // 2, w // 2
                continue
            out_ch, kernel, padding = item
            layers += _conv_block(in_ch, out_ch, kernel, padding, norm, norm_impl)
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.feat_dim = in_ch * h * w
        self.feat_shape = (in_ch, h, w)
        self.classifier = nn.Linear(self.feat_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)


class VGG(_ConvStack):
    """VGG with 3×3 convs (padding 1) → norm → ReLU, 2×2 max-pools at the "M" entries of ``cfg``."""

    def __init__(self, num_classes, channels=3, im_size=(32, 32), cfg=VGG11_CFG, norm="instancenorm", norm_impl=None):
        norm = _check_norm("vgg", norm)
        spec = ["M" if c == "M" else (int(c), 3, 1) for c in cfg]
        super().__init__(spec, num_classes, channels, im_size, norm, norm_impl)


class AlexNet(_ConvStack):
    """Five-conv AlexNet for small images: conv5×5(128) → pool → conv5×5(192) → pool → conv3×3(256) →
    conv3×3(192) → conv3×3(192) → pool, each conv followed by (optional norm and) ReLU. 32×32 → 192×4×4 features."""

    def __init__(self, num_classes, channels=3, im_size=(32, 32), norm="none", norm_impl=None):
        norm = _check_norm("alexnet", norm)
        spec = [(128, 5, 2), "M", (192, 5, 2), "M", (256, 3, 1), (192, 3, 1), (192, 3, 1), "M"]
        super().__init__(spec, num_classes, channels, im_size, norm, norm_impl)


@register_model("vgg11")
def vgg11(
    num_classes: int,
    channels: int = 3,
    im_size: tuple[int, int] = (32, 32),
    norm: str = "instancenorm",
    norm_impl: str | None = None,
) -> VGG:
    """VGG-11 (CIFAR-sized: one Linear head after the features). ``norm``: instancenorm (DC-codebase "VGG11",
    default), batchnorm ("VGG11BN") or none."""
    return VGG(num_classes, channels, im_size, VGG11_CFG, norm, norm_impl)


@register_model("alexnet")
def alexnet(
    num_classes: int,
    channels: int = 3,
    im_size: tuple[int, int] = (32, 32),
    norm: str = "none",
    norm_impl: str | None = None,
) -> AlexNet:
    """CIFAR-sized AlexNet. ``norm``: none (default), batchnorm or instancenorm."""
    return AlexNet(num_classes, channels, im_size, norm, norm_impl)
