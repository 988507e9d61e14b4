"""The ``imagefolder`` export layout: ``<class>/<i>.png`` in pixel space, with soft labels and manifest."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import LtddError
from ..synset import SyntheticSet
from .manifest import PREPROCESSING, SOFT_LABELS, _manifest, _provenance, _setup
from .staging import _Files, _st_bytes, _staging_dir
from .teacher import _teacher_section


def _decode_png(blob: bytes) -> np.ndarray:
    """(H, W, C) uint8 of a PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def export_imagefolder(synset: SyntheticSet, preprocessor_or_data, out_dir: str | Path,
                       class_names: Sequence[str] | None = None, *, overwrite: bool = False,
                       run_config: dict | None = None, teacher: str | Path | None = None) -> Path:
    """Write the set as PNGs ``out_dir/<class>/<i>.png`` in pixel space, with its manifest; returns ``out_dir``.

    ``preprocessor_or_data``: the ``PreparedData`` the set was distilled from (the manifest then states its dataset,
    split and real class counts; the set must be compatible with it) or just its fitted ``Preprocessor``.
    ``class_names`` default to the data's class names or ``0..C-1``. ``run_config``: the resolved run configuration
    (method, n_c < IPC policy, protocol; see :func:`find_run_config`). ``teacher``: a ``teacher.safetensors`` to
    ship with it (see :func:`find_teacher`).
    """
    from PIL import Image

    images = synset.images.detach().float().cpu()
    ch = int(images.shape[1])
    if ch not in (1, 3):
        raise LtddError(f"cannot write PNGs of {ch}-channel images (need 1 or 3 channels)")
    pre, labels, num_classes, names, folders = _setup(synset, preprocessor_or_data, class_names)
    n = len(labels)
    with torch.no_grad():
        raw = pre.to_pixels(images, clamp=False)
    clamped = int(((raw < 0) | (raw > 1)).sum())
    arr = (raw.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # N, H, W, C
    per_class = np.bincount(labels.numpy(), minlength=num_classes) if n else np.zeros(num_classes, dtype=int)
    width = len(str(max(int(per_class.max()) - 1, 0))) if num_classes else 1
    prov = _provenance(synset, run_config)
    with _staging_dir(out_dir, overwrite) as tmp:
        files = _Files(tmp)
        for name in folders:
            (tmp / name).mkdir()
        seen = [0] * num_classes
        order, decoded = [], []
        for i in range(n):
            c = int(labels[i])
            img = Image.fromarray(np.ascontiguousarray(arr[i, :, :, 0] if ch == 1 else arr[i]))  # "L" or "RGB"
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rel = f"{folders[c]}/{seen[c]:0{width}d}.png"
            files.write(rel, buf.getvalue())
            decoded.append(_decode_png(buf.getvalue()))
            order.append(rel)
            seen[c] += 1
        files.write(PREPROCESSING, _st_bytes(pre.state_dict()))
        if synset.soft_labels is not None:
            files.write(SOFT_LABELS, _st_bytes({"soft_labels": synset.soft_labels.detach().float()}))
        manifest = _manifest(synset, preprocessor_or_data, "imagefolder", names, num_classes, prov, pre,
                             PREPROCESSING)
        if n:  # the round trip as a reader will do it: PNG bytes -> pixels -> the recorded preprocessing
            back = pre(np.stack(decoded))
            err_model = float((back - images).abs().max())
            err_px = float((pre.to_pixels(back, clamp=False) - raw.clamp(0, 1)).abs().max())
        else:
            err_model = err_px = 0.0
        manifest["imagefolder"] = {
            "images": "PNG, uint8, un-whitened and un-normalised pixels (clamped to [0, 1], rounded to 1/255); apply "
                      "the preprocessing steps to get the model-space images the set was distilled in",
            "folders": folders, "order": order,
            "soft_labels_file": SOFT_LABELS if synset.soft_labels is not None else None,
            "clamped_values": clamped, "total_values": int(images.numel()),
            "roundtrip_max_abs_error": {"pixels": err_px, "model_space": err_model}}
        manifest["teacher"] = _teacher_section(files, teacher, pt=False)
        files.finish(manifest)
    return Path(out_dir)
