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

from .config import ProtocolConfig, RelabelProtocolConfig
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
                 runs: int | None = None, progress: bool = False, teacher=None) -> ProtocolResult:
    """Train ``runs`` fresh networks on (images, soft_labels or labels) and test each on ``data``'s test set.

    ``lr``: the distilled set's learned step size, used when ``protocol.use_learned_lr``; else the protocol's lr.
    Soft labels are logits; the network is trained with soft cross-entropy on softmax(logits / T). A relabel
    protocol (:class:`~ltdd.config.RelabelProtocolConfig`) trains with :func:`ltdd.labels.train_relabel` instead;
    ``teacher`` (a :class:`ltdd.labels.Teacher`) then relabels every training batch.
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != (data.channels, *data.im_size):
        raise LtddError(f"images have shape {tuple(images.shape)}, expected (N, {data.channels}, "
                        f"{data.im_size[0]}, {data.im_size[1]}) for dataset {data.name}")
    if len(labels) != len(images):
        raise LtddError(f"{len(images)} images but {len(labels)} labels")
    if soft_labels is not None and tuple(soft_labels.shape) != (len(images), data.num_classes):
        raise LtddError(f"soft labels have shape {tuple(soft_labels.shape)}, expected ({len(images)}, "
                        f"{data.num_classes})")
    from .train import resolve_device

    relabel = isinstance(protocol, RelabelProtocolConfig)
    if teacher is not None and not relabel:
        raise LtddError("relabelling with a teacher needs a relabel protocol (relabel or relabel_cpu)")
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if teacher is not None:
        teacher.model.to(device)
    use_lr = float(lr) if (lr is not None and protocol.use_learned_lr) else protocol.train.lr
    targets = soft_labels.float() if soft_labels is not None else labels.long()
    n_runs = protocol.runs if runs is None else runs
    from .distributed import gather_by_index, rank_world

    t0 = time.time()
    rank, world = rank_world()  # under torchrun the runs are spread over the ranks
    local = {}
    for r in range(rank, n_runs, world):
        model = _fresh_model(protocol, data, seed * 1000 + r, device)
        if relabel:
            from .labels import train_relabel

            model = train_relabel(model, images, labels, protocol, num_classes=data.num_classes,
                                  soft_logits=soft_labels, teacher=teacher, lr=use_lr, seed=seed * 1000 + r,
                                  progress=progress, desc=f"eval run {r + 1}/{n_runs}")
        else:
            train_model(model, images, targets, protocol.train, num_classes=data.num_classes, lr=use_lr,
                        seed=seed * 1000 + r, progress=progress, desc=f"eval run {r + 1}/{n_runs}")
        local[r] = test_metrics(model, data, protocol.test_batch_size)
    results = gather_by_index(local, n_runs)
    return ProtocolResult(results, summarise(results), use_lr, time.time() - t0)


def _fresh_model(protocol: ProtocolConfig, data, seed: int, device):
    from .models import create_model

    torch.manual_seed(seed)
    return create_model(protocol.model.name, data.num_classes, data.channels, data.im_size,
                        **protocol.model.args).to(device)


# ----------------------------------------------------------------------------------------------------------------
# a distilled set under a label mode, its fair baseline, the full-data references


def evaluate_set(syn, data, protocol: ProtocolConfig, label_mode: str | None = None, *, teacher=None,
                 calibrate: bool = False, protocol_name: str | None = None, device=None, seed: int = 0,
                 runs: int | None = None, progress: bool = False) -> dict:
    """Evaluate a :class:`~ltdd.synset.SyntheticSet` with ``protocol`` under a label mode (``hard`` | ``own`` |
    ``teacher``; None: ``own`` when the set has soft labels, else ``hard``).

    ``teacher`` (:class:`ltdd.labels.Teacher`, label mode ``teacher``, a relabel protocol) relabels every training
    batch; ``calibrate`` (label mode ``own``) shifts the set's soft labels with the long-tailed priors first
    (:mod:`ltdd.calibration`). Returns what ``eval.json`` holds: summary, per-run metrics, lr, seconds, the
    protocol and its name, the label mode, the teacher's identity and the calibration record.
    """
    from .config import to_dict
    from .labels import check_label_mode, resolve_label_mode

    mode = resolve_label_mode(label_mode, syn.soft_labels is not None)
    check_label_mode(mode, has_soft_labels=syn.soft_labels is not None, has_teacher=teacher is not None,
                     relabel_protocol=isinstance(protocol, RelabelProtocolConfig), calibrate=calibrate,
                     protocol_name=protocol_name)
    soft, calibration = None, None
    if mode == "own":
        soft = syn.soft_labels
        if calibrate:
            from .calibration import calibrate_logits, set_train_counts

            soft, calibration = calibrate_logits(syn.soft_labels.float(), syn.labels, set_train_counts(syn, data))
    res = run_protocol(syn.images, syn.labels, data, protocol, soft_labels=soft, lr=syn.lr, device=device,
                       seed=seed, runs=runs, progress=progress, teacher=teacher if mode == "teacher" else None)
    out = res.to_dict()
    out.update({"protocol": to_dict(protocol), "protocol_name": protocol_name, "label_mode": mode,
                "teacher": teacher.identity if mode == "teacher" else None, "calibration": calibration,
                "images": int(len(syn.images))})
    return out


def set_ipc(syn, num_classes: int) -> int:
    """Images per class of a set: its per-class count when every class has the same, else the IPC it records."""
    counts = torch.bincount(syn.labels.long(), minlength=num_classes)
    if len(counts) == num_classes and int(counts.min()) == int(counts.max()) and int(counts.max()) > 0:
        return int(counts[0])
    if isinstance(syn.meta.get("ipc"), int) and syn.meta["ipc"] > 0:
        return int(syn.meta["ipc"])
    raise LtddError(f"the set has unequal class counts ({counts.tolist()}) and records no IPC: a random subset "
                    "'of the same size' is not defined")


def draw_random_real(data, ipc: int, seed: int = 0):
    """IPC random real images per class from the long-tailed train set (a class with fewer than IPC images repeats
    them cyclically), drawn by :func:`ltdd.distill.init.init_images` (mode real) from a generator seeded with
    ``seed``: (images, labels, indices into the train set)."""
    from .distill.init import init_images

    g = torch.Generator()
    g.manual_seed(int(seed))
    return init_images(data, int(ipc), "real", generator=g, duplicate=True)


def random_subset(syn, data, seed: int = 0):
    """The fair baseline's images: a random real subset of ``syn``'s size (:func:`draw_random_real`)."""
    from .synset import SyntheticSet

    ipc = set_ipc(syn, data.num_classes)
    images, labels, sources = draw_random_real(data, ipc, seed)
    return SyntheticSet(images, labels, None, None, {"method": "random", "ipc": ipc, "draw_seed": int(seed),
                                                     "sources": sources})


def evaluate_baseline(syn, data, protocol: ProtocolConfig, label_mode: str | None = None, *, teacher=None,
                      calibrate: bool = False, own_labeller=None, protocol_name: str | None = None, device=None,
                      seed: int = 0, runs: int | None = None, progress: bool = False) -> dict:
    """The random real subset of the same size as ``syn``, evaluated under the same protocol and label mode.

    ``hard``: its hard labels; ``teacher``: the same teacher relabels it; ``own``: a random subset has no soft
    labels of its own, so it gets the ones the set's method would have initialised it with - ``own_labeller`` is
    ``(fn(images, labels) -> logits, description)`` (:func:`ltdd.labels.method_soft_labeller`), or ``(None,
    reason)``, in which case the result is ``{"status": "n/a", "reason": ...}``. With ``calibrate`` those soft labels
    are calibrated the same way as the set's.
    """
    from .labels import resolve_label_mode

    mode = resolve_label_mode(label_mode, syn.soft_labels is not None)
    rnd = random_subset(syn, data, seed)
    base = {"kind": "random real subset", "ipc": rnd.meta["ipc"], "draw_seed": int(seed), "label_mode": mode,
            "protocol_name": protocol_name}
    if mode == "own":
        fn, how = own_labeller if own_labeller is not None else (None, "no way to give it soft labels was given")
        if fn is None:
            return {**base, "status": "n/a", "reason": how}
        rnd.soft_labels = fn(rnd.images, rnd.labels).float()
        base["soft_labels_from"] = how
    res = evaluate_set(rnd, data, protocol, mode, teacher=teacher, calibrate=calibrate, protocol_name=protocol_name,
                       device=device, seed=seed, runs=runs, progress=progress)
    return {**res, **base, "status": "ok"}


def full_data_reference(data, protocol: ProtocolConfig, *, crt: bool = True, crt_epochs: int = 10,
                        protocol_name: str | None = None, device=None, seed: int = 0, runs: int | None = None,
                        progress: bool = False) -> dict:
    """The full-data references: ERM on the whole long-tailed train set with hard labels, trained by the protocol's
    loop at the protocol's lr; with ``crt`` also cRT (the same networks, their classifier re-trained class-balanced
    on the frozen backbone for ``crt_epochs``). Returns ``{"erm": result, "crt": result}``."""
    import dataclasses

    from .config import to_dict
    from .distributed import gather_by_index, rank_world
    from .lt_methods import crt_stage
    from .train import resolve_device

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    relabel = isinstance(protocol, RelabelProtocolConfig)
    n_runs = protocol.runs if runs is None else runs
    crt_cfg = dataclasses.replace(protocol.train, lr=0.01, momentum=0.9) if relabel else protocol.train
    t0 = time.time()
    rank, world = rank_world()
    local = {}
    for r in range(rank, n_runs, world):
        s = seed * 1000 + r
        model = _fresh_model(protocol, data, s, device)
        desc = f"full data run {r + 1}/{n_runs}"
        if relabel:
            from .labels import train_relabel

            model = train_relabel(model, data.train_x, data.train_y, protocol, num_classes=data.num_classes,
                                  seed=s, progress=progress, desc=desc)
        else:
            train_model(model, data.train_x, data.train_y, protocol.train, num_classes=data.num_classes, seed=s,
                        progress=progress, desc=desc)
        m_erm = test_metrics(model, data, protocol.test_batch_size)
        m_crt = None
        if crt:
            crt_stage(model, data, crt_cfg, crt_epochs=crt_epochs, seed=s, progress=progress)
            m_crt = test_metrics(model, data, protocol.test_batch_size)
        local[r] = (m_erm, m_crt)
    both = gather_by_index(local, n_runs)
    seconds = time.time() - t0
    out = {}
    for i, key in enumerate(("erm", "crt")):
        ms = [b[i] for b in both]
        if ms[0] is None:
            continue
        res = ProtocolResult(ms, summarise(ms), protocol.train.lr, seconds).to_dict()
        res.update({"method": key, "label_mode": "hard", "protocol": to_dict(protocol), "protocol_name": protocol_name,
                    "images": int(len(data.train_y))})
        if key == "crt":
            res["crt_epochs"] = crt_epochs
        out[key] = res
    return out
