"""Losses shared by training, evaluation and the distillation inner loops.

All take raw logits. Soft targets are given as logits too (a distilled set's learnable soft labels) and turned
into a distribution with ``softmax(target / temperature)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import LtddError


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(1/B) sum_i sum_k w_k p_ik (-log q_ik) with p = softmax(target/T), q = softmax(logits).

    With ``class_weights`` = pi (class frequencies of the long-tailed set) this is the DAM / WMA student loss of LAD
    (lad.md §4.5a): each class column k is weighted by pi_k.
    """
    p = F.softmax(target_logits / temperature, dim=1)
    logq = F.log_softmax(logits, dim=1)
    per = -(p * logq)
    if class_weights is not None:
        per = per * class_weights.to(per.dtype).unsqueeze(0)
    return per.sum(dim=1).mean()


def logit_adjusted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, priors: torch.Tensor,
                                 tau: float = 1.0) -> torch.Tensor:
    """Logit-adjusted loss (Menon et al. 2021): CE(logits + tau log pi). tau = 1 is balanced softmax (Ren et al.)."""
    adj = tau * torch.log(priors.to(logits.dtype).clamp_min(1e-12))
    return F.cross_entropy(logits + adj.unsqueeze(0), labels)


def dam_weights(class_counts, epsilon: float = 0.0, normalise_mean: bool = False) -> torch.Tensor:
    """pi_k = (n_k + eps) / (N + eps) as in the released LAD code; optionally rescaled to mean 1 (an ablation)."""
    n = torch.as_tensor(class_counts, dtype=torch.float32)
    if n.numel() == 0 or (n < 0).any():
        raise LtddError("class counts must be a non-empty list of non-negative numbers")
    pi = (n + epsilon) / (n.sum() + epsilon)
    if normalise_mean:
        pi = pi / pi.mean()
    return pi


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "ce", *,
                        priors: torch.Tensor | None = None, tau: float = 1.0, temperature: float = 1.0,
                        class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch on ``kind``. Float targets are soft-label logits (soft CE, weighted when kind is 'dam')."""
    if targets.dtype.is_floating_point:
        if kind == "dam":
            if class_weights is None:
                raise ValueError("the DAM loss needs class weights (long-tailed class counts)")
            return soft_cross_entropy(logits, targets, temperature, class_weights)
        if kind in ("balanced_softmax", "logit_adjust"):
            if priors is None:
                raise ValueError(f"loss '{kind}' needs class priors")
            adj = (1.0 if kind == "balanced_softmax" else tau) * torch.log(priors.to(logits.dtype).clamp_min(1e-12))
            return soft_cross_entropy(logits + adj.unsqueeze(0), targets, temperature)
        return soft_cross_entropy(logits, targets, temperature)
    if kind == "ce":
        return F.cross_entropy(logits, targets)
    if kind == "balanced_softmax":
        return logit_adjusted_cross_entropy(logits, targets, priors, 1.0)
    if kind == "logit_adjust":
        return logit_adjusted_cross_entropy(logits, targets, priors, tau)
    if kind == "dam":
        if class_weights is None:
            raise ValueError("the DAM loss needs class weights (long-tailed class counts)")
        onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
        return -(onehot * class_weights.to(logits.dtype).unsqueeze(0) * F.log_softmax(logits, 1)).sum(1).mean()
    raise LtddError(f"unknown loss '{kind}' (known: ce, balanced_softmax, logit_adjust, dam)")
