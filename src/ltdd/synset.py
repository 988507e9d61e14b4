"""The distilled-set file: ``distilled.safetensors``.

Tensors: ``images`` float32 (N, C, H, W) in the model's input space, ``labels`` int64 (N,), optional
``soft_labels`` float32 (N, num_classes) logits, optional ``lr`` float32 scalar (the learned step size). String
metadata (safetensors allows only str -> str) carries a JSON blob: dataset, split, transform, method, config.
Written atomically; loading validates shapes and never unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import atomic_write_bytes
from .errors import LtddError

FILENAME = "distilled.safetensors"


@dataclass
class SyntheticSet:
    images: torch.Tensor
    labels: torch.Tensor
    soft_labels: torch.Tensor | None = None
    lr: float | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.ndim != 4:
            raise LtddError(f"distilled images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise LtddError(f"distilled labels must be (N,) with N = {len(self.images)}, got {tuple(self.labels.shape)}")
        if self.soft_labels is not None and (self.soft_labels.ndim != 2 or len(self.soft_labels) != len(self.images)):
            raise LtddError(f"soft labels must be (N, num_classes) with N = {len(self.images)}, "
                            f"got {tuple(self.soft_labels.shape)}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / FILENAME
        tensors = {"images": self.images.detach().float().cpu().contiguous(),
                   "labels": self.labels.detach().long().cpu().contiguous()}
        if self.soft_labels is not None:
            tensors["soft_labels"] = self.soft_labels.detach().float().cpu().contiguous()
        if self.lr is not None:
            tensors["lr"] = torch.tensor(float(self.lr), dtype=torch.float32)
        atomic_write_bytes(path, st_save(tensors, metadata={"ltdd": json.dumps(self.meta, default=str)}))
        return path

    def check_compatible(self, data, what: str = "the distilled set") -> None:
        """The contract between a set and the data it is used with (evaluation, export, grouping, two-stage): the same
        dataset, split and preprocessing as recorded when it was made, images of the data's shape and labels within
        its classes. Raises a one-line :class:`LtddError` naming what differs."""
        from .data.fingerprint import check_compatible

        recorded = dict(self.meta.get("fingerprint") or {})
        if not recorded:  # sets written before the fingerprint: what they recorded
            if self.meta.get("dataset"):
                recorded["dataset"] = self.meta["dataset"]
            if self.meta.get("split_sha"):
                recorded["split_sha"] = self.meta["split_sha"]
            if isinstance(self.meta.get("preprocessor"), dict) and self.meta["preprocessor"]:
                from .data.fingerprint import digest

                recorded["preprocessing"] = digest(self.meta["preprocessor"])
        check_compatible(recorded, data, what)
        if tuple(self.images.shape[1:]) != (data.channels, *data.im_size):
            raise LtddError(f"{what}: images have shape {tuple(self.images.shape)}, expected (N, {data.channels}, "
                            f"{data.im_size[0]}, {data.im_size[1]}) for {data.name}")
        if len(self.labels) and (int(self.labels.max()) >= data.num_classes or int(self.labels.min()) < 0):
            raise LtddError(f"{what}: labels go up to {int(self.labels.max())} (lowest {int(self.labels.min())}), "
                            f"but {data.name} has {data.num_classes} classes")
        if self.soft_labels is not None and self.soft_labels.shape[1] != data.num_classes:
            raise LtddError(f"{what} has soft labels over {self.soft_labels.shape[1]} classes, the data "
                            f"{data.num_classes}")

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        path = Path(path)
        from .export import is_export, load_export

        if is_export(path):  # a folder written by `ltdd export` (manifest.json): checksums verified, never unpickled
            return load_export(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise LtddError(f"distilled set not found: {path}")
        try:
            tensors = st_load(path.read_bytes())
        except (SafetensorError, Exception) as e:  # noqa: BLE001 - any parse failure is the file's fault
            raise LtddError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0][:120]})") from None
        meta = read_meta(path)
        for key in ("images", "labels"):
            if key not in tensors:
                raise LtddError(f"{path} has no '{key}' tensor")
        lr = tensors.get("lr")
        return cls(tensors["images"].float(), tensors["labels"].long(), tensors.get("soft_labels"),
                   float(lr) if lr is not None else None, meta)


def read_meta(path: str | Path) -> dict:
    """The ``ltdd`` metadata of a distilled set (dataset, split, method, class names, ...) without reading its
    tensors; ``{}`` when it has none or it is not JSON."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise LtddError(f"distilled set not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("ltdd", "{}")
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise LtddError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0][:120]})") from None
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def image_grid(pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, max_per_class: int = 10):
    """A PIL image with one row per class (up to ``max_per_class`` images each); pixels in [0, 1], N x C x H x W."""
    from PIL import Image

    pixels = pixels.detach().float().clamp(0, 1).cpu()
    n, ch, h, w = pixels.shape
    cols = max(1, min(max_per_class, max(int((labels == c).sum()) for c in range(num_classes)) if n else 1))
    pad = 1
    canvas = torch.ones(3, num_classes * (h + pad) + pad, cols * (w + pad) + pad)
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()[:cols]
        for j, i in enumerate(idx.tolist()):
            img = pixels[i]
            img = img.expand(3, h, w) if ch == 1 else img[:3]
            y0, x0 = pad + c * (h + pad), pad + j * (w + pad)
            canvas[:, y0:y0 + h, x0:x0 + w] = img
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    scale = max(1, 256 // max(h, w) // 2)
    im = Image.fromarray(arr)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def save_grid(path: str | Path, pixels: torch.Tensor, labels: torch.Tensor, num_classes: int,
              max_per_class: int = 10) -> None:
    import io

    buf = io.BytesIO()
    image_grid(pixels, labels, num_classes, max_per_class).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
