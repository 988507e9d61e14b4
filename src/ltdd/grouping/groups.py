"""Class groups as data: check a grouping, map classes to group labels, summarise groups and a model's errors."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import LtddError

__all__ = ["check_groups", "groups_to_labels", "group_summary", "error_structure"]


def check_groups(groups, num_classes: int) -> list[list[int]]:
    """Validate that ``groups`` covers every class ``0..num_classes-1`` exactly once, no group empty; returns the
    groups as lists of ints (order kept)."""
    out = []
    seen: dict[int, int] = {}
    for gi, g in enumerate(groups):
        g = [int(c) for c in g]
        if not g:
            raise LtddError(f"group {gi + 1} is empty")
        for c in g:
            if c < 0 or c >= num_classes:
                raise LtddError(f"group {gi + 1} names class {c}, but there are only {num_classes} classes "
                                f"(0..{num_classes - 1})")
            if c in seen:
                where = "twice in group " + str(gi + 1) if seen[c] == gi else f"in groups {seen[c] + 1} and {gi + 1}"
                raise LtddError(f"class {c} appears {where}; every class must be in exactly one group")
            seen[c] = gi
        out.append(g)
    missing = [c for c in range(num_classes) if c not in seen]
    if missing:
        raise LtddError(f"classes {missing} are in no group; every class must be in exactly one group")
    if len(out) < 2:
        raise LtddError("need at least two groups")
    return out


def groups_to_labels(groups, num_classes: int) -> np.ndarray:
    """``(num_classes,)`` array of group indices."""
    groups = check_groups(groups, num_classes)
    lab = np.empty(num_classes, dtype=np.int64)
    for gi, g in enumerate(groups):
        lab[g] = gi
    return lab


def _canonical(groups) -> list[list[int]]:
    """Sorted members, groups ordered by their smallest class."""
    return sorted((sorted(int(c) for c in g) for g in groups if len(g)), key=lambda g: g[0])


def error_structure(y_true, y_pred, groups, num_classes: int) -> dict:
    """Do a model's mistakes stay inside the groups? Fraction of errors whose predicted class is in the true class's
    group, against the chance level ``mean over errors of (|g(y)| - 1) / (N - 1)`` (errors spread uniformly)."""
    lab = groups_to_labels(groups, num_classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    err = y_true != y_pred
    if not err.any():
        return {"errors": 0, "within_group_error_fraction": None, "chance": None}
    sizes = np.bincount(lab, minlength=lab.max() + 1)
    within = float((lab[y_true[err]] == lab[y_pred[err]]).mean())
    chance = float(((sizes[lab[y_true[err]]] - 1) / max(1, num_classes - 1)).mean())
    return {"errors": int(err.sum()), "within_group_error_fraction": within, "chance": chance,
            "group_accuracy": float((lab[y_true] == lab[y_pred]).mean())}


def group_summary(groups, counts: Sequence[int], class_names: Sequence[str] | None = None) -> list[dict]:
    """Per group: classes, names, training images, share of the training set (the group prior pi_g) and the
    within-group imbalance (max/min count)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = max(1, int(counts.sum()))
    out = []
    for g in groups:
        cnt = counts[list(g)]
        out.append({"classes": [int(c) for c in g],
                    "names": [str(class_names[c]) for c in g] if class_names is not None else None,
                    "train_images": int(cnt.sum()), "prior": float(cnt.sum() / total),
                    "imbalance": (float(cnt.max() / cnt.min()) if cnt.min() > 0 else None)})
    return out
