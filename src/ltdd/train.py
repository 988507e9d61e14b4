"""The one training loop: experts, evaluation runs, full-data baselines and two-stage classifiers all use it.

Data sits in memory as one tensor (in model input space) and batches are cut from index permutations; augmentation
(DSA) runs batched on the whole minibatch. Samplers: instance-balanced, class-balanced re-sampling and the
class-aware sampler of the decoupling (cRT) code. Optional SAM / GSAM update.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import LtddError
from .losses import classification_loss, dam_weights


def resolve_device(name: str | None = None) -> torch.device:
    """``None``/"auto": CUDA when present, else CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LtddError(f"unknown device '{name}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LtddError(f"device '{name}' asked for but CUDA is not available")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------------------------------------------
# samplers: each returns the index order of one epoch


def instance_order(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(n)


def class_balanced_order(labels: np.ndarray, num_classes: int, rng: np.random.Generator,
                         length: int | None = None) -> np.ndarray:
    """Class-balanced re-sampling: pick a class uniformly (among non-empty ones), then an image of it uniformly."""
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    present = [c for c in range(num_classes) if len(by_class[c])]
    length = len(labels) if length is None else length
    cls = rng.choice(present, size=length)
    out = np.empty(length, dtype=np.int64)
    for c in present:
        sel = cls == c
        out[sel] = rng.choice(by_class[c], size=int(sel.sum()))
    return out


def class_aware_order(labels: np.ndarray, num_classes: int, rng: np.random.Generator,
                      samples_per_visit: int = 4, length: int | None = None) -> np.ndarray:
    """The class-aware sampler of the decoupling code (used for LAD's classifier experts, lad.md §3.2).

    Classes are visited in a cyclic order that is reshuffled after every full cycle; each visit takes
    ``samples_per_visit`` consecutive images from that class's own cyclic iterator, which is reshuffled whenever it
    wraps. Epoch length defaults to n_max x C, so every class is seen about n_max times per epoch.
    """
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    present = [c for c in range(num_classes) if len(by_class[c])]
    if length is None:
        length = max(len(b) for b in by_class) * len(present)
    pools = {c: rng.permutation(by_class[c]) for c in present}
    pos = {c: 0 for c in present}
    out = np.empty(length, dtype=np.int64)
    filled = 0
    class_cycle: list[int] = []
    while filled < length:
        if not class_cycle:
            class_cycle = list(rng.permutation(present))
        c = class_cycle.pop()
        for _ in range(samples_per_visit):
            if filled >= length:
                break
            if pos[c] >= len(pools[c]):
                pools[c] = rng.permutation(by_class[c])
                pos[c] = 0
            out[filled] = pools[c][pos[c]]
            pos[c] += 1
            filled += 1
    return out


def epoch_order(cfg: TrainConfig, labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    if cfg.sampler == "instance":
        return instance_order(len(labels), rng)
    if cfg.sampler == "class_balanced":
        return class_balanced_order(labels, num_classes, rng)
    if cfg.sampler == "class_aware":
        return class_aware_order(labels, num_classes, rng, cfg.samples_per_class_visit)
    raise LtddError(f"unknown sampler '{cfg.sampler}' (known: instance, class_balanced, class_aware)")


def lr_at(cfg: TrainConfig, epoch: int, base_lr: float) -> float:
    if cfg.schedule == "constant":
        return base_lr
    if cfg.schedule == "step_half":
        return base_lr * (0.1 if epoch >= cfg.epochs // 2 and cfg.epochs > 1 else 1.0)
    if cfg.schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
    raise LtddError(f"unknown lr schedule '{cfg.schedule}' (known: constant, step_half, cosine)")


def trainable_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    if which == "all":
        params = list(model.parameters())
    elif which == "classifier":
        params = list(model.classifier.parameters())
    else:
        raise LtddError(f"unknown trainable set '{which}' (known: all, classifier)")
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def make_augment(cfg: TrainConfig):
    if not cfg.dsa or cfg.dsa_strategy in ("", "none"):
        return None
    from .data.augment import DSA

    return DSA(cfg.dsa_strategy)


# ----------------------------------------------------------------------------------------------------------------


def _sam_step(params, closure, rho: float, alpha: float) -> None:
    """Sharpness-aware gradient (SAM; GSAM when alpha > 0), leaving the update direction in ``p.grad``.

    ASAM-style adaptive perturbation e = rho * w^2 g / ||w g|| (as FTD's GSAM uses, adaptive=True); GSAM then
    removes alpha times the component of the clean gradient orthogonal to the perturbed gradient.
    """
    with torch.no_grad():
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        scale = torch.sqrt(sum(((p * g) ** 2).sum() for p, g in zip(params, grads))) + 1e-12
        eps = [rho * p * p * g / scale for p, g in zip(params, grads)]
        for p, e in zip(params, eps):
            p.add_(e)
    for p in params:
        p.grad = None
    closure()
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
        if alpha > 0:
            gp = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            dot = sum((g * q).sum() for g, q in zip(grads, gp))
            nq = sum((q * q).sum() for q in gp) + 1e-12
            for p, g, q in zip(params, grads, gp):
                orth = g - dot / nq * q
                p.grad = q - alpha * orth


def train_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, *,
                num_classes: int | None = None, class_counts=None, lr: float | None = None,
                seed: int = 0, progress: bool = False, desc: str = "train",
                on_epoch_end: Callable[[int, nn.Module], None] | None = None,
                checkpoint: str | Path | None = None, checkpoint_every_s: float = 300.0,
                keep_checkpoint: bool = False, timing: dict | None = None) -> nn.Module:
    """Train ``model`` in place on (x, y) and return it.

    ``y`` is int64 hard labels or float soft-label logits (N, C). ``class_counts`` are the long-tailed training
    counts that the prior-aware losses (balanced softmax, logit adjustment, DAM) need; by default they are counted
    from hard labels. ``on_epoch_end(epoch, model)`` is called after every epoch (experts record trajectories).

    ``checkpoint``: a file that makes the run resumable. At an epoch's end, at most every ``checkpoint_every_s``
    seconds (0: every epoch), the whole state is written there atomically; a run started with the file present
    continues from it exactly as if never stopped (:mod:`ltdd.train_checkpoint`), and the file is removed once the
    training ends (``keep_checkpoint``: it then holds the finished state, so that a later call returns at once; a
    caller that must first save its result removes it after). A checkpoint of another training is refused.
    ``on_epoch_end`` is called only for the epochs this call runs. ``timing``: filled with ``seconds`` (training
    seconds over every run that contributed, the checkpoint's included), ``seconds_before`` (the checkpoint's share)
    and ``resumed_from`` (the epoch resumed at).
    """
    if len(x) == 0:
        raise LtddError("cannot train on an empty set")
    device = next(model.parameters()).device
    x = x.to(device)
    y = y.to(device)
    soft = y.dtype.is_floating_point
    if num_classes is None:
        num_classes = y.shape[1] if soft else int(y.max().item()) + 1
    hard_labels = (y.argmax(1) if soft else y).cpu().numpy()
    if class_counts is None:
        class_counts = np.bincount(hard_labels, minlength=num_classes)
    counts_t = torch.as_tensor(np.asarray(class_counts, dtype=np.float64), dtype=torch.float32, device=device)
    priors = counts_t / counts_t.sum()
    weights = dam_weights(np.asarray(class_counts)).to(device) if cfg.loss == "dam" else None

    base_lr = cfg.lr if lr is None else float(lr)
    params = trainable_parameters(model, cfg.trainable)
    opt = torch.optim.SGD(params, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    augment = make_augment(cfg)
    gen = torch.Generator()
    gen.manual_seed(seed)
    rng = np.random.default_rng(seed)
    identity = None
    first_epoch = 0
    if checkpoint is not None:
        from .train_checkpoint import load_training_checkpoint, save_training_checkpoint, training_identity

        identity = training_identity(cfg, seed=seed, x=x, y=y, num_classes=num_classes, lr=base_lr,
                                     class_counts=class_counts, model=model)
        first_epoch, seconds_before = load_training_checkpoint(checkpoint, identity=identity, model=model, opt=opt,
                                                               params=params, generator=gen, rng=rng)
    else:
        seconds_before = 0.0
    started = last_save = time.monotonic()
    model.train()
    if cfg.trainable == "classifier":
        # frozen backbone: keep its normalisation statistics fixed too
        model.eval()
        model.classifier.train()

    def loss_of(xb, yb):
        logits = model(xb)
        return classification_loss(logits, yb, cfg.loss, priors=priors, tau=cfg.la_tau,
                                   temperature=cfg.temperature, class_weights=weights)

    for epoch in tqdm(range(first_epoch, cfg.epochs), desc=desc, disable=not progress, leave=False,
                      initial=first_epoch, total=cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, epoch, base_lr)
        order = torch.from_numpy(epoch_order(cfg, hard_labels, num_classes, rng)).to(device)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if augment is not None:
                xb = augment(xb, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss = loss_of(xb, yb)
            loss.backward()
            if cfg.sam_rho > 0:
                _sam_step(params, lambda: loss_of(xb, yb).backward(), cfg.sam_rho, cfg.gsam_alpha)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        if not torch.isfinite(loss):
            raise LtddError(f"training diverged (loss {loss.item()}) at epoch {epoch}; lower the learning rate")
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        if checkpoint is not None and epoch + 1 < cfg.epochs and time.monotonic() - last_save >= checkpoint_every_s:
            save_training_checkpoint(checkpoint, identity=identity, next_epoch=epoch + 1, model=model, opt=opt,
                                     params=params, generator=gen, rng=rng,
                                     seconds=seconds_before + time.monotonic() - started)
            last_save = time.monotonic()
    seconds = seconds_before + time.monotonic() - started
    if checkpoint is not None and keep_checkpoint:
        if first_epoch < cfg.epochs:
            save_training_checkpoint(checkpoint, identity=identity, next_epoch=cfg.epochs, model=model, opt=opt,
                                     params=params, generator=gen, rng=rng, seconds=seconds)
    elif checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    if timing is not None:
        timing.update(seconds=seconds, seconds_before=seconds_before, resumed_from=first_epoch)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits for x, in eval mode, batched."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
