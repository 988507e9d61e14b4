"""The ``ddranking`` export layout: DD-Ranking's interop tensors (class-major, exactly IPC per class)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import LtddError
from ..synset import SyntheticSet
from .manifest import PREPROCESSING, TEACHER_PT, _manifest, _provenance, _setup
from .staging import _Files, _plain, _st_bytes, _staging_dir, _torch_bytes
from .teacher import _teacher_section


DDRANKING_NOTES = [
    "DD-Ranking fits its ZCA on the balanced train set; these images are whitened with the ZCA fitted on the "
    "long-tailed train split (preprocessing.safetensors), so its real-data references (random subset, full data) "
    "live in a different model space unless it is given this ZCA.",
    "DD-Ranking assumes balanced data: its random-subset and full-data references are drawn from the balanced set; "
    "ltdd computes the long-tail variant of its scores natively.",
    "DD-Ranking needs a teacher checkpoint as a .pt file even for stored soft labels.",
    "Tensors are written with torch.save as plain tensors; load them with torch.load(path, weights_only=True).",
]


def _check_ddranking_layout(labels: torch.Tensor, names: list[str], num_classes: int, ipc: int | None) -> int:
    """DD-Ranking's layout: classes 0..K-1 in order, exactly IPC images each; returns IPC."""
    n = len(labels)
    if n == 0:
        raise LtddError("DD-Ranking export of an empty set")
    counts = np.bincount(labels.numpy(), minlength=num_classes)
    want = int(ipc) if ipc is not None else int(counts.max())
    for c in range(num_classes):
        if int(counts[c]) != want:
            raise LtddError(f"DD-Ranking needs exactly {want} images per class: class {c} ('{names[c]}') has "
                            f"{int(counts[c])}")
    expected = torch.arange(num_classes).repeat_interleave(want)
    bad = torch.nonzero(labels != expected).flatten()
    if len(bad):
        i = int(bad[0])
        raise LtddError(f"DD-Ranking needs class-major order: image {i} is of class {int(labels[i])} "
                        f"('{names[int(labels[i])]}') where class {int(expected[i])} was expected "
                        f"(sort the set by class first)")
    return want


def export_ddranking(synset: SyntheticSet, preprocessor_or_data, out_dir: str | Path, *, overwrite: bool = False,
                     class_names: Sequence[str] | None = None, run_config: dict | None = None,
                     teacher: str | Path | None = None) -> dict[str, Path]:
    """Write ``images.pt``, ``labels.pt``, ``lr.pt`` (when the set has a learned lr), the teacher (when given), the
    preprocessing and the manifest; returns name -> path of the DD-Ranking tensors (and ``teacher``).

    The set must be class-major with exactly IPC images per class (IPC as recorded in its metadata, else the
    largest class count); anything else is a one-line :class:`LtddError` naming the class.
    """
    if isinstance(preprocessor_or_data, (str, Path)):
        raise TypeError("export_ddranking(synset, preprocessor_or_data, out_dir): the data comes before the folder")
    pre, labels, num_classes, names, _ = _setup(synset, preprocessor_or_data, class_names)
    prov = _provenance(synset, run_config)
    ipc = _check_ddranking_layout(labels, names, num_classes, prov["ipc"])
    tensors = {"images": _plain(synset.images, torch.float32)}
    if synset.soft_labels is not None:
        tensors["labels"] = _plain(synset.soft_labels, torch.float32)
    else:
        tensors["labels"] = _plain(synset.labels, torch.int64)
    if synset.lr is not None:
        tensors["lr"] = torch.tensor(float(synset.lr), dtype=torch.float32)
    with _staging_dir(out_dir, overwrite) as tmp:
        files = _Files(tmp)
        for name, t in tensors.items():
            files.write(f"{name}.pt", _torch_bytes(t))
        files.write(PREPROCESSING, _st_bytes(pre.state_dict()))
        manifest = _manifest(synset, preprocessor_or_data, "ddranking", names, num_classes, prov, pre,
                             PREPROCESSING)
        manifest["set"]["ipc"] = ipc
        teacher_info = _teacher_section(files, teacher, pt=True)
        manifest["teacher"] = teacher_info
        manifest["ddranking"] = {
            "files": {k: f"{k}.pt" for k in tensors} | ({"teacher": TEACHER_PT} if teacher_info else {}),
            "images": "float32 (N, C, H, W) in the model space (normalised and, when zca is on, ZCA-whitened with "
                      "the long-tailed split's statistics)",
            "labels": ("float32 (N, num_classes) soft-label logits" if synset.soft_labels is not None
                       else "int64 (N,) hard labels"),
            "order": f"class-major: classes 0..{num_classes - 1} in index order, exactly {ipc} images each",
            "load_with": "torch.load(path, weights_only=True)",
            "notes": DDRANKING_NOTES + ([] if teacher_info else
                                        ["This set has no teacher: DD-Ranking's soft-label paths need one."]),
        }
        files.finish(manifest)
    out = {name: Path(out_dir) / f"{name}.pt" for name in tensors}
    if teacher_info:
        out["teacher"] = Path(out_dir) / TEACHER_PT
    return out
