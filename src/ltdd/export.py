"""Export a distilled set so that others can use it, and read such an export back.

Two layouts, each a folder with ``manifest.json``, ``SHA256SUMS`` and ``preprocessing.safetensors`` beside the data:

* ``imagefolder`` (:func:`export_imagefolder`): ``<class>/<i>.png``, un-whitened and un-normalised back to pixels
  with the preprocessing the set was distilled with (``Preprocessor.to_pixels``, clamped to [0, 1], rounded to
  uint8); grayscale sets give mode "L" PNGs, colour sets "RGB". Every class gets a folder (an empty one when the set
  has no image of it), so that sorted folder names give the same class indices as the set. ``<i>`` counts within
  the class, zero-padded to a common width so that name order is set order. Soft-label logits, when the set has
  them, are in ``soft_labels.safetensors`` (set order = the manifest's ``imagefolder.order``); the learned lr is in
  the manifest. Reading back re-applies the recorded preprocessing to the PNG pixels: the model-space images come
  back within PNG quantisation (half a grey level per pixel value) wherever the pixels were inside [0, 1]; the
  manifest records how many values were clamped and the round-trip error measured at export.
* ``ddranking`` (:func:`export_ddranking`): DD-Ranking's interop tensors, each written with ``torch.save`` as one
  plain tensor (they load with ``torch.load(path, weights_only=True)``): ``images.pt`` (float32 N x C x H x W,
  exactly as stored: the model's input space, i.e. normalised and, when the set was distilled with ZCA, whitened),
  ``labels.pt`` (float32 N x num_classes soft-label logits when the set has them, else int64 hard labels) and
  ``lr.pt`` (float32 scalar; only when the set has a learned step size). DD-Ranking needs class-major order with
  exactly IPC images per class: anything else is refused with a one-line error.

Both layouts also carry the set's teacher when it has one (``teacher.safetensors`` + ``teacher.json`` beside the
set, or the file its metadata names, in the :mod:`ltdd.labels` teacher format): copied as is with its description
as ``teacher.json``, and for ``ddranking`` also as ``teacher_model.pt``, ``torch.save`` of a plain state_dict of
tensors (DD-Ranking loads a .pt checkpoint), with ``teacher_model.json`` beside it.

``manifest.json`` (:data:`FORMAT`, version :data:`FORMAT_VERSION`) says everything needed to use the set without
ltdd: the dataset and its long-tailed split (imbalance factor, split seed, real count per class, fingerprint), the
n_c < IPC policy, IPC, class order and names, the preprocessing (mean/std values; the ZCA matrix is in
``preprocessing.safetensors``; fitted on the long-tailed train split, not a balanced set), the label type and
temperature, the learned lr, the evaluation protocol, the method and its resolved configuration, the ltdd version,
the set's own metadata, and the sha256 of every file written. ``SHA256SUMS`` (``sha256sum -c`` format) also covers
``manifest.json``.

Export writes into a temporary folder beside ``out_dir`` and renames it into place, so a failure leaves no partial
output. An existing non-empty ``out_dir`` is an error unless ``overwrite=True``. :func:`load_export` (and
``SyntheticSet.load`` on such a folder) verifies every checksum before reading and never unpickles.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
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

__all__ = ["export_imagefolder", "export_ddranking", "class_folder_names", "load_export", "verify_export",
           "find_run_config", "find_teacher", "is_export", "MANIFEST", "CHECKSUMS", "PREPROCESSING", "FORMAT",
           "FORMAT_VERSION"]

MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"
PREPROCESSING = "preprocessing.safetensors"
SOFT_LABELS = "soft_labels.safetensors"
TEACHER = "teacher.safetensors"
TEACHER_INFO = "teacher.json"
TEACHER_PT = "teacher_model.pt"
TEACHER_PT_INFO = "teacher_model.json"
FORMAT = "ltdd-export"
FORMAT_VERSION = 1

_BAD_CHARS = '/\\\0:*?"<>|'

DDRANKING_NOTES = [
    "DD-Ranking fits its ZCA on the balanced train set; these images are whitened with the ZCA fitted on the "
    "long-tailed train split (preprocessing.safetensors), so its real-data references (random subset, full data) "
    "live in a different model space unless it is given this ZCA.",
    "DD-Ranking assumes balanced data: its random-subset and full-data references are drawn from the balanced set; "
    "ltdd computes the long-tail variant of its scores natively.",
    "DD-Ranking needs a teacher checkpoint as a .pt file even for stored soft labels.",
    "Tensors are written with torch.save as plain tensors; load them with torch.load(path, weights_only=True).",
]


# ----------------------------------------------------------------------------------------------------------------
# writing


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
        _fsync_dir(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "x")  # move aside (an empty folder could be replaced directly, a full one cannot)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class _Files:
    """Writes files under the staging folder and records each one's sha256 and size."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.records: dict[str, dict] = {}

    def write(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _fsync_write(path, data)
        self.records[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def finish(self, manifest: dict) -> None:
        """Write ``manifest.json`` (with the checksums of everything written so far) and ``SHA256SUMS``."""
        manifest["files"] = {k: self.records[k] for k in sorted(self.records)}
        blob = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
        _fsync_write(self.root / MANIFEST, blob)
        sums = {**{k: v["sha256"] for k, v in self.records.items()}, MANIFEST: hashlib.sha256(blob).hexdigest()}
        _fsync_write(self.root / CHECKSUMS, "".join(f"{sums[k]}  {k}\n" for k in sorted(sums)).encode("utf-8"))


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
    if isinstance(pre, (str, Path)) or not hasattr(pre, "to_pixels"):
        raise TypeError("export needs the Preprocessor the set was distilled with, or the PreparedData holding it")
    if not getattr(pre, "fitted", False):
        raise LtddError("the preprocessing given for export has not been fitted")
    return pre


def _is_prepared(data) -> bool:
    return all(hasattr(data, k) for k in ("split", "train_counts", "train_y", "preprocessor", "num_classes"))


def _plain(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A plain, contiguous CPU tensor with its own storage (torch.save writes whole storages)."""
    return t.detach().as_subclass(torch.Tensor).to("cpu", dtype).contiguous().clone()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _st_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    from safetensors.torch import save as st_save

    return st_save({k: _plain(v, v.dtype) for k, v in tensors.items()}, metadata=metadata)


def _json_clean(obj):
    return json.loads(json.dumps(obj, default=str))


def find_run_config(set_path: str | Path) -> dict | None:
    """The resolved run configuration recorded beside a distilled set: ``config.yaml`` in its folder (what
    ``ltdd distill`` writes), or the one an export's manifest carries; ``None`` when there is none."""
    from .config import load_yaml

    p = Path(set_path)
    folder = p if p.is_dir() else p.parent
    if (folder / MANIFEST).is_file():
        try:
            rc = json.loads((folder / MANIFEST).read_text()).get("method", {}).get("run_config")
        except (json.JSONDecodeError, AttributeError, OSError):
            rc = None
        if isinstance(rc, dict):
            return rc
    if (folder / "config.yaml").is_file():
        rc = load_yaml(folder / "config.yaml")
        if isinstance(rc, dict) and ("distill" in rc or "protocol" in rc):  # a run's config, not e.g. `ltdd train`'s
            return rc
    return None


def find_teacher(set_path: str | Path, meta: dict | None = None) -> Path | None:
    """The teacher beside a distilled set (or inside an export): the file its metadata names (``teacher``, as RLDD
    records it), else ``teacher.safetensors`` if present; ``None`` when it has none. A named teacher that is missing
    is an error (the export would silently lack it)."""
    p = Path(set_path)
    folder = p if p.is_dir() else p.parent
    named = (meta or {}).get("teacher")
    if isinstance(named, str) and named:
        cand = folder / Path(named).name
        if not cand.is_file():
            raise LtddError(f"{set_path} names its teacher {Path(named).name}, but {cand} does not exist (restore it "
                            f"or pass --teacher)")
        return cand
    return folder / TEACHER if (folder / TEACHER).is_file() else None


def _read_teacher(teacher: str | Path | None) -> tuple[bytes, dict[str, torch.Tensor], bytes | None, dict] | None:
    """(safetensors bytes, its tensors, teacher.json bytes or None, parsed teacher.json) of a teacher file."""
    if teacher is None:
        return None
    from safetensors.torch import load as st_load

    path = Path(teacher)
    if not path.is_file():
        raise LtddError(f"teacher file not found: {path}")
    blob = path.read_bytes()
    try:
        tensors = st_load(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise LtddError(f"teacher {path} is not a valid safetensors file ({str(e).splitlines()[0][:120]})") from None
    if not tensors:
        raise LtddError(f"teacher {path} holds no tensors")
    from safetensors import safe_open

    from .labels import NETWORK_KEY, TEACHER_KEY

    with safe_open(str(path), framework="pt") as f:  # the ltdd.labels teacher format: the description inside
        md = f.metadata() or {}
    raw, where = md.get(TEACHER_KEY) or md.get(NETWORK_KEY), f"the '{TEACHER_KEY}' metadata of {path}"
    info_path = path.with_suffix(".json")
    if raw is None and info_path.is_file():  # or a description beside it
        raw, where = info_path.read_text(), str(info_path)
    try:
        info = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise LtddError(f"teacher description in {where} is not JSON ({e.msg} at line {e.lineno})") from None
    info = info if isinstance(info, dict) else {"value": info}
    info_blob = (json.dumps(info, indent=2) + "\n").encode("utf-8") if info else None
    return blob, tensors, info_blob, info


def _protocol(meta: dict, rc: dict) -> dict | None:
    """The evaluation protocol the set was made for: from its metadata, else from its run configuration."""
    from . import config as C

    rec = meta.get("protocol")
    if isinstance(rec, dict):
        return {"name": meta.get("protocol_name"), "config": rec, "source": "set metadata"}
    name = rec if isinstance(rec, str) else rc.get("protocol")
    if not isinstance(name, str):
        return None
    overrides = rc.get("protocol_overrides") or {} if not isinstance(rec, str) else {}
    source = "set metadata" if isinstance(rec, str) else "run configuration"
    try:
        cfg = C.from_dict(C.RunConfig, {"protocol": name, "protocol_overrides": overrides}).protocol_config()
        return {"name": name, "overrides": overrides, "config": C.to_dict(cfg), "source": source}
    except LtddError as e:
        return {"name": name, "overrides": overrides, "config": None, "source": f"{source} (not resolved: {e})"}


def _same_data(a, b) -> bool:
    from . import config as C

    try:
        return C.to_dict(C.from_dict(C.DataConfig, a)) == C.to_dict(C.from_dict(C.DataConfig, b))
    except LtddError:
        return False


def _provenance(synset: SyntheticSet, run_config: dict | None) -> dict:
    meta = synset.meta if isinstance(synset.meta, dict) else {}
    rc = run_config if isinstance(run_config, dict) else {}
    if isinstance(rc.get("data"), dict) and isinstance(meta.get("data"), dict) and not _same_data(rc["data"],
                                                                                                   meta["data"]):
        raise LtddError("the run configuration given describes other data than the set records (dataset, split or "
                        "preprocessing differ): it is not this set's run (give the right config.yaml with --run-config)")
    distill = rc.get("distill") if isinstance(rc.get("distill"), dict) else meta.get("distill")
    distill = distill if isinstance(distill, dict) else {}
    ipc = meta.get("ipc", distill.get("ipc"))
    return {"meta": meta, "run_config": rc or None, "distill": distill or None,
            "method": meta.get("method", distill.get("method")), "ipc": int(ipc) if ipc is not None else None,
            "protocol": _protocol(meta, rc)}


def _manifest(synset: SyntheticSet, data, layout: str, class_names: list[str], num_classes: int, prov: dict,
              pre, pre_file: str) -> dict:
    """Everything but ``files`` and the layout-specific section."""
    from . import __version__
    from .data.fingerprint import digest, fingerprint, split_sha

    labels = synset.labels.detach().long().cpu()
    per_class = np.bincount(labels.numpy(), minlength=num_classes).tolist() if len(labels) else [0] * num_classes
    ipc = prov["ipc"]
    prepared = _is_prepared(data)
    real = [int(c) for c in data.train_counts] if prepared else None
    distill = prov["distill"] or {}
    duplicate = distill.get("duplicate")
    policy = None if duplicate is None else ("duplicate_cyclic" if duplicate else "noise")

    classes = []
    for c in range(num_classes):
        entry = {"index": c, "name": class_names[c], "synthetic_count": int(per_class[c])}
        if real is not None:
            entry["real_train_count"] = real[c]
            entry["below_ipc"] = bool(ipc is not None and real[c] < ipc)
        classes.append(entry)

    dataset = None
    if prepared:
        fp = fingerprint(data)
        dcfg = prov["meta"].get("data") if isinstance(prov["meta"].get("data"), dict) else None
        dataset = {"name": data.name, "num_classes": int(data.num_classes), "channels": int(data.channels),
                   "im_size": [int(v) for v in data.im_size],
                   "imbalance_factor": float(data.split.imbalance_factor), "profile": data.split.profile,
                   "split_seed": int(data.split.seed), "n_max": int(data.split.n_max),
                   "frequency_order": [int(c) for c in data.split.class_order],
                   "train_counts": real, "num_train": int(sum(real)),
                   "test_counts": [int(c) for c in getattr(data, "test_counts", [])],
                   "split_sha": split_sha(data), "fingerprint": fp, "config": dcfg}

    pcfg = pre.config()
    zca_keys = {k: list(v.shape) for k, v in pre.state_dict().items()}
    steps = ["pixels = uint8 / 255 as float32 (N, C, H, W)"]
    if pcfg.get("normalize"):
        steps.append("x = (x - mean[c]) / std[c] per channel (normalizer.mean / normalizer.std)")
    if pcfg.get("zca"):
        steps.append("x = ((x.flatten(1) - zca.mean) @ zca.matrix).reshape(N, C, H, W); inverse: "
                     "x.flatten(1) @ zca.inverse + zca.mean")
    preprocessing = {"steps": steps, "normalize": bool(pcfg.get("normalize")), "mean": pcfg.get("mean"),
                     "std": pcfg.get("std"), "zca": bool(pcfg.get("zca")),
                     "zca_eps": pcfg.get("zca_eps") if pcfg.get("zca") else None, "zca_dim": pcfg.get("zca_dim"),
                     "file": pre_file, "tensors": zca_keys, "config": pcfg, "digest": digest(pcfg),
                     "fitted_on": ({"split": "the long-tailed train split (not a balanced set)",
                                    "dataset": data.name, "num_images": int(sum(real)), "train_counts": real,
                                    "split_sha": split_sha(data), "fingerprint": dataset["fingerprint"]}
                                   if prepared else {"split": "not recorded (exported without its prepared data)"})}

    protocol = prov["protocol"]
    ptrain = (protocol or {}).get("config") or {}
    ptemp = (ptrain.get("train") or {}).get("temperature") if isinstance(ptrain, dict) else None
    soft = synset.soft_labels is not None
    labels_info = {"type": "soft_logits" if soft else "hard", "num_classes": num_classes,
                   "hard_labels": "kept: the class of each image (its folder / its class-major position)",
                   "temperature": ptemp if soft else None,
                   "targets": "softmax(logits / temperature)" if soft else "one-hot of the hard label",
                   "distill_temperature": distill.get("temperature") if soft else None}
    lr = {"learned": synset.lr is not None, "value": float(synset.lr) if synset.lr is not None else None,
          "use": ("the step size learned with the set: train on it with this lr (the protocol's use_learned_lr; "
                  "its schedule still applies)" if synset.lr is not None
                  else "no learned step size: the protocol's own lr applies")}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout, "ltdd_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "dataset": dataset,
        "set": {"num_images": int(len(labels)), "image_shape": [int(v) for v in synset.images.shape[1:]],
                "ipc": ipc, "images_per_class": [int(v) for v in per_class]},
        "classes": classes,
        "small_class_policy": {"rule": policy, "classes_below_ipc":
                               ([c for c in range(num_classes) if real[c] < ipc]
                                if real is not None and ipc is not None else None),
                               "meaning": {"duplicate_cyclic": "a class with n_c < IPC repeats its n_c real images "
                                                               "cyclically to fill IPC slots",
                                           "noise": "a class with n_c < IPC fills the missing slots with noise"},
                               "source": "run configuration distill.duplicate" if policy else "not recorded"},
        "preprocessing": preprocessing,
        "labels": labels_info,
        "lr": lr,
        "evaluation_protocol": protocol,
        "method": {"name": prov["method"], "config": prov["distill"], "run_config": prov["run_config"]},
        "set_meta": _json_clean(prov["meta"]),
    }


def _teacher_section(files: _Files, teacher, pt: bool) -> dict | None:
    t = _read_teacher(teacher)
    if t is None:
        return None
    blob, tensors, info_blob, info = t
    files.write(TEACHER, blob)
    if info_blob is not None:
        files.write(TEACHER_INFO, info_blob)
    out = {"file": TEACHER, "info_file": TEACHER_INFO if info_blob is not None else None, "info": info,
           "num_tensors": len(tensors)}
    if pt:
        files.write(TEACHER_PT, _torch_bytes({k: _plain(v, v.dtype) for k, v in tensors.items()}))
        out["pt_file"] = TEACHER_PT
        if info_blob is not None:  # what ltdd.labels.load_teacher needs beside a .pt
            files.write(TEACHER_PT_INFO, info_blob)
            out["pt_info_file"] = TEACHER_PT_INFO
        out["pt_note"] = ("DD-Ranking expects a .pt checkpoint: teacher_model.pt is torch.save of a plain state_dict "
                          "of tensors (same tensors as teacher.safetensors, no other objects); load it with "
                          "torch.load(path, weights_only=True)")
    return out


def _setup(synset: SyntheticSet, preprocessor_or_data, class_names):
    pre = _preprocessor(preprocessor_or_data)
    if _is_prepared(preprocessor_or_data):  # the manifest states this data's split and statistics: they must fit
        synset.check_compatible(preprocessor_or_data, "the distilled set")
    if class_names is None:
        class_names = getattr(preprocessor_or_data, "class_names", None)
    labels = synset.labels.detach().long().cpu()
    n = len(labels)
    if n and int(labels.min()) < 0:
        raise LtddError(f"distilled labels must be >= 0, found {int(labels.min())}")
    num_classes = max(len(class_names) if class_names is not None else 0, int(labels.max()) + 1 if n else 0,
                      int(getattr(preprocessor_or_data, "num_classes", 0) or 0),
                      int(synset.soft_labels.shape[1]) if synset.soft_labels is not None else 0)
    folders = class_folder_names(class_names, num_classes)
    names = [str(v) for v in class_names] if class_names is not None else list(folders)
    return pre, labels, num_classes, names[:num_classes], folders


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


# ----------------------------------------------------------------------------------------------------------------
# reading back


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is an exported folder (or its ``manifest.json``)."""
    p = Path(path)
    return (p.is_dir() and (p / MANIFEST).is_file()) or (p.name == MANIFEST and p.is_file())


def _read_sums(folder: Path) -> dict[str, str]:
    sums = {}
    for ln in (folder / CHECKSUMS).read_text().splitlines():
        if ln.strip():
            sha, _, rel = ln.partition("  ")
            sums[rel.strip()] = sha.strip()
    return sums


def verify_export(path: str | Path) -> tuple[dict, dict[str, bytes]]:
    """Check an exported folder against its checksums; returns (manifest, relative path -> verified bytes).

    Every file the manifest lists must be there with the recorded sha256; ``manifest.json`` itself must match
    ``SHA256SUMS`` when that is present. Any difference is a one-line :class:`LtddError`."""
    folder = Path(path)
    if folder.name == MANIFEST and folder.is_file():
        folder = folder.parent
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise LtddError(f"{folder} is not an ltdd export (no {MANIFEST})")
    mblob = mpath.read_bytes()
    sums = {}
    if (folder / CHECKSUMS).is_file():
        sums = _read_sums(folder)
        got = hashlib.sha256(mblob).hexdigest()
        if sums.get(MANIFEST) not in (None, got):
            raise LtddError(f"{mpath} was changed after export: its sha256 is {got[:16]}..., {CHECKSUMS} says "
                            f"{sums[MANIFEST][:16]}...")
    try:
        manifest = json.loads(mblob)
    except json.JSONDecodeError as e:
        raise LtddError(f"{mpath} is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LtddError(f"{mpath} is not an ltdd export manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise LtddError(f"{mpath} has format version {manifest.get('format_version')}; this ltdd reads up to "
                        f"{FORMAT_VERSION} (upgrade ltdd)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise LtddError(f"{mpath} lists no files")
    out = {}
    for rel, rec in files.items():
        p = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise LtddError(f"{mpath} lists a file outside the folder: {rel}")
        if not p.is_file():
            raise LtddError(f"{folder}: {rel} is missing (listed in {MANIFEST})")
        blob = p.read_bytes()
        got = hashlib.sha256(blob).hexdigest()
        want = rec.get("sha256") if isinstance(rec, dict) else None
        if got != want or (rel in sums and sums[rel] != got):
            raise LtddError(f"{folder}: {rel} was changed after export (sha256 {got[:16]}..., the manifest says "
                            f"{str(want)[:16]}...)")
        out[rel] = blob
    return manifest, out


def _torch_tensor(blob: bytes, what: str) -> torch.Tensor:
    try:
        t = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - anything that is not a plain tensor file
        raise LtddError(f"{what} is not a plain tensor file ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(t, torch.Tensor):
        raise LtddError(f"{what} holds a {type(t).__name__}, not a tensor")
    return t


def _st_tensors(blob: bytes, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    try:
        return st_load(blob)
    except Exception as e:  # noqa: BLE001
        raise LtddError(f"{what} is not a valid safetensors file ({str(e).splitlines()[0][:120]})") from None


def load_export(path: str | Path) -> SyntheticSet:
    """The :class:`SyntheticSet` of an exported folder (checksums verified first; nothing is unpickled).

    ``ddranking``: images, soft labels and lr exactly as exported; hard labels from the class-major layout.
    ``imagefolder``: the PNG pixels mapped through the recorded preprocessing back to model space (equal to the
    exported set within PNG quantisation where its pixels lay in [0, 1]); soft labels and lr exactly.
    The set's metadata is the one recorded at export."""
    from .data.fingerprint import digest
    from .data.transforms import Preprocessor

    folder = Path(path)
    if folder.name == MANIFEST and folder.is_file():
        folder = folder.parent
    manifest, blobs = verify_export(folder)
    layout = manifest.get("layout")
    meta = manifest.get("set_meta") if isinstance(manifest.get("set_meta"), dict) else {}
    lr_rec = manifest.get("lr") or {}
    lr = float(lr_rec["value"]) if lr_rec.get("value") is not None else None
    shape = tuple(manifest.get("set", {}).get("image_shape") or ())
    classes = manifest.get("classes") or []
    if layout == "ddranking":
        images = _torch_tensor(blobs["images.pt"], f"{folder}/images.pt").float()
        raw_labels = _torch_tensor(blobs["labels.pt"], f"{folder}/labels.pt")
        per_class = [int(c["synthetic_count"]) for c in classes]
        hard = torch.arange(len(per_class)).repeat_interleave(torch.tensor(per_class, dtype=torch.long))
        if raw_labels.is_floating_point():
            soft, labels = raw_labels.float(), hard
        else:
            soft, labels = None, raw_labels.long()
        if len(labels) != len(images) or (soft is None and not torch.equal(labels, hard)):
            raise LtddError(f"{folder}: labels.pt does not match the class-major layout its manifest states")
        return SyntheticSet(images, labels, soft, lr, meta)
    if layout != "imagefolder":
        raise LtddError(f"{folder}: unknown export layout '{layout}' (known: imagefolder, ddranking)")
    if PREPROCESSING not in blobs:
        raise LtddError(f"{folder}: {PREPROCESSING} is not listed in its manifest")
    pre = Preprocessor.from_state_dict(_st_tensors(blobs[PREPROCESSING], f"{folder}/{PREPROCESSING}"))
    prec = manifest.get("preprocessing") or {}
    if not pre.zca and isinstance(prec.get("config"), dict) and "zca_eps" in prec["config"]:
        pre.zca_eps = float(prec["config"]["zca_eps"])  # not in the state when ZCA is off, but in its description
    recorded = prec.get("digest")
    if recorded is not None and digest(pre.config()) != recorded:
        raise LtddError(f"{folder}: {PREPROCESSING} does not hold the preprocessing its manifest describes")
    sec = manifest.get("imagefolder") or {}
    folders = sec.get("folders") or []
    order = sec.get("order") or []
    index = {name: c for c, name in enumerate(folders)}
    pixels, labels = [], []
    for rel in order:
        top = rel.split("/", 1)[0]
        if top not in index or rel not in blobs:
            raise LtddError(f"{folder}: image {rel} is not a verified file of a class folder")
        arr = _decode_png(blobs[rel])
        if shape and (arr.shape[2], arr.shape[0], arr.shape[1]) != shape:
            raise LtddError(f"{folder}: {rel} is {arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]}, the manifest says "
                            f"images of shape {list(shape)}")
        pixels.append(arr)
        labels.append(index[top])
    if pixels:
        images = pre(np.stack(pixels))
    else:
        images = torch.zeros((0, *shape), dtype=torch.float32) if shape else torch.zeros(0, 1, 1, 1)
    soft = None
    if sec.get("soft_labels_file"):
        st = _st_tensors(blobs[sec["soft_labels_file"]], f"{folder}/{sec['soft_labels_file']}")
        if "soft_labels" not in st:
            raise LtddError(f"{folder}: {sec['soft_labels_file']} has no 'soft_labels' tensor")
        soft = st["soft_labels"].float()
    return SyntheticSet(images, torch.tensor(labels, dtype=torch.long), soft, lr, meta)
