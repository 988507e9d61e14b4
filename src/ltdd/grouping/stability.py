"""Stability of a grouping: pairwise adjusted Rand index between partitions vs a random-partition control."""

from __future__ import annotations

from itertools import combinations

import numpy as np

from ..errors import LtddError
from .groups import groups_to_labels

__all__ = ["partition_stability", "adjusted_rand_batch"]


def _comb2(x: np.ndarray) -> np.ndarray:
    return x * (x - 1) / 2.0


def adjusted_rand_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Adjusted Rand index of each row pair of two ``(R, N)`` integer label arrays (labels 0..K-1), vectorised;
    equals ``sklearn.metrics.adjusted_rand_score`` row by row (1.0 where both labelings are trivial)."""
    a = np.atleast_2d(np.asarray(a, dtype=np.int64))
    b = np.atleast_2d(np.asarray(b, dtype=np.int64))
    R, N = a.shape
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    flat = (np.arange(R)[:, None] * ka * kb + a * kb + b).ravel()
    cont = np.bincount(flat, minlength=R * ka * kb).reshape(R, ka, kb).astype(np.float64)
    index = _comb2(cont).sum((1, 2))
    sa = _comb2(cont.sum(2)).sum(1)
    sb = _comb2(cont.sum(1)).sum(1)
    expected = sa * sb / _comb2(float(N)) if N > 1 else np.zeros(R)
    maximum = (sa + sb) / 2.0
    denom = maximum - expected
    with np.errstate(invalid="ignore", divide="ignore"):
        ari = np.where(np.abs(denom) > 1e-12, (index - expected) / np.where(denom == 0, 1.0, denom), 1.0)
    return ari


def partition_stability(partitions, num_classes: int, n_random: int = 1000, seed: int = 0) -> dict:
    """Agreement between partitions of the same classes (e.g. from models trained on balanced, long-tailed and
    distilled data): pairwise adjusted Rand index, and the same statistic for random partitions with the same group
    sizes (each partition's class labels shuffled) as a control.

    ``partitions``: ``{name: groups}`` or a list of groups. Returns ``pairwise`` (each pair's ARI, the random
    control's mean/std for that pair of group sizes and the fraction of random pairs at least as similar),
    ``mean_ari`` and, for the mean over pairs, ``random`` (mean/std) and ``frac_random_at_least``;
    ``p_value = (1 + #at least as similar) / (1 + n_random)`` is the conservative empirical p-value.
    """
    from sklearn.metrics import adjusted_rand_score

    if isinstance(partitions, dict):
        names = list(partitions)
        parts = [partitions[k] for k in names]
    else:
        parts = list(partitions)
        names = [f"p{i}" for i in range(len(parts))]
    labels = [groups_to_labels(p, num_classes) for p in parts]
    n_random = int(n_random)
    if n_random < 1:
        raise LtddError(f"n_random (random partitions in the control) must be >= 1, got {n_random}")
    out: dict = {"names": names, "n_random": n_random, "pairwise": []}
    if len(labels) < 2:
        out.update(mean_ari=None, random=None, frac_random_at_least=None, p_value=None,
                   note="need at least two partitions to measure stability")
        return out
    pairs = list(combinations(range(len(labels)), 2))
    obs = np.array([adjusted_rand_score(labels[a], labels[b]) for a, b in pairs])
    rng = np.random.default_rng(seed)
    # each partition's class labels shuffled: a random partition with the same group sizes
    shuffled = [np.stack([lab[rng.permutation(num_classes)] for _ in range(n_random)]) for lab in labels]
    rand = np.empty((n_random, len(pairs)))
    for j, (a, b) in enumerate(pairs):
        rand[:, j] = adjusted_rand_batch(shuffled[a], shuffled[b])
    tol = 1e-12
    for j, (a, b) in enumerate(pairs):
        ge = int((rand[:, j] >= obs[j] - tol).sum())
        out["pairwise"].append({"a": names[a], "b": names[b], "ari": float(obs[j]),
                                "random_mean": float(rand[:, j].mean()), "random_std": float(rand[:, j].std()),
                                "frac_random_at_least": ge / max(1, n_random),
                                "p_value": (1 + ge) / (1 + n_random)})
    mean_obs = float(obs.mean())
    rand_mean = rand.mean(1)
    ge = int((rand_mean >= mean_obs - tol).sum())
    out.update(mean_ari=mean_obs, random={"mean": float(rand_mean.mean()), "std": float(rand_mean.std())},
               frac_random_at_least=ge / max(1, n_random), p_value=(1 + ge) / (1 + n_random),
               identical=[[names[a], names[b]] for j, (a, b) in enumerate(pairs) if obs[j] > 1 - 1e-9])
    return out
