"""The ``digits`` source: scikit-learn's 8x8 digits, upscaled, with a seeded balanced test split.

It ships with scikit-learn: no download, no files, no cache.
"""

from __future__ import annotations

import numpy as np

from ...errors import LtddError
from .base import ImageSet, SourceData, register_source
from .images import _resize


@register_source("digits")
def _load_digits(root=None, *, label_kind="fine", image_size=None, test_per_class=50, seed=0, cache_dir=None):
    from sklearn.datasets import load_digits

    size = 16 if image_size is None else int(image_size)
    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    small = np.clip(np.rint(raw * 255.0 / 16.0), 0, 255).astype(np.uint8)
    images = np.stack([_resize(im[..., None], size) for im in small])  # (N, size, size, 1)
    num_classes = 10
    test_per_class = int(test_per_class)
    if test_per_class < 0:
        raise LtddError(f"test_per_class must be >= 0, got {test_per_class}")
    test_idx = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if test_per_class >= idx.size:
            raise LtddError(
                f"digits: test_per_class={test_per_class} leaves no training images for class '{c}' "
                f"(it has {idx.size} images)"
            )
        rng = np.random.RandomState(int(seed) + c)
        test_idx.append(idx[rng.permutation(idx.size)[:test_per_class]])
    test_idx_arr = np.sort(np.concatenate(test_idx)).astype(np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[test_idx_arr] = False
    train_idx = np.flatnonzero(mask)
    names = [str(c) for c in range(num_classes)]
    return SourceData(
        "digits",
        ImageSet(np.ascontiguousarray(images[train_idx]), labels[train_idx], names),
        ImageSet(np.ascontiguousarray(images[test_idx_arr]), labels[test_idx_arr], names),
    )
