"""Export a distilled set for other tools.

* :func:`export_imagefolder`: ``out_dir/<class>/<i>.png``, un-whitened and un-normalised back to pixels with the
  preprocessing the set was distilled with (``Preprocessor.to_pixels``, clamped to [0, 1], rounded to uint8);
  grayscale sets give mode "L" PNGs, colour sets "RGB". Every class gets a folder (an empty one when the set has no
  image of it), so that sorted folder names give the same class indices as the set. ``<i>`` counts within the class,
  zero-padded to a common width so that name order is set order. Soft labels and the learned lr are not part of an
  ImageFolder; use :func:`export_ddranking` for those.
* :func:`export_ddranking`: DD-Ranking's interop tensors, each written with ``torch.save`` as one plain tensor:
  ``images.pt`` (float32 N x C x H x W, exactly as stored: the model's input space, i.e. normalised and, when the
  set was distilled with ZCA, whitened), ``labels.pt`` (float32 N x num_classes soft-label logits when the set has
  them, else int64 hard labels) and ``lr.pt`` (float32 scalar; only when the set has a learned step size).
  They load with ``torch.load(path, weights_only=True)``.

Both write into a temporary folder beside ``out_dir`` and rename it into place, so a failure leaves no partial
output. An existing non-empty ``out_dir`` is an error unless ``overwrite=True``.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .errors import LtddError
from .synset import SyntheticSet

__all__ = ["export_imagefolder", "export_ddranking", "class_folder_names"]

_BAD_CHARS = '/\\\0:*?"<>|'


@contextmanager
def _staging_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out_dir``; on success it replaces ``out_dir`` atomically."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LtddError(f"export target {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LtddError(f"export target {out} exists and is not empty (choose another folder or overwrite it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise LtddError(f"cannot write into {out.parent}: {e.strerror or e}") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "x")  # move aside (an empty folder could be replaced directly, a full one cannot)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def class_folder_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """One safe, distinct folder name per class (``str(c)`` when no names are given)."""
    if class_names is None:
        class_names = [str(c) for c in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) < num_classes:
        raise LtddError(f"{len(names)} class names given, but the set has labels up to {num_classes - 1}")
    out = []
    for c, n in enumerate(names):
        safe = "".join("_" if ch in _BAD_CHARS or ord(ch) < 32 else ch for ch in n).strip()
        if safe in ("", ".", "..") or safe.startswith("."):
            safe = f"class_{c}" if safe in ("", ".", "..") else "_" + safe[1:]
        out.append(safe)
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise LtddError(f"class names give the same folder name more than once: {dup[:5]}")
    return out


def _preprocessor(preprocessor_or_data):
    pre = getattr(preprocessor_or_data, "preprocessor", preprocessor_or_data)
    if not hasattr(pre, "to_pixels"):
        raise TypeError("export_imagefolder needs a Preprocessor or PreparedData (something with to_pixels)")
    return pre


def export_imagefolder(synset: SyntheticSet, preprocessor_or_data, out_dir: str | Path,
                       class_names: Sequence[str] | None = None, *, overwrite: bool = False) -> Path:
    """Write the set as PNGs ``out_dir/<class>/<i>.png`` in pixel space; returns ``out_dir``.

    ``preprocessor_or_data``: the fitted ``Preprocessor`` the set was distilled with, or the ``PreparedData``
    holding it. ``class_names`` default to the data's class names (if data is given) or ``0..C-1``.
    """
    from PIL import Image

    images, labels = synset.images.detach().float().cpu(), synset.labels.detach().long().cpu()
    n, ch = int(images.shape[0]), int(images.shape[1])
    if ch not in (1, 3):
        raise LtddError(f"cannot write PNGs of {ch}-channel images (need 1 or 3 channels)")
    if class_names is None:
        class_names = getattr(preprocessor_or_data, "class_names", None)
    if n and int(labels.min()) < 0:
        raise LtddError(f"distilled labels must be >= 0, found {int(labels.min())}")
    num_classes = max(len(class_names) if class_names is not None else 0, int(labels.max()) + 1 if n else 0)
    folders = class_folder_names(class_names, num_classes)
    with torch.no_grad():
        pixels = _preprocessor(preprocessor_or_data).to_pixels(images).clamp(0.0, 1.0)
    arr = (pixels * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # N, H, W, C
    per_class = np.bincount(labels.numpy(), minlength=num_classes) if n else np.zeros(num_classes, dtype=int)
    width = len(str(max(int(per_class.max()) - 1, 0))) if num_classes else 1
    with _staging_dir(out_dir, overwrite) as tmp:
        for name in folders:
            (tmp / name).mkdir()
        seen = [0] * num_classes
        for i in range(n):
            c = int(labels[i])
            img = Image.fromarray(np.ascontiguousarray(arr[i, :, :, 0] if ch == 1 else arr[i]))  # "L" or "RGB"
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            _fsync_write(tmp / folders[c] / f"{seen[c]:0{width}d}.png", buf.getvalue())
            seen[c] += 1
    return Path(out_dir)


def _plain(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A plain, contiguous CPU tensor with its own storage (torch.save writes whole storages)."""
    return t.detach().as_subclass(torch.Tensor).to("cpu", dtype).contiguous().clone()


def export_ddranking(synset: SyntheticSet, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Write ``images.pt``, ``labels.pt`` and (when the set has a learned lr) ``lr.pt``; returns name -> path."""
    tensors = {"images": _plain(synset.images, torch.float32)}
    if synset.soft_labels is not None:
        tensors["labels"] = _plain(synset.soft_labels, torch.float32)
    else:
        tensors["labels"] = _plain(synset.labels, torch.int64)
    if synset.lr is not None:
        tensors["lr"] = torch.tensor(float(synset.lr), dtype=torch.float32)
    with _staging_dir(out_dir, overwrite) as tmp:
        for name, t in tensors.items():
            buf = io.BytesIO()
            torch.save(t, buf)
            _fsync_write(tmp / f"{name}.pt", buf.getvalue())
    return {name: Path(out_dir) / f"{name}.pt" for name in tensors}
