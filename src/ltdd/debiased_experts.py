"""RLDD's debiased experts: an observer and a teacher trained on the long-tailed set (beyond-lad.md §1.1).

``experts.kind: debiased`` makes ``ltdd experts`` / :func:`ltdd.experts.train_experts` train these two networks
instead of expert trajectories. Both minimise ``gamma_robust * L_robust + gamma_debias * L_debias``
(:mod:`ltdd.rldd_losses`) on two views of every batch: the batch is label-mixed once (CutMix / mixup, one lambda and
one partner permutation), then augmented twice independently (``experts.train.dsa_strategy``, per-sample DSA draws);
both views share the mixed target. ``L_debias`` is averaged over the two views; ``alpha = (epoch / epochs)^2`` is
fixed within an epoch (epoch 0: plain CE). The projection ``z`` (a linear map of ``embed``) and the prediction head
``p`` live beside the network and are not stored. With ``gamma_robust = 0`` only one view is made.

The observer (``experts.model``) must have batch norm: its statistics are the recovery target. The teacher
(``experts.debiased.teacher_model``, default the same architecture) relabels the synthetic set.

Store layout (one folder)::

    store.json              kind "debiased", the data fingerprint and the expert configuration it was trained with
    observer.safetensors    the observer's and the teacher's state_dicts (parameters and BN buffers) in the
    teacher.safetensors     project's teacher format (:func:`ltdd.labels.save_teacher`: model config, classes,
                            channels, image size, data fingerprint), so either can be passed to
                            ``ltdd eval --labels teacher --teacher``
    train_log.jsonl         one line per trained network: role, test accuracy, seconds

Each network is claimed with a lock file, so ranks (``i % world == rank``) or concurrent processes never write the
same file; a filled store is reused as it is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import DebiasedExpertConfig, ExpertConfig, ModelConfig, TrainConfig, atomic_write_text, read_jsonl, \
    to_dict
from .data.fingerprint import check_compatible, fingerprint
from .errors import LtddError
from .locks import try_lock, unlock
from .models import create_model
from .rldd_losses import (MIXES, SCHEDULES, WEIGHT_NORMS, alpha_schedule, debias_loss, mix_batch, reweighting,
                          robust_loss)

__all__ = ["ROLES", "ProjectionHeads", "DebiasedStore", "train_debiased_model", "train_debiased_experts",
           "has_batchnorm", "role_model"]

ROLES = ("observer", "teacher")
ROBUST_FORMS = ("spec", "simsiam")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def role_model(cfg: ExpertConfig, role: str) -> ModelConfig:
    if role == "observer":
        return cfg.model
    if role == "teacher":
        return cfg.debiased.teacher_model or cfg.model
    raise LtddError(f"unknown expert role '{role}' (known: {', '.join(ROLES)})")


def check_debiased_config(d: DebiasedExpertConfig) -> None:
    if d.schedule not in SCHEDULES:
        raise LtddError(f"unknown experts.debiased.schedule '{d.schedule}' (known: {', '.join(SCHEDULES)})")
    if d.weight_norm not in WEIGHT_NORMS:
        raise LtddError(f"unknown experts.debiased.weight_norm '{d.weight_norm}' (known: {', '.join(WEIGHT_NORMS)})")
    if d.mix not in MIXES:
        raise LtddError(f"unknown experts.debiased.mix '{d.mix}' (known: {', '.join(MIXES)})")
    if d.robust_form not in ROBUST_FORMS:
        raise LtddError(f"unknown experts.debiased.robust_form '{d.robust_form}' (known: {', '.join(ROBUST_FORMS)})")
    if d.gamma_robust < 0 or d.gamma_debias < 0 or d.gamma_robust + d.gamma_debias == 0:
        raise LtddError("experts.debiased.gamma_robust and gamma_debias must be >= 0 and not both 0")
    if d.gamma_debias == 0:
        raise LtddError("experts.debiased.gamma_debias must be > 0: without it the classifier head is never trained")
    if d.proj_dim < 1 or d.pred_hidden < 1:
        raise LtddError("experts.debiased.proj_dim and pred_hidden must be >= 1")


# ---- training --------------------------------------------------------------------------------------------------


class ProjectionHeads(nn.Module):
    """z = projector(embed) (linear), p = predictor(z) (Linear -> ReLU -> Linear); used only while training."""

    def __init__(self, feat_dim: int, proj_dim: int, pred_hidden: int):
        super().__init__()
        self.projector = nn.Linear(feat_dim, proj_dim)
        self.predictor = nn.Sequential(nn.Linear(proj_dim, pred_hidden), nn.ReLU(), nn.Linear(pred_hidden, proj_dim))

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projector(feat)
        return z, self.predictor(z)


def debiased_objective(model: nn.Module, heads: ProjectionHeads, v1: torch.Tensor, v2: torch.Tensor | None,
                       target: torch.Tensor, weights: torch.Tensor, alpha: float,
                       d: DebiasedExpertConfig) -> tuple[torch.Tensor, dict]:
    """gamma_robust * L_robust(v1, v2) + gamma_debias * mean_i L_debias(view i); returns (loss, parts)."""
    if v2 is None:
        feats = [model.embed(v1)]
    else:
        f = model.embed(torch.cat([v1, v2]))  # one forward: batch norm sees both views together
        feats = list(f.split(len(v1)))
    l_debias = sum(debias_loss(model.classifier(fi), target, weights, alpha) for fi in feats) / len(feats)
    loss = d.gamma_debias * l_debias
    parts = {"debias": float(l_debias.detach())}
    if v2 is not None and d.gamma_robust > 0:
        (z1, p1), (z2, p2) = heads(feats[0]), heads(feats[1])
        l_rob = robust_loss(z1, z2, p1, p2) if d.robust_form == "spec" else robust_loss(p1, p2, z1, z2)
        loss = loss + d.gamma_robust * l_rob
        parts["robust"] = float(l_rob.detach())
    return loss, parts


def train_debiased_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, class_counts,
                         train: TrainConfig, d: DebiasedExpertConfig, *, seed: int = 0, progress: bool = False,
                         desc: str = "debiased expert", on_epoch_end=None) -> nn.Module:
    """Train ``model`` in place with the debiased objective (SGD, ``train``'s lr schedule, momentum, weight decay,
    batch size, DSA strategy, gradient clipping); returns it. ``on_epoch_end(epoch, model, parts)`` after each
    epoch (``parts``: the epoch's mean loss terms and alpha)."""
    from .train import lr_at, make_augment

    check_debiased_config(d)
    if len(x) == 0:
        raise LtddError("cannot train an expert on an empty set")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    weights = reweighting(class_counts, d.q, d.weight_norm).to(device=device, dtype=torch.float32)
    torch.manual_seed(seed)
    heads = ProjectionHeads(model.feat_dim, d.proj_dim, d.pred_hidden).to(device)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    augment = make_augment(train)
    gen = torch.Generator()
    gen.manual_seed(seed)
    rng = np.random.default_rng(seed)
    two_views = d.gamma_robust > 0
    model.train()
    heads.train()
    for epoch in tqdm(range(train.epochs), desc=desc, disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = lr_at(train, epoch, train.lr)
        alpha = alpha_schedule(epoch, train.epochs, d.schedule)
        order = torch.from_numpy(rng.permutation(len(x))).to(device)
        sums: dict[str, float] = {}
        batches = 0
        for start in range(0, len(order), train.batch_size):
            idx = order[start:start + train.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            xb, target = mix_batch(x[idx], y[idx], num_classes, d.mix, d.mix_alpha, gen)
            v1 = augment(xb, generator=gen) if augment is not None else xb
            v2 = (augment(xb, generator=gen) if augment is not None else xb) if two_views else None
            loss, parts = debiased_objective(model, heads, v1, v2, target, weights, alpha, d)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            opt.step()
            if not torch.isfinite(loss):
                raise LtddError(f"debiased expert training diverged (loss {loss.item()}) at epoch {epoch}; lower "
                                f"experts.train.lr")
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
        if on_epoch_end is not None:
            on_epoch_end(epoch, model, {**{k: v / max(1, batches) for k, v in sums.items()}, "alpha": alpha})
    model.eval()
    return model


# ---- the store -------------------------------------------------------------------------------------------------


def expert_material(cfg: ExpertConfig) -> dict:
    """What a debiased store's networks depend on (the fields ``kind: debiased`` reads)."""
    return {"model": to_dict(cfg.model), "teacher_model": to_dict(role_model(cfg, "teacher")),
            "train": to_dict(cfg.train), "debiased": to_dict(cfg.debiased), "seed": cfg.seed}


def _with_defaults(stored):
    """A store's recorded configuration with the debiased fields added since it was written at their defaults
    (which keep the old behaviour), so that an older store still matches the configuration it was trained with."""
    if not isinstance(stored, dict) or not isinstance(stored.get("debiased"), dict):
        return stored
    return {**stored, "debiased": {**to_dict(DebiasedExpertConfig()), **stored["debiased"]}}


class DebiasedStore:
    """A folder holding one observer and one teacher for one (expert configuration, data split)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def meta_path(self) -> Path:
        return self.root / "store.json"

    @property
    def log_path(self) -> Path:
        return self.root / "train_log.jsonl"

    def path(self, role: str) -> Path:
        if role not in ROLES:
            raise LtddError(f"unknown expert role '{role}' (known: {', '.join(ROLES)})")
        return self.root / f"{role}.safetensors"

    def meta(self) -> dict:
        if not self.meta_path.is_file():
            raise LtddError(f"{self.root} is not an expert store (no store.json); train RLDD's experts with "
                            f"`ltdd experts` and a preset whose experts.kind is debiased")
        try:
            meta = json.loads(self.meta_path.read_text())
        except json.JSONDecodeError:
            raise LtddError(f"{self.meta_path} is corrupt (not JSON)") from None
        if meta.get("kind") != "debiased":
            raise LtddError(f"{self.root} holds expert trajectories, not RLDD's debiased observer and teacher; train "
                            f"them with `ltdd experts` and an rldd preset")
        return meta

    def check(self, data, cfg: ExpertConfig | None = None) -> dict:
        meta = self.meta()
        check_compatible(meta.get("data", {}), data, f"expert store {self.root}")
        if cfg is not None and _with_defaults(meta.get("config")) != json.loads(json.dumps(expert_material(cfg))):
            raise LtddError(f"expert store {self.root} was trained with another expert configuration; use another "
                            f"folder")
        return meta

    def initialise(self, cfg: ExpertConfig, data) -> None:
        if not self.meta_path.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            lock = self.root / ".store.lock"
            if try_lock(lock):
                try:
                    if not self.meta_path.is_file():
                        meta = {"format": 1, "kind": "debiased", "data": fingerprint(data),
                                "config": expert_material(cfg)}
                        atomic_write_text(self.meta_path, json.dumps(meta, indent=2))
                finally:
                    unlock(lock)
            else:
                deadline = time.time() + 300
                while not self.meta_path.is_file() and time.time() < deadline:
                    time.sleep(0.1)
        self.check(data, cfg)

    def available(self) -> dict[str, int]:
        return {r: int(self.path(r).is_file()) for r in ROLES}

    def load(self, role: str, data, device=None) -> tuple[nn.Module, ModelConfig]:
        """The trained network of ``role`` (frozen, eval mode) after checking it belongs to ``data``."""
        from .labels import load_teacher

        self.check(data)
        p = self.path(role)
        if not p.is_file():
            raise LtddError(f"expert store {self.root} has no {role}; train it with `ltdd experts`")
        t = load_teacher(p, data, device)
        return t.model, t.model_cfg

    def append_log(self, record: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        return read_jsonl(self.log_path)


def train_debiased_experts(cfg: ExpertConfig, data, store_dir: str | Path, *, device=None, rank: int = 0,
                           world: int = 1, progress: bool = True, log=None) -> dict:
    """Train the observer and the teacher that the store does not hold yet (rank r takes role i when
    i % world == r). Returns counts and seconds like :func:`ltdd.experts.train_experts`."""
    from .evaluate import test_metrics
    from .experts import check_expert_config
    from .labels import save_teacher

    check_expert_config(cfg)
    check_debiased_config(cfg.debiased)
    device = device or torch.device("cpu")
    store = DebiasedStore(store_dir)
    observer_cfg = role_model(cfg, "observer")
    probe = create_model(observer_cfg.name, data.num_classes, data.channels, data.im_size, **observer_cfg.args)
    if not has_batchnorm(probe):
        raise LtddError(f"the observer ({observer_cfg.name} {observer_cfg.args}) has no batch norm; its BN statistics "
                        f"are RLDD's recovery target: use e.g. resnet32 or convnet with norm: batchnorm")
    store.initialise(cfg, data)
    done = {r: 0 for r in ROLES}
    t0 = time.time()
    for i, role in enumerate(ROLES):
        if i % world != rank or store.path(role).exists():
            continue
        lock = store.path(role).with_suffix(".lock")
        if not try_lock(lock):
            continue
        t_job = time.time()
        try:
            if store.path(role).exists():
                continue
            mcfg = role_model(cfg, role)
            seed = cfg.seed * 100003 + i
            torch.manual_seed(seed)
            model = create_model(mcfg.name, data.num_classes, data.channels, data.im_size, **mcfg.args).to(device)
            train_debiased_model(model, data.train_x, data.train_y, data.num_classes, data.train_counts, cfg.train,
                                 cfg.debiased, seed=seed, progress=progress, desc=role)
            save_teacher(store.path(role), model, mcfg, data, description=f"RLDD {role} (debiased expert)")
        finally:
            unlock(lock)
        done[role] += 1
        rec = {"expert": role, "kind": "debiased", "test_acc": round(test_metrics(model, data).accuracy, 4),
               "seconds": round(time.time() - t_job, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        store.append_log(rec)
        if log:
            log(rec)
    return {"trained": done, "seconds": time.time() - t0, "available": store.available()}
