"""Building blocks shared by every ltdd network: the EmbedClassifier base, instance norm, norm/act/pool factories.

"Instance norm" follows the DC codebase: ``GroupNorm(C, C, affine=True)``, i.e. per-sample, per-channel
normalisation over H×W with a learnable per-channel scale and shift. :class:`InstanceNorm2dBasic` computes the same
thing from elementary ops and has identical parameter names and shapes, so checkpoints are interchangeable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ltdd.errors import LtddError

__all__ = [
    "EmbedClassifier",
    "InstanceNorm2dBasic",
    "make_norm",
    "make_act",
    "make_pool",
    "can_pool",
    "NORMS",
    "ACTS",
    "POOLS",
    "NORM_IMPLS",
    "DEFAULT_NORM_IMPL",
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
