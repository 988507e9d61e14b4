"""ConvNet (the DC / DM / MTT / DATM / LAD backbone) and the building blocks shared by all ltdd models.

ConvNet-``depth``: ``depth`` × [Conv 3×3 (``width`` channels, padding 1) → norm → activation → 2×2 pool], flatten,
then one ``Linear`` head named ``classifier``. With the defaults (depth 3, width 128, instance norm, average pooling)
a 32×32×3 input gives a 128×4×4 = 2048-d embedding; with 10 classes the model has 299,520 backbone + 20,490
classifier = 320,010 parameters. ``convnet_d4`` (depth 4) on 64×64 inputs has a 447,360-parameter backbone.

"Instance norm" follows the DC codebase: ``GroupNorm(C, C, affine=True)``, i.e. per-sample, per-channel
normalisation over H×W with a learnable per-channel scale and shift. :class:`InstanceNorm2dBasic` computes the same
thing from elementary ops and has identical parameter names and shapes, so checkpoints are interchangeable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ltdd.errors import LtddError
from ltdd.models.registry import register_model

__all__ = [
    "EmbedClassifier",
    "InstanceNorm2dBasic",
    "ConvNet",
    "make_norm",
    "make_act",
    "NORMS",
    "ACTS",
    "POOLS",
    "DEFAULT_NORM_IMPL",
    "convnet",
    "convnet_d4",
]

NORMS = ("instancenorm", "batchnorm", "layernorm", "none")
ACTS = ("relu", "leakyrelu", "sigmoid", "gelu", "silu", "tanh")
POOLS = ("avgpool", "maxpool", "none")
NORM_IMPLS = ("groupnorm", "basic")
# Chosen by timing ConvNet-3 (32x32, 2 CPU threads, torch 2.13): forward, grad w.r.t. the flat parameters with
# create_graph=True, one unrolled SGD step, a second forward and backward to the images. Median per iteration:
# batch 32: GroupNorm 403 ms vs basic ops 709 ms; batch 100: 1852 ms vs 3456 ms. Both give the same numbers up to
# float rounding and have the same parameter names, so either can load the other's checkpoints.
DEFAULT_NORM_IMPL = "groupnorm"


class EmbedClassifier(nn.Module):
    """Base class: ``forward(x) = classifier(embed(x))``.

    Subclasses set ``self.classifier`` (an ``nn.Linear``) and ``self.feat_dim`` and implement :meth:`embed`, which
    returns flattened penultimate features of shape ``(N, feat_dim)``. Code that needs to tell the backbone from the
    head does so by parameter name: the head's parameters are exactly those whose names start with ``classifier.``.
    """

    classifier: nn.Linear
    feat_dim: int

    def embed(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))


class InstanceNorm2dBasic(nn.Module):
    """Instance norm with an affine per-channel transform, built from basic tensor ops.

    Numerically the same as ``nn.GroupNorm(C, C, eps, affine=True)`` and with the same parameter names (``weight``,
    ``bias``, both of shape ``(C,)``) and attributes (``num_groups``, ``num_channels``, ``eps``, ``affine``).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.num_groups = num_channels
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        centred = x - mean
        var = centred.square().mean(dim=(-2, -1), keepdim=True)
        y = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"


def make_norm(norm: str, channels: int, spatial: tuple[int, int] | None = None, norm_impl: str | None = None) -> nn.Module | None:
    """Normalisation layer by name (``None`` for ``"none"``).

    ``instancenorm`` → ``GroupNorm(C, C, affine=True)`` (or :class:`InstanceNorm2dBasic` with
    ``norm_impl="basic"``); ``batchnorm`` → ``BatchNorm2d``; ``layernorm`` → ``LayerNorm([C, H, W])`` (needs
    ``spatial``, the feature-map size at that point).
    """
    norm = str(norm).lower()
    impl = DEFAULT_NORM_IMPL if norm_impl is None else str(norm_impl).lower()
    if impl not in NORM_IMPLS:
        raise LtddError(f"unknown norm_impl {norm_impl!r}; expected one of: {', '.join(NORM_IMPLS)}")
    if norm == "none":
        return None
    if norm == "instancenorm":
        if impl == "basic":
            return InstanceNorm2dBasic(channels)
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        if spatial is None:
            raise LtddError("norm 'layernorm' is not available for this architecture")
        return nn.LayerNorm([channels, spatial[0], spatial[1]], elementwise_affine=True)
    raise LtddError(f"unknown norm {norm!r}; expected one of: {', '.join(NORMS)}")


def make_act(act: str) -> nn.Module:
    """Activation by name (never in-place, so double backward through it is safe)."""
    act = str(act).lower()
    if act == "relu":
        return nn.ReLU()
    if act == "leakyrelu":
        return nn.LeakyReLU(0.01)
    if act == "sigmoid":
        return nn.Sigmoid()
    if act == "gelu":
        return nn.GELU()
    if act == "silu":
        return nn.SiLU()
    if act == "tanh":
        return nn.Tanh()
    raise LtddError(f"unknown activation {act!r}; expected one of: {', '.join(ACTS)}")


def make_pool(pool: str) -> nn.Module | None:
    pool = str(pool).lower()
    if pool == "avgpool":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if pool == "maxpool":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    if pool == "none":
        return None
    raise LtddError(f"unknown pool {pool!r}; expected one of: {', '.join(POOLS)}")


def can_pool(h: int, w: int) -> bool:
    """A 2×2/stride-2 pool is applied only while it keeps the map at least 1×1."""
    return h >= 2 and w >= 2


class ConvNet(EmbedClassifier):
    """``depth`` × [Conv3×3 → norm → act → pool] → flatten → ``classifier`` (Linear).

    Parameter names: ``features.<i>.weight/bias`` for the convs and norms, ``classifier.weight/bias`` for the head.
    Pools that would shrink the map below 1×1 are skipped, so e.g. 8×8 inputs work at depth 3 and 4.
    """

    def __init__(
        self,
        num_classes: int,
        channels: int = 3,
        im_size: tuple[int, int] = (32, 32),
        depth: int = 3,
        width: int = 128,
        norm: str = "instancenorm",
        act: str = "relu",
        pool: str = "avgpool",
        norm_impl: str | None = None,
    ):
        super().__init__()
        if int(depth) < 1:
            raise LtddError(f"convnet depth must be >= 1, got {depth}")
        if int(width) < 1:
            raise LtddError(f"convnet width must be >= 1, got {width}")
        depth, width = int(depth), int(width)
        h, w = int(im_size[0]), int(im_size[1])
        layers: list[nn.Module] = []
        in_ch = channels
        for _ in range(depth):
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=1))
            norm_layer = make_norm(norm, width, (h, w), norm_impl)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(make_act(act))
            pool_layer = make_pool(pool)
            if pool_layer is not None and can_pool(h, w):
                layers.append(pool_layer)
                h, w = h // 2, w // 2
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.feat_dim = width * h * w
        self.feat_shape = (width, h, w)
        self.classifier = nn.Linear(self.feat_dim, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x).flatten(1)


@register_model("convnet")
def convnet(
    num_classes: int,
    channels: int = 3,
    im_size: tuple[int, int] = (32, 32),
    depth: int = 3,
    width: int = 128,
    norm: str = "instancenorm",
    act: str = "relu",
    pool: str = "avgpool",
    norm_impl: str | None = None,
) -> ConvNet:
    """ConvNet-3 (width 128, instance norm, ReLU, average pooling) unless told otherwise."""
    return ConvNet(num_classes, channels, im_size, depth, width, norm, act, pool, norm_impl)


@register_model("convnet_d4")
def convnet_d4(
    num_classes: int,
    channels: int = 3,
    im_size: tuple[int, int] = (64, 64),
    width: int = 128,
    norm: str = "instancenorm",
    act: str = "relu",
    pool: str = "avgpool",
    norm_impl: str | None = None,
) -> ConvNet:
    """ConvNet-D4, the depth-4 ConvNet used for 64×64 data (Tiny-ImageNet, ImageNet-64)."""
    return ConvNet(num_classes, channels, im_size, 4, width, norm, act, pool, norm_impl)
