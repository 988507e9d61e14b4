"""The evaluation protocol and its metrics.

``Metrics`` holds everything a long-tailed results table needs: overall top-1, per-class accuracy (recall), the
population std of the per-class accuracies (the two-stage paper's "inter-class bias"), the worst class,
head/medium/tail and many/medium/few means, and the confusion matrix. ``run_protocol`` trains fresh networks on a
(distilled) set with the pinned protocol and tests each on the balanced test set; ``summarise`` gives mean ± std.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import ProtocolConfig
from .errors import LtddError
from .train import predict, train_model

GROUP_KEYS = ("head", "medium", "tail", "many", "medium_shot", "few")


@dataclass
class Metrics:
    accuracy: float
    per_class: list[float]
    class_std: float
    worst_class: int
    worst_accuracy: float
    groups: dict[str, float | None]
    confusion: list[list[int]]
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_predictions(cls, y_true, y_pred, num_classes: int,
                         groups: dict[str, list[int]] | None = None) -> "Metrics":
        y_true = np.asarray(y_true, dtype=np.int64)
        y_pred = np.asarray(y_pred, dtype=np.int64)
        if y_true.shape != y_pred.shape:
            raise LtddError("predictions and labels differ in length")
        conf = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(conf, (y_true, y_pred), 1)
        support = conf.sum(1)
        per_class = np.where(support > 0, np.diag(conf) / np.maximum(support, 1), np.nan)
        valid = ~np.isnan(per_class)
        acc = float((y_true == y_pred).mean()) if len(y_true) else float("nan")
        pc_valid = per_class[valid]
        worst = int(np.flatnonzero(valid)[np.argmin(pc_valid)]) if valid.any() else -1
        group_acc: dict[str, float | None] = {}
        for key, members in (groups or {}).items():
            vals = [per_class[c] for c in members if valid[c]]
            group_acc[key] = float(np.mean(vals)) if vals else None
        return cls(accuracy=acc, per_class=[float(v) for v in per_class], class_std=float(np.std(pc_valid)),
                   worst_class=worst, worst_accuracy=float(pc_valid.min()) if valid.any() else float("nan"),
                   groups=group_acc, confusion=conf.tolist())

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "per_class": self.per_class, "class_std": self.class_std,
                "worst_class": self.worst_class, "worst_accuracy": self.worst_accuracy, "groups": self.groups,
                "confusion": self.confusion, **({"extra": self.extra} if self.extra else {})}


def _mean_std(values: list[float]) -> dict:
    arr = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                     dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(arr.mean()), "std": float(arr.std())}


def summarise(runs: list[Metrics]) -> dict:
    """Mean ± (population) std over runs of every scalar, and the mean per-class accuracy."""
    if not runs:
        raise LtddError("no runs to summarise")
    out = {"runs": len(runs), "accuracy": _mean_std([m.accuracy for m in runs]),
           "class_std": _mean_std([m.class_std for m in runs]),
           "worst_accuracy": _mean_std([m.worst_accuracy for m in runs]),
           "per_class": np.nanmean(np.asarray([m.per_class for m in runs], dtype=np.float64), axis=0).tolist(),
           "groups": {k: _mean_std([m.groups.get(k) for m in runs]) for k in runs[0].groups}}
    extra_keys = set().union(*(m.extra.keys() for m in runs))
    for k in sorted(extra_keys):
        vals = [m.extra.get(k) for m in runs]
        if all(isinstance(v, (int, float)) for v in vals):
            out[k] = _mean_std(vals)
    return out


def format_summary(summary: dict) -> str:
    a = summary["accuracy"]
    s = summary["class_std"]
    g = summary["groups"]
    parts = [f"acc {100 * a['mean']:.2f} ± {100 * a['std']:.2f}", f"class-std {100 * s['mean']:.2f}"]
    for key in ("head", "medium", "tail"):
        if key in g and g[key]["mean"] is not None:
            parts.append(f"{key} {100 * g[key]['mean']:.1f}")
    return ", ".join(parts) + f" ({summary['runs']} runs)"


def test_metrics(model, data, batch_size: int = 1024) -> Metrics:
    logits = predict(model, data.test_x, batch_size)
    return Metrics.from_predictions(data.test_y.numpy(), logits.argmax(1).numpy(), data.num_classes, data.groups)


@dataclass
class ProtocolResult:
    runs: list[Metrics]
    summary: dict
    lr: float
    seconds: float

    def to_dict(self) -> dict:
        return {"summary": self.summary, "lr": self.lr, "seconds": self.seconds,
                "runs": [m.to_dict() for m in self.runs]}


def run_protocol(images: torch.Tensor, labels: torch.Tensor, data, protocol: ProtocolConfig, *,
                 soft_labels: torch.Tensor | None = None, lr: float | None = None, device=None, seed: int = 0,
                 runs: int | None = None, progress: bool = False) -> ProtocolResult:
    """Train ``runs`` fresh networks on (images, soft_labels or labels) and test each on ``data``'s test set.

    ``lr``: the distilled set's learned step size, used when ``protocol.use_learned_lr``; else the protocol's lr.
    Soft labels are logits; the network is trained with soft cross-entropy on softmax(logits / T).
    """
    from .models import create_model

    if images.ndim != 4 or tuple(images.shape[1:]) != (data.channels, *data.im_size):
        raise LtddError(f"images have shape {tuple(images.shape)}, expected (N, {data.channels}, "
                        f"{data.im_size[0]}, {data.im_size[1]}) for dataset {data.name}")
    if len(labels) != len(images):
        raise LtddError(f"{len(images)} images but {len(labels)} labels")
    if soft_labels is not None and tuple(soft_labels.shape) != (len(images), data.num_classes):
        raise LtddError(f"soft labels have shape {tuple(soft_labels.shape)}, expected ({len(images)}, "
                        f"{data.num_classes})")
    from .train import resolve_device

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    use_lr = float(lr) if (lr is not None and protocol.use_learned_lr) else protocol.train.lr
    targets = soft_labels.float() if soft_labels is not None else labels.long()
    n_runs = protocol.runs if runs is None else runs
    from .distributed import gather_by_index, rank_world

    t0 = time.time()
    rank, world = rank_world()  # under torchrun the runs are spread over the ranks
    local = {}
    for r in range(rank, n_runs, world):
        torch.manual_seed(seed * 1000 + r)
        model = create_model(protocol.model.name, data.num_classes, data.channels, data.im_size,
                             **protocol.model.args).to(device)
        train_model(model, images, targets, protocol.train, num_classes=data.num_classes, lr=use_lr,
                    seed=seed * 1000 + r, progress=progress, desc=f"eval run {r + 1}/{n_runs}")
        local[r] = test_metrics(model, data, protocol.test_batch_size)
    results = gather_by_index(local, n_runs)
    return ProtocolResult(results, summarise(results), use_lr, time.time() - t0)
