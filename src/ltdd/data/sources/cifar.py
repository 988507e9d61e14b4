"""The ``cifar10`` / ``cifar100`` sources: CIFAR python batches (folder or official archive), ImageFolder fallback.

The pickles are read with a restricted unpickler that admits only numpy array reconstruction: a pickle that refers
to anything else (``os.system``, ``builtins.eval``, ...) is refused before any of it runs.
"""

from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import LtddError
from .base import ImageSet, SourceData, _one_line, _require_root, register_source
from .decoded_cache import _cached, _file_stat
from .imagefolder import _load_imagefolder_path, _read_imagefolder
from .images import _resize_all
from .tree import _hidden, _is_archive, _Tree

__all__ = ["restricted_pickle_load"]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
CIFAR10_META = "batches.meta"
CIFAR100_FILES = ("train", "test")
CIFAR100_META = "meta"


class _Refused(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray as _ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
    return {
        ("numpy.core.multiarray", "_reconstruct"): _ma._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _ma._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need; anything else raises before it can run."""

    def find_class(self, module: str, name: str):  # noqa: D401
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj


def restricted_pickle_load(data: bytes, where: str, loader: str = "cifar") -> object:
    """Unpickle ``data`` admitting only dict/list/str/bytes/int and numpy arrays; ``where`` names it in errors."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise LtddError(
            f"{loader} loader refuses to load {where}: it references {e} (only numpy arrays, dicts, lists, "
            "strings and numbers are allowed in a dataset pickle)"
        ) from None
    except Exception as e:
        raise LtddError(f"cannot read {where} as a {loader} pickle: {_one_line(e)}") from None


def _get(d: dict, key: str, where: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise LtddError(f"{where} has no '{key}' entry; is it a CIFAR python batch?")


def _as_str(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _cifar_batch(obj, where: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise LtddError(f"{where} does not hold a dict; is it a CIFAR python batch?")
    data = np.asarray(_get(obj, "data", where))
    labels = np.asarray(_get(obj, label_key, where), dtype=np.int64).reshape(-1)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise LtddError(
            f"{where}: expected data of shape (N, 3072) and N labels, got {data.shape} and {labels.shape[0]}"
        )
    images = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _cifar_spec(variant: str, label_kind: str):
    if variant == "cifar10":
        return CIFAR10_FOLDER, list(CIFAR10_FILES[:5]), [CIFAR10_FILES[5]], CIFAR10_META, "labels", "label_names"
    if label_kind not in ("fine", "coarse"):
        raise LtddError(f"label_kind must be 'fine' or 'coarse', got '{label_kind}'")
    return (CIFAR100_FOLDER, ["train"], ["test"], CIFAR100_META, f"{label_kind}_labels", f"{label_kind}_label_names")


def _read_cifar_pickles(read: Callable[[list[str]], dict[str, tuple[bytes, str]]], variant: str, label_kind: str,
                        image_size: int | None) -> SourceData:
    """``read(names)`` returns ``{name: (bytes, where)}`` for the batch files (relative to the batches folder)."""
    _, train_files, test_files, meta_file, label_key, names_key = _cifar_spec(variant, label_kind)
    blobs = read(train_files + test_files + [meta_file])
    meta_bytes, meta_where = blobs[meta_file]
    meta = restricted_pickle_load(meta_bytes, meta_where, variant)
    if not isinstance(meta, dict):
        raise LtddError(f"{meta_where} does not hold a dict; is it the CIFAR meta file?")
    class_names = [_as_str(v) for v in _get(meta, names_key, meta_where)]

    def part(files: list[str]) -> ImageSet:
        ims, labs = [], []
        for f in files:
            data, where = blobs[f]
            im, lab = _cifar_batch(restricted_pickle_load(data, where, variant), where, label_key)
            if lab.size and (lab.min() < 0 or lab.max() >= len(class_names)):
                raise LtddError(f"{where}: labels outside 0..{len(class_names) - 1}")
            ims.append(im)
            labs.append(lab)
        images = np.concatenate(ims) if len(ims) > 1 else ims[0]
        return ImageSet(_resize_all(images, image_size), np.concatenate(labs), class_names)

    return SourceData(variant, part(train_files), part(test_files))


def _find_cifar_dir(path: Path, variant: str) -> Path | None:
    folder, train_files, _, meta, _, _ = _cifar_spec(variant, "fine")
    for cand in (path / folder, path):
        if (cand / train_files[0]).is_file() or (cand / meta).is_file():
            return cand
    return None


def _looks_like_imagefolder_dir(path: Path) -> bool:
    if (path / "train").is_dir():
        return True
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return len(subdirs) == 1 and (subdirs[0] / "train").is_dir()


def _load_cifar(variant: str, root, label_kind: str, image_size: int | None, cache_dir) -> SourceData:
    folder, train_files, test_files, meta_file, _, _ = _cifar_spec(variant, label_kind)
    layout = (
        f"a folder holding {folder}/ ({', '.join(train_files + test_files)}, {meta_file}), that folder itself, "
        f"or an ImageFolder tree/archive with train/ and test/"
    )
    path = _require_root(root, variant, layout)
    opts = {"label_kind": label_kind, "image_size": image_size}

    def no_coarse() -> None:
        if variant == "cifar100" and label_kind != "fine":
            raise LtddError(f"{path} is an ImageFolder tree, which has only one label kind; use label_kind=fine")

    if path.is_dir():
        batches = _find_cifar_dir(path, variant)
        if batches is None:
            if _looks_like_imagefolder_dir(path):
                no_coarse()
                return _load_imagefolder_path(path, variant, image_size, cache_dir)
            raise LtddError(f"{path} holds no CIFAR batches (expected {layout})")
        files = train_files + test_files + [meta_file]
        for f in files:
            if not (batches / f).is_file():
                raise LtddError(f"{variant}: missing {batches / f} (expected {layout})")
        fp = {"files": [_file_stat(batches / f) for f in files], **opts}

        def read_dir(names: list[str]) -> dict[str, tuple[bytes, str]]:
            return {n: ((batches / n).read_bytes(), str(batches / n)) for n in names}

        return _cached(variant, fp, cache_dir, lambda: _read_cifar_pickles(read_dir, variant, label_kind, image_size))

    if not _is_archive(path):
        raise LtddError(f"{path} is neither a folder nor a .tar/.tar.gz/.tgz/.zip archive (expected {layout})")

    def build() -> SourceData:
        with _Tree(path) as tree:
            names = [n for n in tree.names() if not _hidden(n)]
            # the official archive (cifar-10-python.tar.gz) holds cifar-10-batches-py/<files>
            base = None
            for n in names:
                parts = n.split("/")
                if parts[-1] == train_files[0] and (len(parts) == 1 or parts[-2] == folder):
                    base = "/".join(parts[:-1])
                    base = base + "/" if base else ""
                    break
            if base is None:
                no_coarse()
                return _read_imagefolder(tree, variant, image_size)

            def read_archive(wanted: list[str]) -> dict[str, tuple[bytes, str]]:
                full = {base + w: w for w in wanted}
                got = {full[n]: (b, tree.where(n)) for n, b in tree.read_many(full)}
                for w in wanted:
                    if w not in got:
                        raise LtddError(f"{variant}: {path} has no {base + w} (expected {layout})")
                return got

            return _read_cifar_pickles(read_archive, variant, label_kind, image_size)

    return _cached(variant, {**_file_stat(path), **opts}, cache_dir, build)


@register_source("cifar10")
def _load_cifar10(root, *, label_kind="fine", image_size=None, test_per_class=50, seed=0, cache_dir=None):
    return _load_cifar("cifar10", root, "fine", image_size, cache_dir)


@register_source("cifar100")
def _load_cifar100(root, *, label_kind="fine", image_size=None, test_per_class=50, seed=0, cache_dir=None):
    return _load_cifar("cifar100", root, label_kind, image_size, cache_dir)

