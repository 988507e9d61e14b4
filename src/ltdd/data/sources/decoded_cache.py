"""Cache of decoded source arrays: one ``.npz`` file (no pickle) per source, keyed by a fingerprint of its files.

The key is the loader, the resolved source path, its size and modification time (or, for a folder, those of every
file in it) and the loader options, so the second load of a JPEG archive takes a fraction of a second. The folder is
``$LTDD_CACHE_DIR`` or ``~/.cache/ltdd`` unless told otherwise; an unreadable entry is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ...config import atomic_write_bytes
from .base import ImageSet, SourceData

__all__ = ["default_cache_dir"]

CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("LTDD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/ltdd").expanduser()


def _resolve_cache_dir(cache_dir: str | Path | None | bool) -> Path | None:
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir).expanduser()


def _file_stat(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_file(cache_dir: Path, loader: str, fingerprint: dict) -> Path:
    blob = json.dumps({"v": CACHE_FORMAT_VERSION, "loader": loader, **fingerprint}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]
    return cache_dir / f"{loader}-{digest}.npz"


def _cache_read(path: Path) -> SourceData | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(s) for s in z["class_names"].tolist()]
            name = str(z["name"].item())
            train = ImageSet(z["train_images"], z["train_labels"], names)
            test = ImageSet(z["test_images"], z["test_labels"], names)
        return SourceData(name, train, test)
    except FileNotFoundError:
        return None
    except Exception as e:  # a truncated or foreign file: rebuild it
        warnings.warn(f"ignoring unreadable data cache {path}: {e}", stacklevel=3)
        return None


def _cache_write(path: Path, data: SourceData) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        name=np.array(data.name),
        class_names=np.array(data.train.class_names, dtype=str),
        train_images=data.train.images,
        train_labels=data.train.labels,
        test_images=data.test.images,
        test_labels=data.test.labels,
    )
    try:
        atomic_write_bytes(path, buf.getbuffer())
    except OSError as e:
        warnings.warn(f"could not write data cache {path}: {e}", stacklevel=3)


def _cached(
    loader: str, fingerprint: dict, cache_dir: str | Path | None | bool, build: Callable[[], SourceData]
) -> SourceData:
    folder = _resolve_cache_dir(cache_dir)
    if folder is None:
        return build()
    path = _cache_file(folder, loader, fingerprint)
    hit = _cache_read(path)
    if hit is not None:
        return hit
    data = build()
    _cache_write(path, data)
    return data
