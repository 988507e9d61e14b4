"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021), batched and generator-driven.

DSA makes data augmentation usable while learning synthetic images: every transform is differentiable with respect to
the pixels, and the *same* sampled transform ("Siamese") can be applied to the real batch and the synthetic batch so
that their gradients / features are compared under identical augmentation.

Operations (defaults follow the DC/DSA codebase, inherited by MTT, DATM and LAD):

=========== ====================================================================================== =========
op          what it does                                                                           ratio
=========== ====================================================================================== =========
brightness  add ``(u - 0.5) * ratio`` to every pixel                                                1.0
saturation  scale each pixel's deviation from its channel mean by ``u * ratio``                     2.0
contrast    scale the deviation from the image mean by ``u + ratio``                                0.5
color       brightness, saturation and contrast together (in that order)
crop        translate by an integer shift in ``[-p, p]`` per axis, ``p = round(ratio * size)``,     0.125
            filling with zeros
cutout      zero a square of side ``round(ratio * size)`` at a random centre (clipped at edges)     0.5
flip        horizontal flip with probability ``ratio``                                             0.5
scale       rescale each axis by a factor in ``[1/ratio, ratio)`` (``affine_grid``, bilinear)      1.2
rotate      rotate by an angle in ``[-ratio, ratio)`` degrees (``affine_grid``, bilinear)           15
=========== ====================================================================================== =========

``u`` is uniform on ``[0, 1)``. In mode ``"one"`` (what DSA does) one op of the strategy is drawn per batch; in mode
``"all"`` every op is applied in the listed order. Randomness comes only from the ``torch.Generator`` passed in, so
runs are reproducible and resumable. Crop and cutout store unit-interval draws and turn them into pixel offsets when
applied, so one :class:`AugParams` works for any image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ltdd.errors import LtddError

__all__ = ["AugParams", "DSA", "DSA_DEFAULT_STRATEGY", "DSA_DEFAULT_RATIOS", "DSA_OPS"]

DSA_DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
DSA_DEFAULT_RATIOS: dict[str, float] = {
    "flip": 0.5,
    "scale": 1.2,
    "rotate": 15.0,
    "crop": 0.125,
    "cutout": 0.5,
    "brightness": 1.0,
    "saturation": 2.0,
    "contrast": 0.5,
}
_COMPOSITE = {"color": ("brightness", "saturation", "contrast")}
DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate", "brightness", "saturation", "contrast")
MODES = ("one", "all")


@dataclass
class AugParams:
    """Everything random about one application of :class:`DSA`.

    ``ops``: the (top-level) ops to apply, in order; ``values``: the random draws, keyed by elementary op name, each of
    leading size ``batch_size`` (per-sample) or 1 (``siamese=True``: one draw shared by every sample, so the same
    transform can be re-applied to a batch of any size).
    """

    ops: list[str]
    values: dict[str, Tensor] = field(default_factory=dict)
    siamese: bool = False

    @property
    def batch_size(self) -> int | None:
        """Number of samples the draws are for (None when there are no draws)."""
        for v in self.values.values():
            return int(v.shape[0])
        return None

    def to(self, device) -> "AugParams":
        return AugParams(list(self.ops), {k: v.to(device) for k, v in self.values.items()}, self.siamese)


def _parse_strategy(strategy) -> list[str]:
    if strategy is None:
        return []
    if isinstance(strategy, str):
        s = strategy.strip().lower()
        if s in ("", "none"):
            return []
        names = [p for p in s.split("_") if p]
    else:
        names = [str(p).strip().lower() for p in strategy]
        names = [p for p in names if p and p != "none"]
    for name in names:
        if name not in DSA_OPS:
            raise LtddError(f"unknown augmentation op {name!r}; known ops: {', '.join(DSA_OPS)}")
    return names


class DSA:
    """Differentiable Siamese Augmentation.

    ``DSA()`` is the standard ``color_crop_cutout_flip_scale_rotate`` strategy with one op per batch. Ratios are
    overridden by keyword (``DSA(crop=0.25, rotate=10)``); ``strategy="none"`` (or ``""``) is the identity.

    Siamese use::

        p = dsa.sample(len(x_real), generator=g, siamese=True)
        loss(net(dsa.apply(x_real, p)), net(dsa.apply(x_syn, p)))
    """

    def __init__(self, strategy: str | list[str] = DSA_DEFAULT_STRATEGY, mode: str = "one", **ratios: float):
        self.ops = _parse_strategy(strategy)
        mode = str(mode).lower()
        if mode not in MODES:
            raise LtddError(f"unknown DSA mode {mode!r}; expected one of: {', '.join(MODES)}")
        self.mode = mode
        unknown = sorted(k for k in ratios if k not in DSA_DEFAULT_RATIOS)
        if unknown:
            raise LtddError(
                f"unknown DSA ratio {', '.join(unknown)}; known ratios: {', '.join(DSA_DEFAULT_RATIOS)}"
            )
        self.ratios = {**DSA_DEFAULT_RATIOS, **{k: float(v) for k, v in ratios.items()}}
        r = self.ratios
        if not 0.0 <= r["flip"] <= 1.0:
            raise LtddError(f"DSA flip probability must be in [0, 1], got {r['flip']}")
        if r["scale"] < 1.0:
            raise LtddError(f"DSA scale ratio must be >= 1, got {r['scale']}")
        if not 0.0 <= r["crop"] <= 0.5:
            raise LtddError(f"DSA crop ratio must be in [0, 0.5], got {r['crop']}")
        if not 0.0 <= r["cutout"] <= 1.0:
            raise LtddError(f"DSA cutout ratio must be in [0, 1], got {r['cutout']}")

    @property
    def strategy(self) -> str:
        return "_".join(self.ops) if self.ops else "none"

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r})"

    # --------------------------------------------------------------- sampling
    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device=None,
        siamese: bool = False,
    ) -> AugParams:
        """Draw the random parameters for one application to a batch of ``batch_size`` images.

        All draws come from ``generator`` (made on the generator's device, then moved to ``device``). With
        ``siamese=True`` a single draw is shared by all samples.
        """
        if not self.ops:
            return AugParams([], {}, siamese)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        n = 1 if siamese else int(batch_size)
        if n < 1:
            raise LtddError(f"batch size must be >= 1, got {batch_size}")

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, device=gen_device)

        if self.mode == "one":
            idx = int(torch.randint(len(self.ops), (1,), generator=generator, device=gen_device).item())
            ops = [self.ops[idx]]
        else:
            ops = list(self.ops)
        r = self.ratios
        values: dict[str, Tensor] = {}
        for op in ops:
            for el in _COMPOSITE.get(op, (op,)):
                if el == "brightness":
                    v = (rand(n) - 0.5) * r["brightness"]
                elif el == "saturation":
                    v = rand(n) * r["saturation"]
                elif el == "contrast":
                    v = rand(n) + r["contrast"]
                elif el == "crop":
                    v = rand(n, 2)  # unit draws → integer shifts (dy, dx) at apply time
                elif el == "cutout":
                    v = rand(n, 2)  # unit draws → square centre (cy, cx) at apply time
                elif el == "flip":
                    v = rand(n) < r["flip"]
                elif el == "scale":
                    lo = 1.0 / r["scale"]
                    v = rand(n, 2) * (r["scale"] - lo) + lo  # (sx, sy)
                elif el == "rotate":
                    v = (rand(n) - 0.5) * 2.0 * r["rotate"] * (math.pi / 180.0)  # radians
                else:  # pragma: no cover - guarded by _parse_strategy
                    raise LtddError(f"unknown augmentation op {el!r}")
                # In mode "all" an op may be listed twice; later draws get a numbered key.
                key, k = el, 1
                while key in values:
                    k += 1
                    key = f"{el}#{k}"
                values[key] = v if device is None else v.to(device)
        return AugParams(ops, values, siamese)

    # --------------------------------------------------------------- applying
    def apply(self, x: Tensor, params: AugParams) -> Tensor:
        """Apply the transform described by ``params`` to ``x`` (N, C, H, W); differentiable w.r.t. ``x``."""
        if x.dim() != 4:
            raise LtddError(f"DSA expects a (N, C, H, W) batch, got shape {tuple(x.shape)}")
        n = x.shape[0]
        if not params.siamese:
            bs = params.batch_size
            if bs is not None and bs != n:
                raise LtddError(f"augmentation parameters were sampled for {bs} images but the batch has {n}")
        seen: dict[str, int] = {}
        for op in params.ops:
            if op not in DSA_OPS:
                raise LtddError(f"unknown augmentation op {op!r}; known ops: {', '.join(DSA_OPS)}")
            for el in _COMPOSITE.get(op, (op,)):
                seen[el] = seen.get(el, 0) + 1
                key = el if seen[el] == 1 else f"{el}#{seen[el]}"
                if key not in params.values:
                    raise LtddError(f"augmentation parameters have no values for op {key!r}")
                v = params.values[key].to(x.device)
                if v.shape[0] != n:
                    v = v.expand(n, *v.shape[1:])
                x = _APPLY[el](self, x, v)
        return x

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Sample per-sample parameters for ``x`` and apply them."""
        if not self.ops:
            return x
        return self.apply(x, self.sample(x.shape[0], generator=generator, device=x.device))

    # -------------------------------------------------------- elementary ops
    def _brightness(self, x: Tensor, v: Tensor) -> Tensor:
        return x + v.to(x.dtype).view(-1, 1, 1, 1)

    def _saturation(self, x: Tensor, v: Tensor) -> Tensor:
        mean = x.mean(dim=1, keepdim=True)
        return (x - mean) * v.to(x.dtype).view(-1, 1, 1, 1) + mean

    def _contrast(self, x: Tensor, v: Tensor) -> Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * v.to(x.dtype).view(-1, 1, 1, 1) + mean

    def _crop(self, x: Tensor, v: Tensor) -> Tensor:
        n, c, h, w = x.shape
        ph = int(h * self.ratios["crop"] + 0.5)
        pw = int(w * self.ratios["crop"] + 0.5)
        if ph == 0 and pw == 0:
            return x
        dy = (v[:, 0].float() * (2 * ph + 1)).floor().long().clamp(0, 2 * ph) - ph
        dx = (v[:, 1].float() * (2 * pw + 1)).floor().long().clamp(0, 2 * pw) - pw
        # out[i, :, r, s] = x[i, :, r + dy_i, s + dx_i], zero outside the image.
        xp = F.pad(x, (pw, pw, ph, ph))
        rows = torch.arange(h, device=x.device)[None, :] + (ph + dy)[:, None]  # (N, H)
        cols = torch.arange(w, device=x.device)[None, :] + (pw + dx)[:, None]  # (N, W)
        out = xp.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pw))
        return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))

    def _cutout(self, x: Tensor, v: Tensor) -> Tensor:
        n, c, h, w = x.shape
        ch = int(h * self.ratios["cutout"] + 0.5)
        cw = int(w * self.ratios["cutout"] + 0.5)
        if ch == 0 or cw == 0:
            return x
        # Centre drawn from [0, size] (or [0, size - 1] for odd sides), square clipped at the borders.
        cy = (v[:, 0].float() * (h + 1 - ch % 2)).floor().long().clamp(max=h - ch % 2)
        cx = (v[:, 1].float() * (w + 1 - cw % 2)).floor().long().clamp(max=w - cw % 2)
        top = (cy - ch // 2)[:, None]
        left = (cx - cw // 2)[:, None]
        r = torch.arange(h, device=x.device)[None, :]
        s = torch.arange(w, device=x.device)[None, :]
        in_r = (r >= top) & (r < top + ch)  # (N, H)
        in_s = (s >= left) & (s < left + cw)  # (N, W)
        keep = ~(in_r[:, :, None] & in_s[:, None, :])  # (N, H, W)
        return x * keep[:, None].to(x.dtype)

    def _flip(self, x: Tensor, v: Tensor) -> Tensor:
        return torch.where(v.bool().view(-1, 1, 1, 1), x.flip(3), x)

    def _warp(self, x: Tensor, theta: Tensor) -> Tensor:
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _scale(self, x: Tensor, v: Tensor) -> Tensor:
        v = v.to(x.dtype)
        zeros = torch.zeros_like(v[:, 0])
        theta = torch.stack(
            [torch.stack([v[:, 0], zeros, zeros], 1), torch.stack([zeros, v[:, 1], zeros], 1)], 1
        )  # (N, 2, 3)
        return self._warp(x, theta)

    def _rotate(self, x: Tensor, v: Tensor) -> Tensor:
        a = v.to(x.dtype)
        cos, sin, zeros = torch.cos(a), torch.sin(a), torch.zeros_like(a)
        theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
        return self._warp(x, theta)


_APPLY = {
    "brightness": DSA._brightness,
    "saturation": DSA._saturation,
    "contrast": DSA._contrast,
    "crop": DSA._crop,
    "cutout": DSA._cutout,
    "flip": DSA._flip,
    "scale": DSA._scale,
    "rotate": DSA._rotate,
}
