"""Long-tailed subsampling of a balanced train pool (Cui et al. 2019 / LDAM-DRW CIFAR-LT protocol).

* ``exp`` profile: the class with frequency rank ``r`` keeps ``floor(n_max * IF ** (-r / (C - 1)))`` images.
* ``step`` profile (LDAM-DRW): the first ``C // 2`` ranks keep ``n_max``, the other ``C - C // 2`` keep
  ``floor(n_max / IF)`` (for odd ``C`` the minor half is the larger one, as in LDAM-DRW).

Which images a class keeps is deterministic: class ``c`` draws a permutation of its images (in dataset order) from
``np.random.RandomState(seed + c)`` and keeps a prefix of it. So for a fixed seed a smaller split of a class is a
subset of a larger one, and changing ``class_order`` changes how many images a class keeps, not which ones come first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import LtddError

__all__ = ["longtail_counts", "LongTailSplit", "make_longtail", "probe_split", "class_groups", "PROFILES"]

PROFILES = ("exp", "step")
# "many / medium / few" shot thresholds of classifier-balancing (utils.shot_acc): many > 100, few < 20
MANY_SHOT_MIN = 101
FEW_SHOT_MAX = 19


def _floor(x: float) -> int:
    """floor() that does not lose an exact integer to float rounding (e.g. 49.99999999999999 -> 50)."""
    return int(math.floor(x + 1e-9 * max(1.0, abs(x))))


def longtail_counts(n_max: int, num_classes: int, imbalance_factor: float, profile: str = "exp") -> list[int]:
    """Per-rank image counts; entry ``r`` is for the class of frequency rank ``r`` (rank 0 = head, gets n_max)."""
    if isinstance(n_max, bool) or int(n_max) != n_max or n_max < 1:
        raise LtddError(f"n_max (max_per_class) must be a positive integer, got {n_max!r}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise LtddError(f"num_classes must be a positive integer, got {num_classes!r}")
    if imbalance_factor is None or not math.isfinite(float(imbalance_factor)) or imbalance_factor < 1:
        raise LtddError(f"imbalance_factor must be a finite number >= 1, got {imbalance_factor!r}")
    n_max, num_classes, imbalance_factor = int(n_max), int(num_classes), float(imbalance_factor)
    if profile == "exp":
        if num_classes == 1:
            return [n_max]
        ratio = 1.0 / imbalance_factor  # the LDAM/LTDD "imb_factor" / "imbalance_rate"
        return [_floor(n_max * ratio ** (c / (num_classes - 1))) for c in range(num_classes)]
    if profile == "step":
        major = num_classes // 2
        if num_classes == 1:
            return [n_max]
        minor = _floor(n_max / imbalance_factor)
        return [n_max] * major + [minor] * (num_classes - major)
    raise LtddError(f"unknown long-tail profile '{profile}' (known: {', '.join(PROFILES)})")


@dataclass
class LongTailSplit:
    """Which train images form the long-tailed set, and how it was made."""

    indices: np.ndarray  # int64 indices into the source train set, sorted
    counts: list[int]  # per class (indexed by label)
    class_order: list[int]  # class_order[r] is the class with frequency rank r (rank 0 = head)
    imbalance_factor: float
    profile: str
    seed: int
    n_max: int

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64)
        self.counts = [int(c) for c in self.counts]
        self.class_order = [int(c) for c in self.class_order]

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    def to_dict(self) -> dict:
        return {
            "indices": self.indices.tolist(),
            "counts": list(self.counts),
            "class_order": list(self.class_order),
            "imbalance_factor": float(self.imbalance_factor),
            "profile": self.profile,
            "seed": int(self.seed),
            "n_max": int(self.n_max),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LongTailSplit":
        try:
            split = cls(
                indices=np.asarray(d["indices"], dtype=np.int64),
                counts=list(d["counts"]),
                class_order=list(d["class_order"]),
                imbalance_factor=float(d["imbalance_factor"]),
                profile=str(d["profile"]),
                seed=int(d["seed"]),
                n_max=int(d["n_max"]),
            )
        except KeyError as e:
            raise LtddError(f"long-tail split record lacks the key {e.args[0]!r}") from None
        if len(split.indices) != split.total:
            raise LtddError(
                f"long-tail split record has {len(split.indices)} indices but its counts sum to {split.total}"
            )
        return split


def _name(c: int, class_names: list[str] | None) -> str:
    return class_names[c] if class_names is not None and c < len(class_names) else str(c)


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise LtddError(f"labels must be one-dimensional, got shape {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise LtddError(f"labels must lie in 0..{num_classes - 1}, found {int(labels.min())}..{int(labels.max())}")
    return labels


def _check_order(class_order, num_classes: int) -> list[int]:
    if class_order is None:
        return list(range(num_classes))
    try:
        order = [int(c) for c in class_order]
    except (TypeError, ValueError):
        raise LtddError(f"class_order must be a list of class indices, got {class_order!r}") from None
    if sorted(order) != list(range(num_classes)):
        raise LtddError(
            f"class_order must be a permutation of 0..{num_classes - 1} (each class exactly once), got {order}"
        )
    return order


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise LtddError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def make_longtail(
    labels: np.ndarray,
    num_classes: int,
    imbalance_factor: float,
    *,
    max_per_class: int | None = None,
    profile: str = "exp",
    seed: int = 0,
    class_order: list[int] | None = None,
    class_names: list[str] | None = None,
) -> LongTailSplit:
    """Choose the long-tailed subset of a train pool with labels ``labels``.

    ``n_max`` is ``max_per_class`` or the largest class count available. The class of rank ``r``
    (``class_order[r]``, default: label order) keeps ``min(longtail_counts(...)[r], available)`` images.
    ``class_names`` only improves error messages.
    """
    labels = _check_labels(labels, num_classes)
    seed = _check_seed(seed)
    if imbalance_factor is None or not (float(imbalance_factor) >= 1):
        raise LtddError(f"imbalance_factor must be >= 1, got {imbalance_factor!r}")
    order = _check_order(class_order, num_classes)
    available = np.bincount(labels, minlength=num_classes)
    if max_per_class is not None:
        if isinstance(max_per_class, bool) or int(max_per_class) != max_per_class or max_per_class < 1:
            raise LtddError(f"max_per_class must be a positive integer, got {max_per_class!r}")
        n_max = int(max_per_class)
    else:
        n_max = int(available.max()) if available.size else 0
        if n_max < 1:
            raise LtddError("the train set has no images")
    targets = longtail_counts(n_max, num_classes, imbalance_factor, profile)

    counts = [0] * num_classes
    for rank, c in enumerate(order):
        counts[c] = int(min(targets[rank], available[c]))
        if counts[c] == 0:
            why = (
                "it has no images in the train set"
                if available[c] == 0
                else f"rank {rank} gets floor({n_max} * {float(imbalance_factor):g}^(-{rank}/{num_classes - 1})) = 0"
            )
            raise LtddError(
                f"class '{_name(c, class_names)}' would have no training images ({why}); "
                "lower imbalance_factor or raise max_per_class"
            )

    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        perm = np.random.RandomState(seed + c).permutation(idx.size)
        chosen.append(idx[perm[: counts[c]]])
    indices = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)
    return LongTailSplit(
        indices=indices,
        counts=counts,
        class_order=order,
        imbalance_factor=float(imbalance_factor),
        profile=profile,
        seed=seed,
        n_max=n_max,
    )


def probe_split(labels: np.ndarray, num_classes: int, exclude: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Balanced held-out indices (``per_class`` per class, fewer where fewer remain) from the train images
    that are not in ``exclude`` (the long-tailed split). Sorted int64; deterministic in ``seed``."""
    labels = _check_labels(labels, num_classes)
    seed = _check_seed(seed)
    if isinstance(per_class, bool) or int(per_class) != per_class or per_class < 0:
        raise LtddError(f"probe per_class must be a non-negative integer, got {per_class!r}")
    mask = np.ones(labels.size, dtype=bool)
    exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
    mask[exclude] = False
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero((labels == c) & mask)
        # a stream distinct from make_longtail's RandomState(seed + c)
        rng = np.random.RandomState([seed, c, 0x9E37])
        chosen.append(idx[rng.permutation(idx.size)[: int(per_class)]])
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def class_groups(counts: list[int], class_order: list[int] | None = None) -> dict[str, list[int]]:
    """Class groups, each a sorted list of class indices.

    * ``head`` / ``medium`` / ``tail``: thirds by frequency rank. ``head`` is the first ``round(C/3)`` ranks,
      ``tail`` the last ``round(C/3)``, ``medium`` the rest (C=10: 3/4/3, C=100: 33/34/33). The rank order is
      ``class_order`` when given, else classes sorted by decreasing count (ties: lower label first).
    * ``many`` / ``medium_shot`` / ``few``: more than 100, 20..100, fewer than 20 training images
      (classifier-balancing convention).
    """
    counts = [int(c) for c in counts]
    C = len(counts)
    if class_order is not None:
        order = _check_order(class_order, C)
    else:
        order = sorted(range(C), key=lambda c: (-counts[c], c))
    third = int(round(C / 3))
    head = order[:third]
    tail = order[C - third:] if third else []
    medium = order[third: C - third]
    return {
        "head": sorted(head),
        "medium": sorted(medium),
        "tail": sorted(tail),
        "many": [c for c in range(C) if counts[c] >= MANY_SHOT_MIN],
        "medium_shot": [c for c in range(C) if FEW_SHOT_MAX < counts[c] < MANY_SHOT_MIN],
        "few": [c for c in range(C) if counts[c] <= FEW_SHOT_MAX],
    }
