"""ConvNet, the DC / DM / MTT / DATM / LAD backbone: ``convnet`` (depth 3 by default) and ``convnet_d4``.

ConvNet-``depth``: ``depth`` × [Conv 3×3 (``width`` channels, padding 1) → norm → activation → 2×2 pool], flatten,
then one ``Linear`` head named ``classifier``. With the defaults (depth 3, width 128, instance norm, average pooling)
a 32×32×3 input gives a 128×4×4 = 2048-d embedding; with 10 classes the model has 299,520 backbone + 20,490
classifier = 320,010 parameters. ``convnet_d4`` (depth 4) on 64×64 inputs has a 447,360-parameter backbone.

The layers (norms, activations, pools, the :class:`~ltdd.models.layers.EmbedClassifier` base) come from
:mod:`ltdd.models.layers`; the trajectory-matching engine swaps them for the variants with hand-written second
derivatives in :mod:`ltdd.models.double_backward`.
"""

from __future__ import annotations

from torch import Tensor, nn

from ltdd.errors import LtddError
from ltdd.models.layers import EmbedClassifier, can_pool, make_act, make_norm, make_pool
from ltdd.models.registry import register_model

__all__ = ["ConvNet", "convnet", "convnet_d4"]


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
