"""Penultimate features, per-class k-means centres and the class-to-class distance matrix (two-stage.md §5.3).

* :func:`embed_features`: penultimate features of a model (eval mode, batched).
* :func:`class_centroids`: per-class k-means (k-means++, restarts) with ``M_i = min(M, n_i)`` centres.
* :func:`class_distance_matrix`: ``D_ik = sqrt(sum_j sum_l ||c_ij - c_kl||^2)`` (§5.3), and
  :func:`class_distance_closed_form`, the same number from the centroid means and spreads:
  ``D_ik = sqrt(M_i M_k (||m_i - m_k||^2 + s_i^2 + s_k^2))`` with ``s_i^2 = (1/M_i) sum_j ||c_ij - m_i||^2``.
  (Expand ``c_ij - c_kl = (c_ij - m_i) - (c_kl - m_k) + (m_i - m_k)``; the cross terms vanish when summed because
  ``sum_j (c_ij - m_i) = 0``, leaving ``M_k sum_j ||c_ij - m_i||^2 + M_i sum_l ||c_kl - m_k||^2 +
  M_i M_k ||m_i - m_k||^2``. For equal M this is ``M sqrt(...)``, the form given in §5.3.)
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from ..errors import LtddError
from .threads import _threads_for

__all__ = ["embed_features", "class_centroids", "class_distance_matrix", "class_distance_closed_form"]


@torch.no_grad()
def embed_features(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Penultimate features ``model.embed(x)`` in eval mode, batched; float32 array ``(N, feat_dim)``."""
    if not hasattr(model, "embed"):
        raise LtddError(f"model {type(model).__name__} has no embed() method")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = [model.embed(x[i:i + batch_size].to(device)).float().flatten(1).cpu()
               for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def class_centroids(features: np.ndarray, labels: np.ndarray, num_classes: int, M: int = 5, seed: int = 0,
                    n_init: int = 10) -> list[np.ndarray]:
    """Per-class k-means centres: a list of ``(M_i, d)`` arrays with ``M_i = min(M, n_i)``.

    k-means++ initialisation, ``n_init`` restarts, best inertia kept (sklearn ``KMeans``). A class with no feature
    vector is an error naming the class.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if features.ndim != 2 or len(features) != len(labels):
        raise LtddError(f"features must be (N, d) with N = {len(labels)} labels, got shape {features.shape}")
    if int(M) < 1:
        raise LtddError(f"M (centres per class) must be >= 1, got {M}")
    out = []
    for c in range(num_classes):
        xc = features[labels == c]
        if len(xc) == 0:
            raise LtddError(f"class {c} has no feature vectors to cluster")
        m = min(int(M), len(xc))
        if m == len(xc):
            out.append(xc.copy())  # every point is its own centre
            continue
        with warnings.catch_warnings(), _threads_for(len(xc)):
            warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than centres
            km = KMeans(n_clusters=m, init="k-means++", n_init=n_init, random_state=seed).fit(xc)
        out.append(np.asarray(km.cluster_centers_, dtype=np.float64))
    return out


def class_distance_matrix(centroids: Sequence[np.ndarray]) -> np.ndarray:
    """``D_ik = (sum_j sum_l ||c_ij - c_kl||^2)^(1/2)`` over all centre pairs (two-stage.md §5.3), ``(N, N)``.

    The diagonal follows the same definition (``D_ii = sqrt(2) M_i s_i``, not 0); a cut never uses it."""
    cs = [np.asarray(c, dtype=np.float64) for c in centroids]
    n = len(cs)
    D = np.zeros((n, n))
    for i in range(n):
        for k in range(i, n):
            a, b = cs[i], cs[k]
            sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
            D[i, k] = D[k, i] = math.sqrt(max(float(np.maximum(sq, 0.0).sum()), 0.0))
    return D


def class_distance_closed_form(centroids: Sequence[np.ndarray]) -> np.ndarray:
    """The same ``D`` from centre means ``m_i`` and spreads ``s_i^2 = (1/M_i) sum_j ||c_ij - m_i||^2``:
    ``D_ik = sqrt(M_i M_k (||m_i - m_k||^2 + s_i^2 + s_k^2))`` (equal M: ``M sqrt(...)``, two-stage.md §5.3)."""
    cs = [np.asarray(c, dtype=np.float64) for c in centroids]
    Ms = np.array([len(c) for c in cs], dtype=np.float64)
    means = np.stack([c.mean(0) for c in cs])
    spread = np.array([((c - c.mean(0)) ** 2).sum(1).mean() for c in cs])
    sq = (means * means).sum(1)
    between = np.maximum(sq[:, None] + sq[None, :] - 2.0 * means @ means.T, 0.0)
    return np.sqrt(np.outer(Ms, Ms) * (between + spread[:, None] + spread[None, :]))
