"""What identifies prepared data for everything made from it (distilled sets, expert stores): one hashing function,
one fingerprint (dataset, split, preprocessing), one compatibility check."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..errors import LtddError


def digest(obj, length: int = 16) -> str:
    """sha256 (hex, first ``length`` characters) of an array's bytes, of bytes, or of a JSON-able object in canonical
    form (sorted keys): the one hashing function for splits, preprocessing and configurations."""
    if isinstance(obj, np.ndarray):
        blob = np.ascontiguousarray(obj).tobytes()
    elif isinstance(obj, (bytes, bytearray)):
        blob = bytes(obj)
    else:
        blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def split_sha(data) -> str:
    """The long-tailed split's identity: the hash of its (sorted) source indices."""
    return digest(np.asarray(data.split.indices, dtype=np.int64))


def fingerprint(data) -> dict:
    """Dataset, shape, class counts, split and preprocessing of prepared data. A distilled set lives in the model
    space of exactly this data (e.g. ZCA-whitened with the statistics of this split)."""
    return {"dataset": data.name, "num_classes": int(data.num_classes), "channels": int(data.channels),
            "im_size": [int(v) for v in data.im_size], "num_train": int(len(data.train_y)),
            "split_sha": split_sha(data), "train_counts": [int(c) for c in data.train_counts],
            "preprocessing": digest(data.preprocessor.config())}


_WHAT = {"dataset": "dataset", "num_classes": "number of classes", "channels": "channels", "im_size": "image size",
         "num_train": "number of train images", "split_sha": "long-tailed split", "train_counts": "class counts",
         "preprocessing": "preprocessing (normalisation / ZCA statistics)"}


def check_compatible(recorded: dict, data, what: str) -> None:
    """Raise a clear error when ``data`` is not the data ``what`` was made from (only the keys ``recorded`` has are
    compared, so older records are checked as far as they go)."""
    have = fingerprint(data)
    for key, label in _WHAT.items():
        if key in recorded and recorded[key] != have[key]:
            hint = (" (check --root, the imbalance factor, the split seed and --no-zca: they must be the ones it was "
                    "made with)")
            raise LtddError(f"{what} was made from different data: its {label} is {_short(recorded[key])}, the data "
                            f"given has {_short(have[key])}{hint}")


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."
