"""Writing an export's files atomically: a staging folder renamed into place, fsync'd writes with their
sha256, plain tensor serialisation, and ``manifest.json`` + ``SHA256SUMS`` at the end."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..errors import LtddError
from .manifest import CHECKSUMS, MANIFEST


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
