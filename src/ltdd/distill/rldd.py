"""RLDD (Cui et al., AAAI 2026; beyond-lad.md §1): uni-level long-tailed distillation, "squeeze - recover - relabel".

Experts: ``experts.kind: debiased`` trains an observer (needs batch norm) and a teacher into a store
(:mod:`ltdd.debiased_experts`); ``ltdd distill --experts DIR`` / the pipeline hands it to this method.

1. **Class-fair BN statistics** (:mod:`ltdd.distill.bn_stats`): one pass of the frozen observer over the long-tailed
   train set gives the exact per-class moments of every BN layer's input; the global target is their uniform average
   over classes (``bn_target: class_fair``) - or, for the ablation, the observer's own long-tailed running statistics
   (``bn_target: running``, which has no per-class statistics, so ``class_loss_weight`` must be 0).
2. **Initialisation** (:mod:`ltdd.distill.crop_init`): teacher-scored random crops of real images with multi-round
   selection (``init: crops``), or IPC random real images (``init: real``; classes with fewer images repeat them,
   ``distill.duplicate``).
3. **Recovery**: the images are split into class-balanced batches (``batch_syn`` images: ``batch_syn // C`` per
   class; the last batch may hold fewer) and every outer iteration takes one Adam step (betas 0.5 / 0.9, as SRe2L)
   on every batch, with lr ``distill.lr_img`` on a cosine schedule over ``distill.iterations`` (the iterations per
   batch; batches are independent, so this equals optimising them one after the other). A batch's loss, through the
   frozen observer in eval mode on a DSA view of the batch (``distill.dsa``)::

       ce_weight * CE(observer(S), y) + r_loss * (L_global + class_loss_weight * L_class)

   with L_global / L_class as in :mod:`ltdd.distill.bn_stats`. The spec's "r-loss 0.01" is read as SRe2L's
   ``r_bn``: the weight of the BN-statistics term next to a cross-entropy term of weight 1 (a weight only has a
   meaning relative to another term). After every step the images are projected onto valid pixels (``clip``).
4. **Relabel**: the soft labels are the teacher's logits on the final images (eval mode); hard labels are kept.
   The distilled set is a plain :class:`~ltdd.synset.SyntheticSet` (images, labels, soft-label logits, no step
   size); the teacher is written beside it as ``teacher.safetensors`` in the project's teacher format, so
   ``ltdd.labels.load_teacher(set_folder, data)`` / ``ltdd eval --labels teacher --teacher`` relabel with it.

``distill.options`` (defaults in brackets): ``init`` [crops | real], ``crops_per_image`` [5], ``crop_scale``
[[0.5, 1.0]], ``crop_ratio`` [[0.75, 1.333]], ``score_batch`` [512], ``bn_target`` [class_fair | running],
``bn_variance`` [class_mean | mixture], ``stats_batch`` [512], ``r_loss`` [0.01], ``class_loss_weight`` [1.0],
``ce_weight`` [1.0], ``batch_syn`` [100], ``clip`` [true]. An option that only one mode reads (crop options without
``init: crops``, ``bn_variance`` / ``stats_batch`` with ``bn_target: running``) set away from its default is an
error.
"""

from __future__ import annotations

import math
from pathlib import Path
import torch
import torch.nn.functional as F

from ..config import DistillConfig, to_dict
from ..debiased_experts import DebiasedStore, has_batchnorm
from ..errors import LtddError
from ..labels import TEACHER_FILENAME, save_teacher
from ..synset import SyntheticSet
from .base import LOOP_FIELDS, Distiller, DivergenceError, register_distiller
from .bn_stats import VARIANCES, bn_matching_loss, capture_bn_inputs, class_bn_moments, fair_targets, running_targets
from .crop_init import teacher_crop_init
from .init import init_images

__all__ = ["RLDD"]
BETAS = (0.5, 0.9)
# options read only in one mode: option -> (the option deciding it, the value under which it is read)
_ONLY_WITH = {"crops_per_image": ("init", "crops"), "crop_scale": ("init", "crops"), "crop_ratio": ("init", "crops"),
              "score_batch": ("init", "crops"), "bn_variance": ("bn_target", "class_fair"),
              "stats_batch": ("bn_target", "class_fair")}


@register_distiller("rldd")
class RLDD(Distiller):
    needs_experts = True
    expert_kind = "debiased"
    OPTIONS = {"init": "crops", "crops_per_image": 5, "crop_scale": [0.5, 1.0], "crop_ratio": [0.75, 4 / 3],
               "score_batch": 512, "bn_target": "class_fair", "bn_variance": "class_mean", "stats_batch": 512,
               "r_loss": 0.01, "class_loss_weight": 1.0, "ce_weight": 1.0, "batch_syn": 100, "clip": True}
    READS = LOOP_FIELDS | {"lr_img", "dsa", "dsa_strategy"}

    @classmethod
    def reads(cls, cfg: DistillConfig) -> set[str]:
        out = super().reads(cfg)
        if not cfg.dsa:
            out -= {"dsa_strategy"}
        return out

    @classmethod
    def check_options(cls, cfg: DistillConfig) -> dict:
        o = super().check_options(cfg)
        for key, allowed in (("init", ("crops", "real")), ("bn_target", ("class_fair", "running")),
                             ("bn_variance", VARIANCES)):
            if o[key] not in allowed:
                raise LtddError(f"unknown distill.options.{key} '{o[key]}' (known: {', '.join(allowed)})")
        for key, (mode, value) in _ONLY_WITH.items():
            if o[mode] != value and o[key] != cls.OPTIONS[key]:
                raise LtddError(f"distill.options.{key} is set, but rldd reads it only with {mode}: {value}; "
                                f"remove it")
        if o["bn_target"] == "running" and o["class_loss_weight"] != 0:
            raise LtddError("distill.options.bn_target: running has no per-class statistics for the class-wise "
                            "term; set class_loss_weight: 0")
        for key in ("r_loss", "class_loss_weight", "ce_weight"):
            if float(o[key]) < 0:
                raise LtddError(f"distill.options.{key} must be >= 0, got {o[key]}")
        for key in ("crops_per_image", "score_batch", "stats_batch", "batch_syn"):
            if int(o[key]) < 1:
                raise LtddError(f"distill.options.{key} must be >= 1, got {o[key]}")
        return o

    def __init__(self, cfg: DistillConfig, data, *, experts_dir=None, device=torch.device("cpu")):
        super().__init__(cfg, data, experts_dir=experts_dir, device=device)
        if cfg.ipc < 1:
            raise LtddError(f"ipc must be >= 1, got {cfg.ipc}")
        if experts_dir is None:
            raise LtddError("rldd needs its observer and teacher (--experts DIR, trained by `ltdd experts` with "
                            "experts.kind: debiased)")
        self.store = DebiasedStore(experts_dir)
        self.observer, _ = self.store.load("observer", data, device)
        self.teacher, self.teacher_cfg = self.store.load("teacher", data, device)
        if not has_batchnorm(self.observer):
            raise LtddError("the observer has no batch norm: RLDD's recovery target is its BN statistics")
        for net in (self.observer, self.teacher):
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
        self.dsa = None
        if cfg.dsa and cfg.dsa_strategy not in ("", "none"):
            from ..data.augment import DSA

            self.dsa = DSA(cfg.dsa_strategy)
        self.images = self.labels = None
        self.sources: list[int] = []
        self.opt = None
        self._targets = None
        self._soft = None  # cached teacher logits of the current images

    # ---- targets -------------------------------------------------------------------------------------------------
    def targets(self):
        """(global targets per BN layer, per-class moments or None), computed once per process."""
        if self._targets is None:
            if self.opts["bn_target"] == "class_fair":
                moments = class_bn_moments(self.observer, self.data.train_x, self.data.train_y, self.data.num_classes,
                                           int(self.opts["stats_batch"]), self.device)
                self._targets = (fair_targets(moments, self.opts["bn_variance"]), moments)
            else:
                self._targets = (running_targets(self.observer), None)
        return self._targets

    # ---- state ---------------------------------------------------------------------------------------------------
    def initialise(self) -> None:
        if self.opts["init"] == "crops":
            images, labels, sources = teacher_crop_init(
                self.data, self.cfg.ipc, self.teacher, self.generator,
                crops_per_image=int(self.opts["crops_per_image"]), scale=tuple(self.opts["crop_scale"]),
                ratio=tuple(self.opts["crop_ratio"]), batch_size=int(self.opts["score_batch"]), device=self.device)
        else:
            images, labels, sources = init_images(self.data, self.cfg.ipc, "real", generator=self.generator,
                                                  duplicate=self.cfg.duplicate)
        self._set_images(images, labels)
        self.sources = list(sources)

    def _set_images(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images.detach().to(self.device).float().clone().requires_grad_(True)
        self.labels = labels.to(self.device).long()
        self.opt = torch.optim.Adam([self.images], lr=self.cfg.lr_img, betas=BETAS)
        self._soft = None

    def batches(self) -> list[torch.Tensor]:
        """Class-balanced index batches: batch b holds the images j in [b k, (b + 1) k) of every class."""
        ipc, c = self.cfg.ipc, self.data.num_classes
        k = max(1, int(self.opts["batch_syn"]) // c)
        out = []
        for start in range(0, ipc, k):
            js = torch.arange(start, min(start + k, ipc))
            out.append((torch.arange(c)[:, None] * ipc + js[None, :]).flatten())
        return out

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The recovery loss of one batch of (augmented) synthetic images through the frozen observer."""
        glob_t, per_class = self.targets()
        with capture_bn_inputs(self.observer) as acts:
            logits = self.observer(x)
        ce = F.cross_entropy(logits, y)
        glob, cls = bn_matching_loss(acts, y, glob_t, per_class if self.opts["class_loss_weight"] else None)
        o = self.opts
        loss = float(o["ce_weight"]) * ce + float(o["r_loss"]) * (glob + float(o["class_loss_weight"]) * cls)
        return loss, {"ce": float(ce.detach()), "bn": float(glob.detach()), "bn_class": float(cls.detach())}

    def lr_at(self, iteration: int) -> float:
        return self.cfg.lr_img * 0.5 * (1 + math.cos(math.pi * iteration / max(1, self.cfg.iterations)))

    def step(self, iteration: int) -> dict:
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(iteration)
        self.opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        batches = self.batches()
        for idx in batches:
            idx = idx.to(self.device)
            x = self.images[idx]
            if self.dsa is not None:
                x = self.dsa(x, generator=self.generator)
            loss, parts = self.batch_loss(x, self.labels[idx])
            loss.backward()
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v / len(batches)
        self.opt.step()
        if self.opts["clip"]:
            self._clip()
        self._soft = None
        return {**totals, "lr": self.lr_at(iteration)}

    def _clip(self) -> None:
        prep = getattr(self.data, "preprocessor", None)
        if prep is None or not hasattr(prep, "to_model_space"):
            return
        with torch.no_grad():
            self.images.copy_(prep.to_model_space(prep.to_pixels(self.images.detach().cpu(), clamp=True))
                              .to(self.images.device))

    def check(self, iteration: int, losses: dict) -> None:
        for k, v in losses.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise DivergenceError(f"loss '{k}' became {v} at iteration {iteration}")
        if not torch.isfinite(self.images).all():
            raise DivergenceError(f"synthetic images contain NaN/Inf at iteration {iteration}")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images.detach().cpu(), "labels": self.labels.cpu(),
               "sources": torch.tensor(self.sources, dtype=torch.long)}
        st = self.opt.state.get(self.images, {})
        for k in ("step", "exp_avg", "exp_avg_sq"):
            if k in st:
                out[f"adam.{k}"] = torch.as_tensor(st[k]).detach().cpu().clone()
        return out

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self._set_images(t["images"], t["labels"])
        self.sources = t["sources"].tolist() if "sources" in t else []
        if "adam.exp_avg" in t:
            self.opt.state[self.images] = {"step": t["adam.step"].float().clone(),
                                           "exp_avg": t["adam.exp_avg"].to(self.device).clone(),
                                           "exp_avg_sq": t["adam.exp_avg_sq"].to(self.device).clone()}

    # ---- output --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def relabel(self) -> torch.Tensor:
        """The teacher's logits on the current images (eval mode)."""
        if self._soft is None:
            x = self.images.detach()
            self._soft = torch.cat([self.teacher(x[i:i + 512]).float().cpu() for i in range(0, len(x), 512)])
        return self._soft

    def synthetic_set(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu().clone(), self.labels.cpu().clone(), self.relabel().clone(), None)

    def write_artifacts(self, folder) -> None:
        save_teacher(Path(folder) / TEACHER_FILENAME, self.teacher, self.teacher_cfg, self.data,
                     description="RLDD teacher: the soft labels of this set are its logits")

    def set_meta(self) -> dict:
        return {"teacher": TEACHER_FILENAME, "teacher_model": to_dict(self.teacher_cfg),
                "soft_labels": "teacher logits (RLDD relabel)"}
