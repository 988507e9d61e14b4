"""Reading an export back: checksum verification and the :class:`SyntheticSet` of an exported folder."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import LtddError
from ..synset import SyntheticSet
from .imagefolder import _decode_png
from .manifest import CHECKSUMS, FORMAT, FORMAT_VERSION, MANIFEST, PREPROCESSING


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
    from ..data.fingerprint import digest
    from ..data.transforms import Preprocessor

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
