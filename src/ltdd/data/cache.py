"""Cache of prepared data: the fitted :class:`~ltdd.data.transforms.Preprocessor` and the preprocessed tensors.

Fitting ZCA on CIFAR-LT (a 3072 x 3072 covariance, its eigendecomposition) and applying it to some 20,000 images
takes tens of seconds on a CPU; :func:`~ltdd.data.pipeline.prepare_data` does it once and stores the result as one
``prepared-<digest>.safetensors`` file in the data cache folder (``$LTDD_CACHE_DIR`` or ``~/.cache/ltdd``).

The key is a SHA-256 over

* the *content* of what the preprocessing sees: the selected (long-tailed) train images and labels, the test
  images and labels and the probe images and labels, so a changed source file, loader or split cannot hit a stale
  entry (hashing ~70 MB of uint8 pixels takes about 0.1 s);
* the split indices (and probe indices), the source name;
* the preprocessing configuration (normalise, ZCA, ZCA eps) and the cache format version.

The key's JSON is stored in the file's metadata and checked on reading, as are the tensor names, dtypes and shapes;
anything unexpected (a truncated file, a foreign file) is ignored with a warning and rebuilt. Files are written
atomically (temporary file in the same folder, fsync, rename) and read with safetensors only, never pickle.

The folder is kept under a size budget (``$LTDD_PREPARED_CACHE_GB``, default 4 GB) by deleting the least recently
used ``prepared-*`` files after each write; a hit refreshes a file's modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import atomic_write_file
from .transforms import Preprocessor

__all__ = ["prepared_key", "prepared_path", "read_prepared", "write_prepared", "prune_prepared", "worth_caching"]

FORMAT_VERSION = 1
PREFIX = "prepared-"
SUFFIX = ".safetensors"
DEFAULT_BUDGET_GB = 4.0
# cache only when fitting + applying costs more than this many multiply-adds (CIFAR ZCA: ~2e11; digits ZCA: ~1e8)
MIN_COST = 2e9


def _digest_arrays(h, *arrays: np.ndarray) -> None:
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))


def prepared_key(source_name: str, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                 test_labels: np.ndarray, split_indices: np.ndarray, pre: Preprocessor,
                 probe: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> dict:
    """The cache key as a JSON-able dict: content digests, split digest and preprocessing config."""
    h = hashlib.sha256()
    _digest_arrays(h, train_images, train_labels, test_images, test_labels)
    if probe is not None:
        _digest_arrays(h, probe[1], probe[2])
    s = hashlib.sha256()
    _digest_arrays(s, np.asarray(split_indices, dtype=np.int64))
    if probe is not None:
        _digest_arrays(s, np.asarray(probe[0], dtype=np.int64))
    return {
        "v": FORMAT_VERSION,
        "source": str(source_name),
        "content": h.hexdigest(),
        "split": s.hexdigest(),
        "preprocess": {"normalize": pre.normalize, "zca": pre.zca, "zca_eps": pre.zca_eps},
    }


def _key_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def prepared_path(folder: Path, key: dict) -> Path:
    digest = hashlib.sha256(_key_json(key).encode()).hexdigest()[:32]
    return Path(folder) / f"{PREFIX}{digest}{SUFFIX}"


def worth_caching(pre: Preprocessor, num_images: int, dim: int) -> bool:
    """Whether fitting + applying ``pre`` is slow enough to be worth a file (only ZCA is, in practice)."""
    if not pre.zca:
        return False
    return float(dim) ** 3 + float(num_images) * dim * dim >= MIN_COST


def read_prepared(path: Path, key: dict, shapes: dict[str, tuple[int, ...]]):
    """``(preprocessor, tensors)`` from a cache file, or ``None`` on a miss or an unusable file.

    ``shapes``: the expected shape of every tensor to return (``train_x``, ``test_x``, optionally ``probe_x``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != _key_json(key):
                raise ValueError("its key does not match (hash collision or foreign file)")
            names = set(f.keys())
            tensors = {}
            for name, shape in shapes.items():
                if name not in names:
                    raise ValueError(f"it has no '{name}' tensor")
                t = f.get_tensor(name)
                if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"'{name}' is {t.dtype} {tuple(t.shape)}, expected float32 {tuple(shape)}")
                tensors[name] = t
            state = {n.split(".", 1)[1]: f.get_tensor(n) for n in names if n.startswith("pre.")}
        pre = Preprocessor.from_state_dict(state)
        want = key["preprocess"]
        if (pre.normalize, pre.zca) != (want["normalize"], want["zca"]):
            raise ValueError("its preprocessing steps do not match")
        pre.zca_eps = float(want["zca_eps"])
    except FileNotFoundError:  # pruned by another process in between
        return None
    except Exception as e:  # noqa: BLE001 - a broken cache entry is rebuilt, never fatal
        warnings.warn(f"ignoring unusable prepared-data cache {path}: {str(e).splitlines()[0] if str(e) else e!r}",
                      stacklevel=3)
        return None
    try:
        os.utime(path)  # least-recently-used bookkeeping for prune_prepared
    except OSError:
        pass
    return pre, tensors


def write_prepared(path: Path, key: dict, pre: Preprocessor, tensors: dict[str, torch.Tensor]) -> bool:
    """Write atomically; on any OS error warn and carry on (the cache is an optimisation). Returns success."""
    from safetensors.torch import save_file

    path = Path(path)
    payload = {f"pre.{k}": v.detach().cpu().contiguous() for k, v in pre.state_dict().items()}
    payload.update({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    metadata = {"key": _key_json(key), "format": "ltdd-prepared"}
    try:  # save_file writes to the file directly (save() to bytes would hold a second copy of every tensor)
        atomic_write_file(path, lambda tmp: save_file(payload, str(tmp), metadata=metadata))
    except Exception as e:  # noqa: BLE001 - disk full, read-only folder, ...: the cache is only an optimisation
        warnings.warn(f"could not write prepared-data cache {path}: {e}", stacklevel=3)
        return False
    prune_prepared(path.parent, keep=path)
    return True


def _budget_bytes() -> float:
    raw = os.environ.get("LTDD_PREPARED_CACHE_GB")
    try:
        gb = float(raw) if raw else DEFAULT_BUDGET_GB
    except ValueError:
        gb = DEFAULT_BUDGET_GB
    return gb * 1e9


def prune_prepared(folder: Path, keep: Path | None = None, budget_bytes: float | None = None) -> list[Path]:
    """Delete the least recently used ``prepared-*`` files until the rest fit the budget; ``keep`` stays."""
    budget = _budget_bytes() if budget_bytes is None else budget_bytes
    entries = []
    for p in Path(folder).glob(f"{PREFIX}*{SUFFIX}"):
        try:
            st = p.stat()
        except OSError:
            continue
        entries.append((st.st_mtime_ns, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= budget:
            break
        if keep is not None and p == Path(keep):
            continue
        try:
            p.unlink()
            removed.append(p)
            total -= size
        except OSError:
            pass
    return removed
