"""The losses of RLDD's debiased experts and the mixed-label views they are computed on.

Each expert (observer and teacher) minimises ``gamma_1 * L_robust + gamma_2 * L_debias`` on two mixed-label
augmented views of a batch:

- :func:`robust_loss`: ``L_robust = -sum_{i=1,2} cos(z_i, stopgrad(p_{3-i}))``, averaged over the batch, where
  ``z_i`` is a shared linear projection of the encoder output of view i and ``p_i`` a small prediction head on
  ``z_i``. Written exactly as the spec states it: the gradient reaches the encoder through ``z``, never through the
  stopped ``p`` (so the prediction head itself gets no gradient from this term). SimSiam's own form,
  ``-sum_i cos(p_i, stopgrad(z_{3-i}))``, is the same function with the roles swapped (``robust_loss(p1, p2, z1,
  z2)``; ``experts.debiased.robust_form: simsiam``).
- :func:`debias_loss`: ``L_debias = alpha * sum_k [-w_k y_k log p_k] - beta * sum_k y_k log p_k`` with
  ``w_k = r_k^-q / sum_j r_j^-q`` (:func:`reweighting`), ``y`` the mixed target, ``alpha = (t/T)^2``
  (:func:`alpha_schedule`), ``beta = 1 - alpha``: plain CE early, frequency-re-weighted CE late. The weights sum to 1
  over the classes (as the paper writes them), so the re-weighted term is on the scale of CE / C for balanced data;
  ``weight_norm: mean`` scales them to average 1 instead. Other schedules: linear ``t/T``, constant 1, none 0.
- :func:`mix_batch`: the mixed-label views (CutMix or mixup of the batch with a permutation of itself).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import LtddError

__all__ = ["alpha_schedule", "reweighting", "debias_loss", "robust_loss", "mix_batch", "beta_draw", "SCHEDULES", "MIXES",
           "WEIGHT_NORMS"]

SCHEDULES = ("quadratic", "linear", "constant", "none")
WEIGHT_NORMS = ("sum", "mean")
MIXES = ("cutmix", "mixup", "none")


def alpha_schedule(t: float, total: float, kind: str = "quadratic") -> float:
    """alpha(t): ``quadratic`` (t / T)^2 (alpha(0) = 0, alpha(T) = 1; the paper's), ``linear`` t / T, ``constant`` 1
    (re-weighted CE from the start) or ``none`` 0 (plain CE throughout)."""
    if kind == "none":
        return 0.0
    if kind == "constant":
        return 1.0
    if kind not in SCHEDULES:
        raise LtddError(f"unknown debias schedule '{kind}' (known: {', '.join(SCHEDULES)})")
    if total <= 0:
        raise LtddError(f"the debias schedule needs T > 0, got {total}")
    return float(t / total) ** (2 if kind == "quadratic" else 1)


def reweighting(class_counts, q: float, norm: str = "sum") -> torch.Tensor:
    """w_k = r_k^-q / sum_j r_j^-q with r_k the class frequency (float64, sums to 1); ``norm="mean"``: C times
    that (the weights average 1).

    The frequencies' normalisation cancels, so counts give the same weights. A class without training images
    (r_k = 0) gets the rarest present class's frequency, so that its weight stays finite.
    """
    n = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if n.numel() == 0 or (n < 0).any() or not (n > 0).any():
        raise LtddError("class counts must be non-negative numbers, at least one of them positive")
    n = torch.where(n > 0, n, n[n > 0].min())
    r = n / n.sum()
    w = r.pow(-float(q))
    if norm not in WEIGHT_NORMS:
        raise LtddError(f"unknown weight normalisation '{norm}' (known: {', '.join(WEIGHT_NORMS)})")
    return w / w.sum() * (len(w) if norm == "mean" else 1)


def debias_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """Batch mean of alpha * sum_k(-w_k y_k log p_k) + (1 - alpha) * sum_k(-y_k log p_k), p = softmax(logits).

    ``target``: (B, C) probabilities (the mixed one-hot labels); ``weights``: (C,) from :func:`reweighting`.
    """
    if target.shape != logits.shape:
        raise LtddError(f"target {tuple(target.shape)} and logits {tuple(logits.shape)} differ in shape")
    logp = F.log_softmax(logits, dim=1)
    ce = -(target * logp).sum(1)
    reweighted = -(target * weights.to(logp.dtype).unsqueeze(0) * logp).sum(1)
    return (alpha * reweighted + (1.0 - alpha) * ce).mean()


def robust_loss(z1: torch.Tensor, z2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """-[cos(z1, stopgrad(p2)) + cos(z2, stopgrad(p1))], averaged over the batch (rows are samples)."""
    return -(F.cosine_similarity(z1, p2.detach(), dim=1) + F.cosine_similarity(z2, p1.detach(), dim=1)).mean()


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, kind: str, alpha: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, mixed targets (B, C)). Each image is mixed with the image at a random permutation of the
    batch with one lambda ~ Beta(alpha, alpha) per batch:

    - ``mixup``: x = lam x_a + (1 - lam) x_b, y = lam e_a + (1 - lam) e_b;
    - ``cutmix``: a box of area (1 - lam) H W (centre uniform, clipped at the border) is pasted from x_b, and
      lambda is recomputed from the pasted area;
    - ``none``: the images and one-hot targets unchanged.
    """
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    if kind == "none" or len(x) < 2:
        if kind not in MIXES:
            raise LtddError(f"unknown mix '{kind}' (known: {', '.join(MIXES)})")
        return x, onehot
    if alpha <= 0:
        raise LtddError(f"mix_alpha must be > 0, got {alpha}")
    lam = beta_draw(alpha, generator)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    if kind == "mixup":
        return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm]
    if kind != "cutmix":
        raise LtddError(f"unknown mix '{kind}' (known: {', '.join(MIXES)})")
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(round(h * cut)), int(round(w * cut))
    cy, cx = (torch.rand(2, generator=generator) * torch.tensor([h, w])).long().tolist()
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return out, lam * onehot + (1 - lam) * onehot[perm]


def beta_draw(alpha: float, generator: torch.Generator) -> float:
    """One lambda ~ Beta(alpha, alpha), reproducible from ``generator`` (a numpy generator seeded from it)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
