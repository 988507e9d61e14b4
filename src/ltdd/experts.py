"""Expert trajectories: representation experts, classifier experts, and the trajectory store.

Store layout (one folder)::

    store.json                      what the store is for: model, data fingerprint, parameter names, epochs
    representation/expert_00007.safetensors
    classifier/expert_00007.safetensors
    train_log.jsonl                 one line per trained expert: kind, index, test accuracy, training seconds

Each expert file holds ``trajectory`` (T x P, the flattened parameters at the stored epochs, fp32 or fp16),
``epochs`` (the epoch index of each row; 0 = initial weights) and ``final`` (the final parameters, fp32, always
kept because classifier experts and image initialisation start from it). Files are written atomically and only
once; a store can be filled over several runs and by several processes (each expert is claimed with an
exclusive lock file, so no two processes write the same file).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from .config import ExpertConfig, atomic_write_bytes, atomic_write_text, read_jsonl, to_dict
from .data.fingerprint import check_compatible, fingerprint
from .errors import LtddError
from .locks import lock_is_stale, try_lock, unlock
from .models import create_model
from .models.functional import ParamLayout, load_flat
from .train import train_model

KINDS = ("representation", "classifier")
EXPERT_KINDS = ("trajectory", "debiased")  # experts.kind: these trajectory stores | RLDD (ltdd.debiased_experts)
# the ExpertConfig fields each kind reads (the others must keep their defaults), and the train fields of debiased
_KIND_READS = {"trajectory": None, "debiased": {"kind", "model", "train", "seed", "debiased"}}
_DEBIASED_TRAIN_READS = {"epochs", "lr", "momentum", "weight_decay", "batch_size", "schedule", "dsa", "dsa_strategy",
                         "grad_clip"}


def check_expert_config(cfg: ExpertConfig, where: str = "experts") -> None:
    """The expert configuration holds only what its ``kind`` reads: a field of the other kind set to anything but
    its default is an error naming it (trajectory experts ignore ``debiased``; debiased experts read ``model``,
    ``train`` (no sampler, loss, SAM or trainable subset), ``debiased`` and ``seed``)."""
    import dataclasses

    from .config import TrainConfig
    from .distill.base import _first_difference

    if cfg.kind not in EXPERT_KINDS:
        raise LtddError(f"unknown {where}.kind '{cfg.kind}' (known: {', '.join(EXPERT_KINDS)})")
    default = ExpertConfig()
    reads = _KIND_READS[cfg.kind]
    for f in dataclasses.fields(ExpertConfig):
        if reads is None and f.name != "debiased" or reads is not None and f.name in reads:
            continue
        path = _first_difference(to_dict(getattr(default, f.name)), to_dict(getattr(cfg, f.name)), f"{where}.{f.name}")
        if path:
            raise LtddError(f"{path} is set, but {cfg.kind} experts do not read it; remove it")
    if cfg.kind == "debiased":
        d_train = to_dict(default.train)
        for f in dataclasses.fields(TrainConfig):
            if f.name not in _DEBIASED_TRAIN_READS and to_dict(getattr(cfg.train, f.name)) != d_train[f.name]:
                raise LtddError(f"{where}.train.{f.name} is set, but debiased experts do not read it; remove it")


def data_fingerprint(data) -> dict:
    """What an expert store must agree with: dataset, split indices, preprocessing (:func:`ltdd.data.fingerprint.
    fingerprint`)."""
    return fingerprint(data)


@dataclass
class Trajectory:
    params: torch.Tensor  # T x P (float32)
    epochs: list[int]
    final: torch.Tensor  # P

    def at(self, epoch: int) -> torch.Tensor:
        """Parameters after ``epoch`` epochs (0 = initial weights); -1 = final."""
        if epoch == -1:
            return self.final
        try:
            return self.params[self.epochs.index(epoch)]
        except ValueError:
            raise LtddError(f"epoch {epoch} is not stored in this trajectory (stored: {self.epochs[:5]}"
                            f"{'...' if len(self.epochs) > 5 else ''}); retrain experts with more --keep-epochs")\
                from None


class TrajectoryStore:
    """A folder of expert trajectories for one (model, data split)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- metadata ----------------------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / "store.json"

    def meta(self) -> dict:
        if not self.meta_path.is_file():
            raise LtddError(f"{self.root} is not an expert store (no store.json); train experts with `ltdd experts`")
        try:
            meta = json.loads(self.meta_path.read_text())
        except json.JSONDecodeError:
            raise LtddError(f"{self.meta_path} is corrupt (not JSON)") from None
        if meta.get("kind", "trajectory") != "trajectory":
            raise LtddError(f"{self.root} holds {meta.get('kind')} experts (RLDD's observer and teacher), not expert "
                            f"trajectories")
        return meta

    def initialise(self, cfg: ExpertConfig, data, layout: ParamLayout) -> None:
        """Create store.json, or check that an existing store matches this model and data."""
        meta = {"format": 1, "model": to_dict(cfg.model), "data": data_fingerprint(data),
                "param_names": layout.names, "param_shapes": [list(s) for s in layout.shapes],
                "num_params": layout.total, "backbone_params": int(layout.mask("backbone").sum()),
                "representation": {"epochs": cfg.train.epochs, "train": to_dict(cfg.train)},
                "classifier": {"epochs": cfg.classifier_train.epochs, "train": to_dict(cfg.classifier_train)},
                "fp16": cfg.fp16}
        if self.meta_path.is_file():
            self.check(cfg.model, data, layout)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / ".store.lock"
        if not try_lock(lock):  # another process is creating the store: wait for its store.json
            deadline = time.time() + 300
            while not self.meta_path.is_file():
                if lock_is_stale(lock) or time.time() > deadline:
                    unlock(lock)
                    return self.initialise(cfg, data, layout)
                time.sleep(0.1)
            self.check(cfg.model, data, layout)
            return
        try:
            if not self.meta_path.is_file():
                atomic_write_text(self.meta_path, json.dumps(meta, indent=2))
        finally:
            unlock(lock)
        self.check(cfg.model, data, layout)

    def check(self, model_cfg, data, layout: ParamLayout | None = None) -> dict:
        meta = self.meta()
        check_compatible(meta.get("data", {}), data, f"expert store {self.root}")
        if model_cfg is not None and meta.get("model") != to_dict(model_cfg):
            raise LtddError(f"expert store {self.root} holds model {meta.get('model')}, not {to_dict(model_cfg)}")
        if layout is not None and meta.get("param_names") != layout.names:
            raise LtddError(f"expert store {self.root} has different parameter names than the model")
        return meta

    # ---- experts -----------------------------------------------------------------------------------------------
    def path(self, kind: str, index: int) -> Path:
        return self.root / kind / f"expert_{index:05d}.safetensors"

    def indices(self, kind: str) -> list[int]:
        d = self.root / kind
        if not d.is_dir():
            return []
        return sorted(int(p.stem.split("_")[1]) for p in d.glob("expert_*.safetensors"))

    def save(self, kind: str, index: int, traj: Trajectory, fp16: bool = False) -> None:
        tensors = {"trajectory": traj.params.to(torch.float16 if fp16 else torch.float32).contiguous().clone(),
                   "epochs": torch.tensor(traj.epochs, dtype=torch.int64),
                   "final": traj.final.float().contiguous().clone()}
        atomic_write_bytes(self.path(kind, index), st_save(tensors, metadata={"kind": kind, "index": str(index)}))

    def load(self, kind: str, index: int) -> Trajectory:
        p = self.path(kind, index)
        try:
            t = st_load(p.read_bytes())
        except FileNotFoundError:
            raise LtddError(f"expert file missing: {p}") from None
        except Exception as e:  # noqa: BLE001
            raise LtddError(f"expert file {p} is corrupt ({str(e).splitlines()[0][:100]})") from None
        return Trajectory(t["trajectory"].float(), t["epochs"].tolist(), t["final"].float())

    @property
    def log_path(self) -> Path:
        return self.root / "train_log.jsonl"

    def append_log(self, record: dict) -> None:
        """Append one JSON line (an expert's test accuracy and training seconds) to ``train_log.jsonl``.

        One ``O_APPEND`` write per line, so concurrent fillers do not interleave their lines; a line left unfinished
        by a killed process is closed first, so it costs only itself."""
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            os.write(fd, line)
        finally:
            os.close(fd)

    def read_log(self) -> list[dict]:
        """The records of ``train_log.jsonl`` (a line cut by a kill is skipped)."""
        return read_jsonl(self.log_path)

    def claim(self, kind: str, index: int) -> bool:
        """Take an exclusive claim on an expert that is not trained yet (for concurrent fillers).

        The lock file names its owner (host:pid). A lock whose owner process is gone (a killed rank) is taken over,
        so a restart redoes exactly the missing experts.
        """
        if self.path(kind, index).exists():
            return False
        return try_lock(self.path(kind, index).with_suffix(".lock"))

    def release(self, kind: str, index: int) -> None:
        unlock(self.path(kind, index).with_suffix(".lock"))


# ----------------------------------------------------------------------------------------------------------------


def _record(layout: ParamLayout, keep: set[int] | None):
    rows: list[torch.Tensor] = []
    epochs: list[int] = []

    def snap(epoch_index: int, model) -> None:
        if keep is None or epoch_index in keep:
            rows.append(layout.flatten(model).detach().float().cpu().clone())
            epochs.append(epoch_index)

    return rows, epochs, snap


def train_representation_expert(cfg: ExpertConfig, data, index: int, device, progress: bool = False):
    torch.manual_seed(cfg.seed * 100003 + index)
    model = create_model(cfg.model.name, data.num_classes, data.channels, data.im_size, **cfg.model.args).to(device)
    layout = ParamLayout(model)
    keep = set(cfg.keep_epochs) if cfg.keep_epochs is not None else None
    rows, epochs, snap = _record(layout, keep)
    snap(0, model)
    train_model(model, data.train_x, data.train_y, cfg.train, num_classes=data.num_classes,
                class_counts=data.train_counts, seed=cfg.seed * 100003 + index, progress=progress,
                desc=f"expert {index}", on_epoch_end=lambda e, m: snap(e + 1, m))
    final = layout.flatten(model).detach().float().cpu().clone()
    return model, Trajectory(torch.stack(rows) if rows else final[None], epochs or [cfg.train.epochs], final)


def train_classifier_expert(cfg: ExpertConfig, data, index: int, start: torch.Tensor, device,
                            progress: bool = False):
    """cRT-style classifier expert: the representation expert's final weights, backbone frozen, classifier
    re-trained with the class-aware sampler (lad.md §3.2). Snapshot 0 equals the representation expert's final."""
    model = create_model(cfg.model.name, data.num_classes, data.channels, data.im_size, **cfg.model.args).to(device)
    layout = ParamLayout(model)
    load_flat(model, layout, start.to(device))
    keep = set(cfg.classifier_keep_epochs) if cfg.classifier_keep_epochs is not None else None
    rows, epochs, snap = _record(layout, keep)
    snap(0, model)
    train_model(model, data.train_x, data.train_y, cfg.classifier_train, num_classes=data.num_classes,
                class_counts=data.train_counts, seed=cfg.seed * 100003 + index + 7, progress=progress,
                desc=f"classifier expert {index}", on_epoch_end=lambda e, m: snap(e + 1, m))
    final = layout.flatten(model).detach().float().cpu().clone()
    return model, Trajectory(torch.stack(rows) if rows else final[None], epochs or [cfg.classifier_train.epochs], final)


def train_experts(cfg: ExpertConfig, data, store_dir: str | Path, *, device=None, rank: int = 0, world: int = 1,
                  progress: bool = True, log=None) -> dict:
    """Fill the store up to ``cfg.num_experts`` representation (and classifier) experts (``cfg.kind: debiased``:
    RLDD's observer and teacher instead, :func:`ltdd.debiased_experts.train_debiased_experts`).

    Already-trained experts are skipped; with ``world`` > 1 this process takes the indices ``i % world == rank``.
    Returns counts and seconds.
    """
    from .evaluate import test_metrics

    if cfg.kind == "debiased":  # RLDD's observer and teacher
        from .debiased_experts import train_debiased_experts

        return train_debiased_experts(cfg, data, store_dir, device=device, rank=rank, world=world,
                                      progress=progress, log=log)
    check_expert_config(cfg)
    device = device or torch.device("cpu")
    store = TrajectoryStore(store_dir)
    probe = create_model(cfg.model.name, data.num_classes, data.channels, data.im_size, **cfg.model.args)
    layout = ParamLayout(probe)
    store.initialise(cfg, data, layout)
    done = {"representation": 0, "classifier": 0}
    t0 = time.time()
    for index in tqdm(range(rank, cfg.num_experts, world), desc="experts", disable=not progress):
        rep_exists = store.path("representation", index).exists()
        cls_needed = cfg.classifier_experts and not store.path("classifier", index).exists()
        if rep_exists and not cls_needed:
            continue
        jobs = [] if rep_exists else [("representation",
                                        lambda i=index: train_representation_expert(cfg, data, i, device))]
        if cls_needed:
            jobs.append(("classifier", lambda i=index: train_classifier_expert(
                cfg, data, i, store.load("representation", i).final, device)))
        for kind, train in jobs:
            if not store.claim(kind, index):
                break
            t_job = time.time()
            try:
                model, traj = train()
                store.save(kind, index, traj, cfg.fp16)
            finally:
                store.release(kind, index)
            done[kind] += 1
            rec = {"expert": index, "kind": kind, "test_acc": round(test_metrics(model, data).accuracy, 4),
                   "seconds": round(time.time() - t_job, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            store.append_log(rec)
            if log:
                log(rec)
    return {"trained": done, "seconds": time.time() - t0,
            "available": {k: len(store.indices(k)) for k in KINDS}}
