"""The ImageSet / SourceData containers and the name -> loader registry that :func:`load_source` dispatches on.

Every loader returns a :class:`SourceData` holding uint8 NHWC arrays for a train pool and a (balanced) test set.
Long-tailed subsampling happens later (:mod:`ltdd.data.longtail`); a source is always the full data. Loaders are
registered by name with :func:`register_source`. Also here: the two checks every loader shares (a root that exists,
an exception as one line of an error message).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import LtddError

__all__ = ["ImageSet", "SourceData", "Loader", "register_source", "list_sources", "load_source"]


# ----------------------------------------------------------------------------------------------------------------
# containers


@dataclass
class ImageSet:
    """Images as uint8 ``(N, H, W, C)`` with ``C`` 1 or 3, integer labels ``(N,)`` and the class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.class_names = [str(c) for c in self.class_names]
        if self.images.dtype != np.uint8:
            raise ValueError(f"ImageSet.images must be uint8, got {self.images.dtype}")
        if self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise ValueError(f"ImageSet.images must be (N, H, W, C) with C in (1, 3), got {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"ImageSet.labels must have shape ({self.images.shape[0]},), got {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self) -> list[int]:
        """Images per class, indexed by label."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(int).tolist()


@dataclass
class SourceData:
    """A named dataset: the full train pool and the test set (same classes, same image size)."""

    name: str
    train: ImageSet
    test: ImageSet

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


# ----------------------------------------------------------------------------------------------------------------
# registry

Loader = Callable[..., SourceData]
_REGISTRY: dict[str, Loader] = {}


def register_source(name: str) -> Callable[[Loader], Loader]:
    """Decorator adding a loader ``fn(root, *, label_kind, image_size, test_per_class, seed, cache_dir)``."""

    def deco(fn: Loader) -> Loader:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_sources() -> list[str]:
    return sorted(_REGISTRY)


def load_source(
    name: str,
    root: str | Path | None = None,
    *,
    label_kind: str = "fine",
    image_size: int | None = None,
    test_per_class: int = 50,
    seed: int = 0,
    cache_dir: str | Path | None | bool = None,
) -> SourceData:
    """Load the full train pool and test set of source ``name``.

    ``cache_dir``: folder for decoded ``.npz`` caches; ``None`` means ``$LTDD_CACHE_DIR`` or ``~/.cache/ltdd``;
    ``False`` disables caching.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise LtddError(f"unknown dataset '{name}' (known: {', '.join(list_sources())})")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
        raise LtddError(f"image_size must be a positive integer, got {image_size!r}")
    return _REGISTRY[key](
        root,
        label_kind=label_kind,
        image_size=None if image_size is None else int(image_size),
        test_per_class=test_per_class,
        seed=seed,
        cache_dir=cache_dir,
    )


# ----------------------------------------------------------------------------------------------------------------
# checks shared by the loaders


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _require_root(root: str | Path | None, loader: str, layout: str) -> Path:
    if root is None or str(root).strip() == "":
        raise LtddError(f"dataset '{loader}' needs a root: {layout}")
    path = Path(root).expanduser()
    if not path.exists():
        raise LtddError(f"data root {path} does not exist (expected {layout})")
    return path
