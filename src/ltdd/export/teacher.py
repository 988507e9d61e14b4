"""The set's teacher in an export: finding it beside the set, reading it, and writing its files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LtddError
from .manifest import TEACHER, TEACHER_INFO, TEACHER_PT, TEACHER_PT_INFO
from .staging import _Files, _plain, _torch_bytes


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

    from ..labels import NETWORK_KEY, TEACHER_KEY

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
