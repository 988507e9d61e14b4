"""The trajectory-matching engine. MTT, DATM and LAD are configurations of it (lists of phases).

One iteration (lad.md §4.4): for every phase, draw the next expert of the phase's store and a start epoch t, start
a student at theta*_t and take N SGD steps on (augmented) synthetic minibatches with the learnable step size alpha,
then compare the student with theta*_{t+M} on the phase's matched coordinates:

    L_phase = || m * (theta_N - theta*_{t+M}) ||^2 / || m * (theta*_t - theta*_{t+M}) ||^2

The phases' gradients (w.r.t. images, soft-label logits and alpha) are summed with weights lambda_phase, then one
SGD step is taken for each of the three.

Gradient modes
--------------
``exact``: back-propagation through the unrolled inner loop (MTT). Memory grows linearly with N.

``constant_memory`` (TESLA, lad.md §4.6): a first pass runs the N steps without a graph and keeps only the sum
G = sum_j g_j plus each step's minibatch indices and augmentation parameters. Since theta_N = theta_0 - alpha G,
dL/dg_j = -2 alpha m*r / D with r = (theta_0 - theta_T) - alpha G, the same vector for every step. A second pass
walks the trajectory again (recomputing theta_j from theta_0 with the detached gradients, so nothing per-step is
stored), rebuilds each step's gradient g_j with a graph and back-propagates <dL/dg_j, g_j> into that step's images
and labels. Memory is one step's graph, independent of N.

What the constant-memory mode drops (and the tests measure): the dependence of theta_j (j > 0) on the synthetic data
of earlier steps, i.e. the terms (d g_j / d theta_j)(d theta_j / d X) - the Hessian-vector products through the
trajectory - and, for alpha, the dependence of theta_j on alpha for j > 0 (dL/dalpha = -2 <m*r, G> / D with G
detached). For N = 1 both modes are identical; for N > 1 the image gradient is an approximation.

Speed (``benchmarks/step_cost.py``)
-----------------------------------
Both modes differentiate the network's backward pass. The engine therefore swaps its own model's layers for
variants with hand-written second derivatives (:func:`ltdd.models.double_backward.use_double_backward_kernels`;
same parameters and outputs; option ``double_backward_kernels``, default on), and skips the mask multiplies when a
mask selects every coordinate. On CPU the process-wide malloc tuning of :mod:`ltdd.runtime` matters a lot (every
``ltdd`` command applies it; library users call :func:`ltdd.runtime.tune_cpu_malloc`).
"""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict

import torch

from ..config import DistillConfig, PhaseConfig
from ..distributed import all_reduce_sum_, rank_world
from ..errors import LtddError
from ..experts import Trajectory, TrajectoryStore
from ..losses import classification_loss, dam_weights, soft_cross_entropy
from ..models import create_model
from ..models.double_backward import use_double_backward_kernels
from ..models.functional import ParamLayout, functional_forward
from ..synset import SyntheticSet
from .base import LOOP_FIELDS, Distiller, load_optimiser_tensors, optimiser_tensors, register_distiller
from .init import init_images, init_soft_labels


@register_distiller("tm")
class TrajectoryMatching(Distiller):
    needs_experts = True
    OPTIONS = {"double_backward_kernels": True, "expert_cache": 32}
    READS = LOOP_FIELDS | {"phases", "gradient", "lr_img", "lr_lr", "lr_y", "momentum_img", "momentum_lr",
                           "momentum_y", "lr_init", "lr_min", "lr_explode_factor", "soft_labels", "label_init",
                           "label_store", "onehot_scale", "image_init", "dsa", "dsa_strategy", "temperature",
                           "dam_epsilon", "dam_normalise"}

    @classmethod
    def reads(cls, cfg: DistillConfig) -> set[str]:
        out = super().reads(cfg)
        if not cfg.soft_labels:  # fixed hard labels: no label optimiser, no label initialisation
            out -= {"lr_y", "momentum_y", "label_init", "onehot_scale", "temperature"}
        elif cfg.label_init != "onehot":
            out -= {"onehot_scale"}
        if not (cfg.image_init == "correct" or (cfg.soft_labels and cfg.label_init != "onehot")):
            out -= {"label_store"}
        if not any(ph.inner_loss == "dam" for ph in cfg.phases):
            out -= {"dam_epsilon", "dam_normalise"}
        if not cfg.dsa:
            out -= {"dsa_strategy"}
        return out

    def __init__(self, cfg: DistillConfig, data, *, experts_dir=None, device=torch.device("cpu")):
        super().__init__(cfg, data, experts_dir=experts_dir, device=device)
        if experts_dir is None:
            raise LtddError("trajectory matching needs an expert store (--experts DIR)")
        if not cfg.phases:
            raise LtddError("trajectory matching needs at least one phase")
        if cfg.gradient not in ("exact", "constant_memory"):
            raise LtddError(f"unknown gradient mode '{cfg.gradient}' (known: exact, constant_memory)")
        self.store = TrajectoryStore(experts_dir)
        meta = self.store.meta()
        from ..config import ModelConfig, from_dict

        self.model_cfg = from_dict(ModelConfig, meta["model"])
        self.model = create_model(self.model_cfg.name, data.num_classes, data.channels, data.im_size,
                                  **self.model_cfg.args).to(device)
        if cfg.options.get("double_backward_kernels", True):
            use_double_backward_kernels(self.model)  # same parameters and outputs, cheaper second derivatives
        self.layout = ParamLayout(self.model)
        self.store.check(self.model_cfg, data, self.layout)
        self.masks = {k: self.layout.mask(k).to(device=device, dtype=torch.float32)
                      for k in ("all", "backbone", "classifier")}
        self._full_mask = {k: bool(v.all()) for k, v in self.masks.items()}  # masks selecting every coordinate
        self.experts = {}
        for ph in cfg.phases:
            self._validate_phase(ph, meta)
            if ph.store not in self.experts:
                idx = self.store.indices(ph.store)
                if not idx:
                    raise LtddError(f"expert store {experts_dir} has no {ph.store} experts")
                self.experts[ph.store] = idx
        self.class_weights = dam_weights(data.train_counts, cfg.dam_epsilon, cfg.dam_normalise).to(device)
        self._cache: OrderedDict[tuple[str, int], Trajectory] = OrderedDict()
        self._cache_size = int(cfg.options.get("expert_cache", 32))
        self.dsa = None
        if cfg.dsa and cfg.dsa_strategy not in ("", "none"):
            from ..data.augment import DSA

            self.dsa = DSA(cfg.dsa_strategy)
        # per-phase expert cycling (shuffled order, position) - part of the resumable state
        self.expert_order: dict[str, list[int]] = {}
        self.expert_pos: dict[str, int] = {}
        self.py_rng = random.Random(cfg.seed)
        self.rank, self.world = rank_world()
        if self.world > 1 and cfg.gradient != "constant_memory":
            raise LtddError("distributed distillation needs distill.gradient=constant_memory (the exact unroll "
                            "cannot be split over ranks)")

    def _validate_phase(self, ph: PhaseConfig, meta: dict) -> None:
        for field, allowed in (("store", ("representation", "classifier")), ("match", ("all", "backbone", "classifier")),
                               ("inner_loss", ("ce", "soft_ce", "dam")), ("student_update", ("all", "classifier"))):
            if getattr(ph, field) not in allowed:
                raise LtddError(f"phase '{ph.name}': unknown {field} '{getattr(ph, field)}' "
                                f"(known: {', '.join(allowed)})")
        if ph.inner_loss == "ce" and self.cfg.soft_labels:
            raise LtddError(f"phase '{ph.name}': inner_loss 'ce' trains on hard labels, but the set learns soft "
                            "labels (distill.soft_labels: true) that would then never be updated; use soft_ce or "
                            "dam, or set distill.soft_labels: false")
        if ph.inner_loss == "soft_ce" and not self.cfg.soft_labels:
            raise LtddError(f"phase '{ph.name}': inner_loss 'soft_ce' needs soft labels (distill.soft_labels: true); "
                            "with hard labels use ce (or dam for the class-frequency-weighted loss)")
        if ph.syn_steps < 1 or ph.expert_epochs < 1:
            raise LtddError(f"phase '{ph.name}': syn_steps and expert_epochs must be >= 1")
        if ph.current_max_start_epoch is not None and ph.expansion_end_iteration > 0 and not (
                ph.min_start_epoch < ph.current_max_start_epoch <= ph.max_start_epoch):
            raise LtddError(f"phase '{ph.name}': current_max_start_epoch ({ph.current_max_start_epoch}) must lie in "
                            f"({ph.min_start_epoch}, max_start_epoch = {ph.max_start_epoch}]: the start window "
                            "grows from it to max_start_epoch")
        if ph.max_start_epoch <= ph.min_start_epoch:
            raise LtddError(f"phase '{ph.name}': max_start_epoch ({ph.max_start_epoch}) must exceed "
                            f"min_start_epoch ({ph.min_start_epoch})")
        epochs = meta[ph.store]["epochs"]
        if ph.max_start_epoch - 1 + ph.expert_epochs > epochs:
            raise LtddError(f"phase '{ph.name}': start epochs up to {ph.max_start_epoch - 1} + {ph.expert_epochs} "
                            f"expert epochs exceed the {epochs} epochs of the {ph.store} experts")

    # ---- initialisation ------------------------------------------------------------------------------------------
    def _expert_fn(self, kind: str, index: int):
        flat = self._trajectory(kind, index).final.to(self.device)

        def fn(x):
            out = []
            for i in range(0, len(x), 512):
                out.append(functional_forward(self.model, self.layout, flat, x[i:i + 512].to(self.device)))
            return torch.cat(out)

        return fn

    def initialise(self) -> None:
        cfg = self.cfg
        kind = cfg.label_store
        if kind not in ("representation", "classifier"):
            raise LtddError(f"unknown label_store '{kind}' (known: representation, classifier)")
        indices = self.store.indices(kind)
        if not indices and (cfg.image_init == "correct" or (cfg.soft_labels and cfg.label_init != "onehot")):
            raise LtddError(f"expert store has no {kind} experts to initialise images/labels from")
        classify = self._expert_fn(kind, indices[0]) if indices else None
        self.model.eval()
        images, labels, sources = init_images(self.data, cfg.ipc, cfg.image_init, generator=self.generator,
                                              classify=classify, duplicate=cfg.duplicate)
        self.init_sources = sources
        self.images = images.to(self.device).requires_grad_(True)
        self.labels = labels.to(self.device)
        if cfg.soft_labels:
            fns = [self._expert_fn(kind, i) for i in indices] if cfg.label_init != "onehot" else None
            y = init_soft_labels(self.images.detach(), self.labels.cpu(), self.data.num_classes, cfg.label_init,
                                 fns, cfg.onehot_scale)
            self.soft = y.to(self.device).requires_grad_(True)
        else:
            self.soft = None
        self.model.train()
        self.lr = torch.tensor(float(cfg.lr_init), device=self.device).requires_grad_(True)
        self._make_optimisers()

    def _make_optimisers(self) -> None:
        cfg = self.cfg
        self.opt_img = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.momentum_img)
        self.opt_lr = torch.optim.SGD([self.lr], lr=cfg.lr_lr, momentum=cfg.momentum_lr)
        self.opt_y = torch.optim.SGD([self.soft], lr=cfg.lr_y, momentum=cfg.momentum_y) if self.soft is not None \
            else None

    # ---- state ---------------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images.detach().cpu(), "labels": self.labels.cpu(), "lr": self.lr.detach().cpu()}
        if self.soft is not None:
            out["soft_labels"] = self.soft.detach().cpu()
            out.update(optimiser_tensors("opt_y", self.opt_y))
        out.update(optimiser_tensors("opt_img", self.opt_img))
        out.update(optimiser_tensors("opt_lr", self.opt_lr))
        return out

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self.images = t["images"].to(self.device).clone().requires_grad_(True)
        self.labels = t["labels"].to(self.device).clone()
        self.lr = t["lr"].to(self.device).clone().requires_grad_(True)
        self.soft = t["soft_labels"].to(self.device).clone().requires_grad_(True) if "soft_labels" in t else None
        self._make_optimisers()
        load_optimiser_tensors("opt_img", self.opt_img, t)
        load_optimiser_tensors("opt_lr", self.opt_lr, t)
        if self.opt_y is not None:
            load_optimiser_tensors("opt_y", self.opt_y, t)

    def extra_state(self) -> dict:
        return {"expert_order": self.expert_order, "expert_pos": self.expert_pos,
                "py_rng": list(self.py_rng.getstate()[1]) + [self.py_rng.getstate()[0]]}

    def load_extra_state(self, state: dict) -> None:
        self.expert_order = {k: list(v) for k, v in state.get("expert_order", {}).items()}
        self.expert_pos = {k: int(v) for k, v in state.get("expert_pos", {}).items()}
        if "py_rng" in state:
            s = state["py_rng"]
            self.py_rng.setstate((s[-1], tuple(s[:-1]), None))

    def synthetic_set(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu(), self.labels.cpu(),
                            self.soft.detach().cpu() if self.soft is not None else None, float(self.lr.detach()))

    # ---- experts -------------------------------------------------------------------------------------------------
    def _trajectory(self, kind: str, index: int) -> Trajectory:
        key = (kind, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        traj = self.store.load(kind, index)
        self._cache[key] = traj
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return traj

    def _next_expert(self, kind: str) -> int:
        order = self.expert_order.get(kind)
        pos = self.expert_pos.get(kind, 0)
        if not order or pos >= len(order):
            order = list(self.experts[kind])
            self.py_rng.shuffle(order)
            self.expert_order[kind] = order
            pos = 0
        self.expert_pos[kind] = pos + 1
        return order[pos]

    def start_epoch_bound(self, ph: PhaseConfig, iteration: int) -> int:
        """Upper bound (exclusive) of the start epoch; DATM's sequential generation grows it linearly."""
        if ph.expansion_end_iteration > 0 and ph.current_max_start_epoch is not None:
            frac = min(1.0, iteration / ph.expansion_end_iteration)
            up = int(ph.current_max_start_epoch + (ph.max_start_epoch - ph.current_max_start_epoch) * frac)
        else:
            up = ph.max_start_epoch
        return max(up, ph.min_start_epoch + 1)  # never an empty window (the upstream randint(0, 0) crash)

    # ---- the inner loop ------------------------------------------------------------------------------------------
    def _inner_loss(self, ph: PhaseConfig, logits: torch.Tensor, idx: torch.Tensor, soft: torch.Tensor | None):
        if ph.inner_loss == "ce" or soft is None:
            kind = "dam" if ph.inner_loss == "dam" else "ce"
            return classification_loss(logits, self.labels[idx], kind, class_weights=self.class_weights)
        weights = self.class_weights if ph.inner_loss == "dam" else None
        return soft_cross_entropy(logits, soft[idx], self.cfg.temperature, weights)

    def _plan(self, ph: PhaseConfig) -> list[tuple[torch.Tensor, object]]:
        """Minibatch indices and augmentation parameters of every inner step (drawn from the run's generator)."""
        n = len(self.labels)
        bs = n if ph.batch_syn is None else max(1, min(ph.batch_syn, n))
        plan, perm, cursor = [], torch.randperm(n, generator=self.generator), 0
        for _ in range(ph.syn_steps):
            if cursor + bs > n:
                perm, cursor = torch.randperm(n, generator=self.generator), 0
            idx = perm[cursor:cursor + bs].to(self.device)
            cursor += bs
            aug = self.dsa.sample(bs, generator=self.generator, device=self.device) if self.dsa else None
            plan.append((idx, aug))
        return plan

    def _batch(self, images: torch.Tensor, idx: torch.Tensor, aug) -> torch.Tensor:
        xb = images[idx]
        return self.dsa.apply(xb, aug) if aug is not None else xb

    def _masked(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """``x * mask`` (no multiply when the mask selects every coordinate)."""
        mask = self.masks[kind]
        if self._full_mask.get(kind, False) and mask.dtype == x.dtype:
            return x
        return x * mask

    def _local(self, idx: torch.Tensor, aug):
        """This rank's share of a step's minibatch (data-parallel over the synthetic batch) and its weight.

        With one process: the whole batch, weight 1. With W ranks, rank r takes every W-th sample; its mean inner
        loss is weighted by its share of the batch, so that summing the ranks' gradients gives exactly the
        full-batch gradient (per-sample normalisation such as instance norm keeps samples independent; batch norm
        would not).
        """
        if self.world == 1:
            return idx, aug, 1.0
        sel = torch.arange(self.rank, len(idx), self.world, device=idx.device)
        if aug is not None and not aug.siamese and aug.batch_size == len(idx):
            aug = type(aug)(list(aug.ops), {k: v[sel.to(v.device)] for k, v in aug.values.items()}, aug.siamese)
        return idx[sel], aug, len(sel) / len(idx)

    def _step_gradient(self, ph, theta, images, idx, aug, soft, create_graph: bool):
        """g_j: the (masked) gradient of the inner loss at theta on this rank's share of the step's batch."""
        lidx, laug, w = self._local(idx, aug)
        if len(lidx) == 0:
            return torch.zeros_like(theta)
        out = functional_forward(self.model, self.layout, theta, self._batch(images, lidx, laug))
        loss = self._inner_loss(ph, out, lidx, soft)
        if w != 1.0:
            loss = w * loss
        g = torch.autograd.grad(loss, theta, create_graph=create_graph)[0]
        return self._masked(g, ph.student_update)

    def _expert_distance(self, ph, disp: torch.Tensor) -> torch.Tensor:
        """The normaliser ||m * (theta*_t - theta*_{t+M})||^2; an expert that did not move there is an error."""
        den = self._masked(disp, ph.match).pow(2).sum()
        if not float(den) > 0:
            raise LtddError(f"phase '{ph.name}': the {ph.store} expert does not move on the matched coordinates "
                            f"({ph.match}) between the start epoch and {ph.expert_epochs} epochs later; the matching "
                            "loss is undefined (check the expert store and the phase's start window)")
        return den

    def _phase_exact(self, ph, theta0, target, plan, images, soft, alpha):
        """L_phase, differentiable end to end. The student is tracked as its displacement delta_j = theta_j -
        theta_0 = -alpha sum_{i<j} g_i, so that the residual theta_N - theta_T = (theta_0 - theta_T) + delta_N is
        formed from the expert's displacement and not rounded at the scale of the weights themselves."""
        upd, m = ph.student_update, ph.match
        base = theta0.detach()
        disp = base - target  # theta_0 - theta_T, formed first
        theta = base.clone().requires_grad_(True)
        delta = None
        for idx, aug in plan:
            out = functional_forward(self.model, self.layout, theta, self._batch(images, idx, aug))
            loss = self._inner_loss(ph, out, idx, soft)
            g = torch.autograd.grad(loss, theta, create_graph=True)[0]
            step = alpha * self._masked(g, upd)
            delta = -step if delta is None else delta - step
            theta = base + delta  # theta_{j+1}, for the next forward pass
        resid = disp if delta is None else disp + delta
        num = self._masked(resid, m).pow(2).sum()
        den = self._expert_distance(ph, disp)
        return num / den

    def _phase_constant_memory(self, ph, theta0, target, plan, images, soft, alpha, weight):
        """Returns the (detached) phase loss and accumulates weight * dL/d(images, soft, alpha) into .grad."""
        m = ph.match
        a = alpha.detach()
        img_d = images.detach()
        soft_d = soft.detach() if soft is not None else None
        # pass 1: the student trajectory without a graph; only the sum of the step gradients is kept. As in the
        # exact mode, theta_j = theta_0 + delta_j with delta_j = -alpha sum_{i<j} g_i (the same points).
        base = theta0.detach()
        G = torch.zeros_like(base)
        theta, delta = base.clone(), None
        for idx, aug in plan:
            th = theta.requires_grad_(True)
            g = all_reduce_sum_(self._step_gradient(ph, th, img_d, idx, aug, soft_d, create_graph=False))
            G += g
            delta = -a * g if delta is None else delta - a * g
            theta = base + delta
        disp = base - target  # theta_0 - theta_T first: r is not rounded at the scale of the weights
        den = self._expert_distance(ph, disp)
        r = self._masked(disp - alpha * G, m)
        loss = r.pow(2).sum() / den
        (weight * loss).backward(inputs=[alpha])
        coef = (-2.0 * a * r.detach() / den) * weight  # dL/dg_j, the same for every step
        # pass 2: walk the trajectory again, back-propagating <coef, g_j> into step j's images and labels
        theta, delta = base.clone(), None
        inputs = [images] + ([soft] if soft is not None else [])
        for idx, aug in plan:
            th = theta.requires_grad_(True)
            g = self._step_gradient(ph, th, images, idx, aug, soft, create_graph=True)
            (coef * g).sum().backward(inputs=inputs)
            g = all_reduce_sum_(g.detach())  # the full step (all ranks' shares), to walk on
            delta = -a * g if delta is None else delta - a * g
            theta = base + delta
        return loss.detach()

    def phase_loss_and_grads(self, ph: PhaseConfig, iteration: int) -> tuple[float, dict]:
        kind = ph.store
        expert = self._next_expert(kind)
        up = self.start_epoch_bound(ph, iteration)
        t = self.py_rng.randrange(ph.min_start_epoch, up)
        traj = self._trajectory(kind, expert)
        dtype = self.images.dtype
        theta0 = traj.at(t).to(self.device, dtype)
        target = traj.at(t + ph.expert_epochs).to(self.device, dtype)
        plan = self._plan(ph)
        if self.cfg.gradient == "exact":
            loss = self._phase_exact(ph, theta0, target, plan, self.images, self.soft, self.lr)
            (ph.weight * loss).backward(inputs=[self.images, self.lr] + ([self.soft] if self.soft is not None else []))
            loss = loss.detach()
        else:
            loss = self._phase_constant_memory(ph, theta0, target, plan, self.images, self.soft, self.lr, ph.weight)
        return float(loss), {"expert": expert, "start_epoch": t}

    def step(self, iteration: int) -> dict:
        for opt in (self.opt_img, self.opt_lr, self.opt_y):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
        record: dict = {}
        total = 0.0
        for ph in self.cfg.phases:
            loss, info = self.phase_loss_and_grads(ph, iteration)
            record[f"loss/{ph.name}"] = loss
            record[f"start/{ph.name}"] = info["start_epoch"]
            total += ph.weight * loss
        record["loss"] = total
        if self.world > 1:  # each rank back-propagated into its share of the images: sum the shares
            for t in (self.images, self.soft):
                if t is not None and t.grad is not None:
                    all_reduce_sum_(t.grad)
        for opt in (self.opt_img, self.opt_lr, self.opt_y):
            if opt is not None:
                opt.step()
        with torch.no_grad():
            self.lr.clamp_(min=self.cfg.lr_min)  # projection: the step size stays positive
        record["lr"] = float(self.lr.detach())
        return record

    def segment_loss(self, phase: str, expert: int, start_epoch: int, lr: float) -> float:
        """The normalised matching loss of the current set on one expert segment (``start_epoch`` to
        ``start_epoch + expert_epochs``) with the student's step size set to ``lr``; updates nothing and leaves the
        run's generator where it was. A diagnostic: 1 means the student ends as far from the expert's target as it
        started (a step size of 0 gives exactly 1); above 1, moving at all is worse than not moving
        (benchmarks/mtt_step_size.py)."""
        ph = next((p for p in self.cfg.phases if p.name == phase), None)
        if ph is None:
            raise LtddError(f"no phase '{phase}' (phases: {', '.join(p.name for p in self.cfg.phases)})")
        traj = self._trajectory(ph.store, expert)
        dtype = self.images.dtype
        state = self.generator.get_state()
        plan = self._plan(ph)
        self.generator.set_state(state)
        soft = self.soft.detach() if self.soft is not None else None
        loss = self._phase_exact(ph, traj.at(start_epoch).to(self.device, dtype),
                                 traj.at(start_epoch + ph.expert_epochs).to(self.device, dtype), plan,
                                 self.images.detach(), soft, torch.tensor(float(lr), device=self.device, dtype=dtype))
        return float(loss.detach())

    # used by tests and benchmarks: the total matching loss as a function of (images, soft, alpha)
    def matching_loss(self, iteration: int = 0, gradient: str | None = None) -> torch.Tensor:
        mode = gradient or self.cfg.gradient
        if mode != "exact":
            raise ValueError("matching_loss is only differentiable end-to-end in exact mode")
        total = 0
        for ph in self.cfg.phases:
            kind = ph.store
            expert = self._next_expert(kind)
            t = self.py_rng.randrange(ph.min_start_epoch, self.start_epoch_bound(ph, iteration))
            traj = self._trajectory(kind, expert)
            plan = self._plan(ph)
            dtype = self.images.dtype
            total = total + ph.weight * self._phase_exact(ph, traj.at(t).to(self.device, dtype),
                                                          traj.at(t + ph.expert_epochs).to(self.device, dtype), plan,
                                                          self.images, self.soft, self.lr)
        return total


def phase_replace(ph: PhaseConfig, **kw) -> PhaseConfig:
    return dataclasses.replace(ph, **kw)
