"""The grouping hypothesis of the two-stage paper (two-stage.md §5): per-class k-means on penultimate features, a
class-to-class distance over all centroid pairs, and a max-cut partition of the classes into groups.

Pieces, each usable alone:

* :func:`embed_features`: penultimate features of a model (eval mode, batched).
* :func:`class_centroids`: per-class k-means (k-means++, restarts) with ``M_i = min(M, n_i)`` centres.
* :func:`class_distance_matrix`: ``D_ik = sqrt(sum_j sum_l ||c_ij - c_kl||^2)`` (§5.3), and
  :func:`class_distance_closed_form`, the same number from the centroid means and spreads:
  ``D_ik = sqrt(M_i M_k (||m_i - m_k||^2 + s_i^2 + s_k^2))`` with ``s_i^2 = (1/M_i) sum_j ||c_ij - m_i||^2``.
  (Expand ``c_ij - c_kl = (c_ij - m_i) - (c_kl - m_k) + (m_i - m_k)``; the cross terms vanish when summed because
  ``sum_j (c_ij - m_i) = 0``, leaving ``M_k sum_j ||c_ij - m_i||^2 + M_i sum_l ||c_kl - m_k||^2 +
  M_i M_k ||m_i - m_k||^2``. For equal M this is ``M sqrt(...)``, the form given in §5.3.)
* :func:`max_cut_bipartition`: exhaustive max-cut for up to 20 classes (class 0 fixed in the first group),
  vectorised over all ``2^(N-1)`` assignments, with ranked alternatives and a minimum group size.
* :func:`partition_k` (spectral clustering on ``exp(-D^2 / sigma^2)`` or recursive max-cut) and :func:`partition`,
  which dispatches.
* :func:`partition_stability`: pairwise adjusted Rand index between partitions from models trained on different
  data, against a random-partition control with the same group sizes (an empirical p-value).
* :func:`tsne_plot`: t-SNE of features with the k-means centres embedded jointly, coloured by class, marked by group.
* :func:`analyse_groups`: the whole analysis, returning a JSON-able dict.

Features come from the held-out balanced **probe** split by default (two-stage.md §5.3: the paper clustered test
features, which leaks the test set into the method). ``features_from="test"`` reproduces the paper and is labelled
as such in every output.
"""

from __future__ import annotations

import io
import math
import warnings
from itertools import combinations
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .config import atomic_write_bytes
from .errors import LtddError

__all__ = [
    "embed_features",
    "class_centroids",
    "class_distance_matrix",
    "class_distance_closed_form",
    "all_bipartition_cuts",
    "max_cut_bipartition",
    "partition_k",
    "partition",
    "cut_value",
    "bipartition_rank",
    "check_groups",
    "groups_to_labels",
    "group_summary",
    "partition_stability",
    "adjusted_rand_batch",
    "error_structure",
    "tsne_plot",
    "analyse_groups",
    "EXHAUSTIVE_MAX_CLASSES",
    "TEST_SPLIT_WARNING",
]

EXHAUSTIVE_MAX_CLASSES = 20
TEST_SPLIT_WARNING = ("FEATURES FROM THE TEST SPLIT: the grouping is computed on test images, so the test set leaks "
                      "into the method design (as in the paper). Use the probe split for a clean result.")


# ----------------------------------------------------------------------------------------------------------------
# threads: sklearn's OpenMP/BLAS pools spin badly on small problems when the cores are shared (a 51-point t-SNE took
# 2.5 s with 2 threads vs 0.34 s with 1 on a loaded 2-core machine), so small problems run single-threaded.

SMALL_PROBLEM = 5000  # rows below which k-means and t-SNE use one thread


def _threads_for(n_rows: int):
    from contextlib import nullcontext

    if n_rows >= SMALL_PROBLEM:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


# ----------------------------------------------------------------------------------------------------------------
# features and per-class centroids


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


# ----------------------------------------------------------------------------------------------------------------
# partitions


def _check_D(D) -> np.ndarray:
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise LtddError(f"distance matrix must be square, got shape {D.shape}")
    if not np.isfinite(D).all():
        raise LtddError("distance matrix has non-finite entries")
    if not np.allclose(D, D.T, rtol=1e-8, atol=1e-10 * max(1.0, float(np.abs(D).max(initial=0.0)))):
        raise LtddError("distance matrix is not symmetric")
    return (D + D.T) / 2.0


def check_groups(groups, num_classes: int) -> list[list[int]]:
    """Validate that ``groups`` covers every class ``0..num_classes-1`` exactly once, no group empty; returns the
    groups as lists of ints (order kept)."""
    out = []
    seen: dict[int, int] = {}
    for gi, g in enumerate(groups):
        g = [int(c) for c in g]
        if not g:
            raise LtddError(f"group {gi + 1} is empty")
        for c in g:
            if c < 0 or c >= num_classes:
                raise LtddError(f"group {gi + 1} names class {c}, but there are only {num_classes} classes "
                                f"(0..{num_classes - 1})")
            if c in seen:
                where = "twice in group " + str(gi + 1) if seen[c] == gi else f"in groups {seen[c] + 1} and {gi + 1}"
                raise LtddError(f"class {c} appears {where}; every class must be in exactly one group")
            seen[c] = gi
        out.append(g)
    missing = [c for c in range(num_classes) if c not in seen]
    if missing:
        raise LtddError(f"classes {missing} are in no group; every class must be in exactly one group")
    if len(out) < 2:
        raise LtddError("need at least two groups")
    return out


def groups_to_labels(groups, num_classes: int) -> np.ndarray:
    """``(num_classes,)`` array of group indices."""
    groups = check_groups(groups, num_classes)
    lab = np.empty(num_classes, dtype=np.int64)
    for gi, g in enumerate(groups):
        lab[g] = gi
    return lab


def _canonical(groups) -> list[list[int]]:
    """Sorted members, groups ordered by their smallest class."""
    return sorted((sorted(int(c) for c in g) for g in groups if len(g)), key=lambda g: g[0])


def cut_value(D, groups) -> float:
    """Sum of ``D_ik`` over unordered class pairs in different groups (for two groups: the §5.3 objective)."""
    D = _check_D(D)
    lab = groups_to_labels(groups, len(D))
    diff = lab[:, None] != lab[None, :]
    return float(D[diff].sum() / 2.0)


def _mask_bits(masks: np.ndarray, n: int) -> np.ndarray:
    """Bit matrix for masks over classes 1..n-1: column 0 (class 0) is always 0, i.e. class 0 stays in G1."""
    bits = np.zeros((len(masks), n), dtype=np.float64)
    if n > 1:
        bits[:, 1:] = (masks[:, None] >> np.arange(n - 1, dtype=np.int64)[None, :]) & 1
    return bits


def all_bipartition_cuts(D, chunk: int = 1 << 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every bipartition with class 0 in G1: ``(masks, cuts, sizes_of_G2)``. Bit ``i-1`` of a mask puts class ``i``
    in G2. ``cut(x) = x . (D 1) - x^T D x`` with ``x`` the G2 indicator, evaluated in chunks of assignments."""
    D = _check_D(D)
    n = len(D)
    if n < 2:
        raise LtddError(f"need at least 2 classes to partition, got {n}")
    if n > EXHAUSTIVE_MAX_CLASSES:
        raise LtddError(f"exhaustive max-cut is limited to {EXHAUSTIVE_MAX_CLASSES} classes (got {n}); use "
                        "partition_k(D, k, method='spectral' or 'recursive')")
    total = 1 << (n - 1)
    masks = np.arange(total, dtype=np.int64)
    cuts = np.empty(total)
    sizes = np.empty(total, dtype=np.int64)
    rows = D.sum(1)
    for start in range(0, total, chunk):
        X = _mask_bits(masks[start:start + chunk], n)
        cuts[start:start + chunk] = X @ rows - ((X @ D) * X).sum(1)
        sizes[start:start + chunk] = X.sum(1).astype(np.int64)
    return masks, cuts, sizes


def _mask_groups(mask: int, n: int) -> list[list[int]]:
    g2 = [i for i in range(1, n) if (mask >> (i - 1)) & 1]
    g1 = [i for i in range(n) if i not in g2]
    return [g1, g2]


def _valid(sizes: np.ndarray, n: int, min_size: int) -> np.ndarray:
    return (sizes >= min_size) & (n - sizes >= min_size)


def _check_min_size(min_size: int, n: int, k: int = 2) -> int:
    min_size = int(min_size)
    if min_size < 1:
        raise LtddError(f"min_size must be >= 1, got {min_size}")
    if min_size * k > n:
        raise LtddError(f"min_size {min_size} is impossible for {k} groups of {n} classes")
    return min_size


def max_cut_bipartition(D, min_size: int = 1, top: int = 5) -> tuple[list[list[int]], float, list[dict]]:
    """Exhaustive max-cut over all two-way splits (class 0 fixed in G1, so each split is counted once).

    Returns ``(groups, cut_value, alternatives)``: ``groups = [G1, G2]`` (sorted; G1 holds class 0), the best cut,
    and the next ``top`` splits ranked by decreasing cut, each ``{"rank", "groups", "cut", "gap"}`` where ``gap`` is
    the best cut minus this one. Both groups have at least ``min_size`` classes. Ties keep the smaller mask first.
    """
    D = _check_D(D)
    n = len(D)
    min_size = _check_min_size(min_size, n)
    masks, cuts, sizes = all_bipartition_cuts(D)
    ok = np.flatnonzero(_valid(sizes, n, min_size))
    want = min(len(ok), int(top) + 1)
    if len(ok) > want:
        sel = ok[np.argpartition(-cuts[ok], want - 1)[:want]]
        # include every candidate tied with the last one kept, so the ordering among ties is deterministic
        thr = cuts[sel].min()
        sel = ok[cuts[ok] >= thr]
    else:
        sel = ok
    order = sel[np.lexsort((masks[sel], -cuts[sel]))][:want]
    best = float(cuts[order[0]])
    alternatives = [{"rank": r + 2, "groups": _mask_groups(int(masks[i]), n), "cut": float(cuts[i]),
                     "gap": best - float(cuts[i])} for r, i in enumerate(order[1:])]
    return _mask_groups(int(masks[order[0]]), n), best, alternatives


def bipartition_rank(D, groups, min_size: int = 1) -> dict:
    """Where a given two-way split ranks among all splits (1 = the max-cut): ``{"cut", "rank", "of", "gap"}``."""
    D = _check_D(D)
    n = len(D)
    groups = check_groups(groups, n)
    if len(groups) != 2:
        raise LtddError(f"bipartition_rank needs two groups, got {len(groups)}")
    masks, cuts, sizes = all_bipartition_cuts(D)
    ok = _valid(sizes, n, min_size)
    c = cut_value(D, groups)
    tol = 1e-9 * max(1.0, abs(c))
    return {"cut": c, "rank": int((cuts[ok] > c + tol).sum()) + 1, "of": int(ok.sum()),
            "gap": float(cuts[ok].max() - c)}


def _local_search_maxcut(D: np.ndarray, min_size: int, seed: int, restarts: int = 20) -> np.ndarray:
    """Two-way max-cut heuristic for many classes: random starts + best single-class moves until no gain.
    Returns a 0/1 assignment (class 0 in side 0)."""
    n = len(D)
    rng = np.random.default_rng(seed)
    best_x, best_cut = None, -np.inf
    for _ in range(restarts):
        x = rng.integers(0, 2, n).astype(np.float64)
        while x.sum() < min_size or n - x.sum() < min_size:  # repair: random moves into the small side
            small = 1.0 if x.sum() < min_size else 0.0
            x[rng.choice(np.flatnonzero(x != small))] = small
        while True:
            # gain of moving class i to the other side: sum_k D_ik (same side) - sum_k D_ik (other side)
            same = np.where(x[:, None] == x[None, :], D, 0.0).sum(1) - np.diag(D)
            other = D.sum(1) - np.diag(D) - same
            gain = same - other
            size2 = x.sum()
            allowed = np.where(x == 1, size2 - 1 >= min_size, n - size2 - 1 >= min_size)
            gain[~allowed] = -np.inf
            i = int(np.argmax(gain))
            if gain[i] <= 1e-12 * max(1.0, float(np.abs(D).max())):
                break
            x[i] = 1.0 - x[i]
        c = float(x @ D.sum(1) - x @ D @ x)
        if c > best_cut:
            best_cut, best_x = c, x.copy()
    if best_x[0] == 1:
        best_x = 1.0 - best_x
    return best_x.astype(np.int64)


def _bisect(D: np.ndarray, min_size: int, seed: int) -> tuple[list[int], list[int]]:
    if len(D) <= EXHAUSTIVE_MAX_CLASSES:
        g, _, _ = max_cut_bipartition(D, min_size=min_size, top=0)
        return g[0], g[1]
    x = _local_search_maxcut(D, min_size, seed)
    return [int(i) for i in np.flatnonzero(x == 0)], [int(i) for i in np.flatnonzero(x == 1)]


def partition_k(D, k: int, method: str = "spectral", *, seed: int = 0, min_size: int = 1,
                sigma: float | None = None) -> list[list[int]]:
    """Partition the classes into ``k`` groups.

    * ``spectral``: sklearn spectral clustering on the affinity ``exp(-D^2 / sigma^2)`` (``sigma``: the median
      off-diagonal distance by default). ``min_size`` is not enforced by spectral clustering; a result that violates
      it is an error.
    * ``recursive``: repeated max-cut bisection (exhaustive up to 20 classes, a local-search max-cut above that) of
      the group with the largest within-group distance sum, until there are ``k`` groups of at least ``min_size``.

    Groups come back sorted, ordered by their smallest class.
    """
    D = _check_D(D)
    n = len(D)
    k = int(k)
    if k < 2 or k > n:
        raise LtddError(f"number of groups k must be in 2..{n}, got {k}")
    min_size = _check_min_size(min_size, n, k)
    if method == "spectral":
        from sklearn.cluster import SpectralClustering

        off = D[~np.eye(n, dtype=bool)]
        s = float(np.median(off)) if sigma is None else float(sigma)
        if not s > 0:
            raise LtddError("spectral partition needs a positive sigma (all distances are zero?)")
        A = np.exp(-(D / s) ** 2)
        np.fill_diagonal(A, 1.0)
        with warnings.catch_warnings(), _threads_for(n):
            warnings.simplefilter("ignore", UserWarning)  # "graph is not fully connected"
            lab = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                                     assign_labels="cluster_qr").fit_predict(A)
        groups = _canonical([np.flatnonzero(lab == g).tolist() for g in range(k)])
        if len(groups) < k:
            raise LtddError(f"spectral clustering found only {len(groups)} non-empty groups of the {k} asked for; "
                            "try method='recursive'")
        small = [g for g in groups if len(g) < min_size]
        if small:
            raise LtddError(f"spectral clustering gave a group of {len(small[0])} classes (< min_size {min_size}); "
                            "try method='recursive'")
        return groups
    if method == "recursive":
        groups = [list(range(n))]
        while len(groups) < k:
            cand = [i for i, g in enumerate(groups) if len(g) >= 2 * min_size]
            if not cand:
                raise LtddError(f"cannot split {n} classes into {k} groups of at least {min_size}")
            within = [D[np.ix_(groups[i], groups[i])].sum() / 2.0 for i in cand]
            i = cand[int(np.argmax(within))]
            g = groups.pop(i)
            a, b = _bisect(D[np.ix_(g, g)], min_size, seed + len(groups))
            groups += [[g[j] for j in a], [g[j] for j in b]]
        return _canonical(groups)
    raise LtddError(f"unknown partition method '{method}' (known: exhaustive, spectral, recursive)")


def partition(D, k: int = 2, method: str = "auto", *, min_size: int = 1, top: int = 5, seed: int = 0) -> dict:
    """Partition dispatcher. ``auto``: exhaustive max-cut when ``k == 2`` and N <= 20; recursive (local-search)
    max-cut when ``k == 2`` and N > 20; spectral clustering when ``k > 2``.

    Returns ``{"groups", "cut", "method", "alternatives"}``; alternatives only for the exhaustive search."""
    D = _check_D(D)
    n = len(D)
    if method == "auto":
        method = ("exhaustive" if n <= EXHAUSTIVE_MAX_CLASSES else "recursive") if k == 2 else "spectral"
    if method == "exhaustive":
        if k != 2:
            raise LtddError(f"exhaustive max-cut gives two groups; for k = {k} use spectral or recursive")
        groups, cut, alternatives = max_cut_bipartition(D, min_size=min_size, top=top)
        return {"groups": groups, "cut": cut, "method": "exhaustive", "alternatives": alternatives}
    groups = partition_k(D, k, method, seed=seed, min_size=min_size)
    return {"groups": groups, "cut": cut_value(D, groups), "method": method, "alternatives": []}


# ----------------------------------------------------------------------------------------------------------------
# stability


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


def error_structure(y_true, y_pred, groups, num_classes: int) -> dict:
    """Do a model's mistakes stay inside the groups? Fraction of errors whose predicted class is in the true class's
    group, against the chance level ``mean over errors of (|g(y)| - 1) / (N - 1)`` (errors spread uniformly)."""
    lab = groups_to_labels(groups, num_classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    err = y_true != y_pred
    if not err.any():
        return {"errors": 0, "within_group_error_fraction": None, "chance": None}
    sizes = np.bincount(lab, minlength=lab.max() + 1)
    within = float((lab[y_true[err]] == lab[y_pred[err]]).mean())
    chance = float(((sizes[lab[y_true[err]]] - 1) / max(1, num_classes - 1)).mean())
    return {"errors": int(err.sum()), "within_group_error_fraction": within, "chance": chance,
            "group_accuracy": float((lab[y_true] == lab[y_pred]).mean())}


def group_summary(groups, counts: Sequence[int], class_names: Sequence[str] | None = None) -> list[dict]:
    """Per group: classes, names, training images, share of the training set (the group prior pi_g) and the
    within-group imbalance (max/min count)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = max(1, int(counts.sum()))
    out = []
    for g in groups:
        cnt = counts[list(g)]
        out.append({"classes": [int(c) for c in g],
                    "names": [str(class_names[c]) for c in g] if class_names is not None else None,
                    "train_images": int(cnt.sum()), "prior": float(cnt.sum() / total),
                    "imbalance": (float(cnt.max() / cnt.min()) if cnt.min() > 0 else None)})
    return out


# ----------------------------------------------------------------------------------------------------------------
# t-SNE plot

_GROUP_MARKERS = ("o", "s", "D", "P", "X", "v", "<", ">", "h", "*")
_GROUP_EDGES = ("black", "red", "blue", "darkgreen", "purple", "orange", "brown", "magenta", "gray", "olive")


def tsne_plot(features: np.ndarray, labels: np.ndarray, centroids: Sequence[np.ndarray] | None, groups,
              class_names: Sequence[str], path: str | Path, perplexity: float = 50.0, seed: int = 0,
              title: str | None = None, max_points: int | None = 3000, pca_dims: int = 50) -> dict:
    """t-SNE of ``features`` (PCA to ``pca_dims`` first when wider) with the k-means ``centroids`` embedded jointly
    with the points; points coloured by class and marked by group, centres drawn as large triangles outlined in
    their group's colour. Writes a PNG atomically; returns ``{"path", "points", "perplexity"}``.

    ``perplexity`` is lowered to ``(n - 1) / 3`` when there are too few points; ``max_points`` subsamples the points
    (stratified by class, deterministic in ``seed``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_names)
    glab = groups_to_labels(groups, num_classes)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(labels))
    if max_points is not None and len(idx) > max_points:
        keep = []
        for c in range(num_classes):
            ic = np.flatnonzero(labels == c)
            take = max(1, int(round(max_points * len(ic) / len(labels)))) if len(ic) else 0
            keep.append(rng.choice(ic, size=min(take, len(ic)), replace=False))
        idx = np.sort(np.concatenate(keep))
    pts = features[idx]
    plab = labels[idx]
    cen = [np.asarray(c, dtype=np.float64) for c in centroids] if centroids is not None else []
    clab = np.concatenate([np.full(len(c), i) for i, c in enumerate(cen)]).astype(np.int64) if cen else \
        np.zeros(0, dtype=np.int64)
    allx = np.concatenate([pts] + cen) if cen else pts
    n = len(allx)
    if n < 4:
        raise LtddError(f"t-SNE needs at least 4 points, got {n}")
    perp = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    with _threads_for(n):
        if allx.shape[1] > pca_dims and n > pca_dims:
            allx = PCA(n_components=pca_dims, random_state=seed).fit_transform(allx)
        emb = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto",
                   random_state=seed).fit_transform(allx)
    ep, ec = emb[:len(pts)], emb[len(pts):]

    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    colour = [cmap(c % cmap.N) for c in range(num_classes)]
    fig = Figure(figsize=(8.5, 7.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for c in range(num_classes):
        sel = plab == c
        if sel.any():
            ax.scatter(ep[sel, 0], ep[sel, 1], s=9, alpha=0.55, color=colour[c],
                       marker=_GROUP_MARKERS[glab[c] % len(_GROUP_MARKERS)], linewidths=0)
    for c in range(num_classes):
        sel = clab == c
        if sel.any():
            ax.scatter(ec[sel, 0], ec[sel, 1], s=140, marker="^", color=colour[c],
                       edgecolors=_GROUP_EDGES[glab[c] % len(_GROUP_EDGES)], linewidths=2.0, zorder=5)
    handles = [Line2D([], [], marker="o", linestyle="", color=colour[c],
                      label=f"{class_names[c]} (G{glab[c] + 1})") for c in range(num_classes)] if num_classes <= 20 \
        else []
    handles += [Line2D([], [], marker=_GROUP_MARKERS[g % len(_GROUP_MARKERS)], linestyle="", color="gray",
                       markeredgecolor=_GROUP_EDGES[g % len(_GROUP_EDGES)], markeredgewidth=1.5,
                       label=f"group {g + 1}") for g in range(int(glab.max()) + 1)]
    if cen:
        handles.append(Line2D([], [], marker="^", linestyle="", color="lightgray", markeredgecolor="black",
                              markersize=10, label="k-means centre"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "t-SNE of penultimate features", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return {"path": str(path), "points": int(len(pts)), "centres": int(len(ec)), "perplexity": perp}


# ----------------------------------------------------------------------------------------------------------------
# the full analysis


def _feature_split(data, features_from: str, M: int):
    """(x, y, info) for the chosen split. A probe class with fewer than M images is topped up with that class's
    long-tailed training images (named in ``info['supplemented_from_train']``)."""
    if features_from == "probe":
        if getattr(data, "probe_x", None) is None or data.probe_y is None or len(data.probe_y) == 0:
            raise LtddError("no probe split: build the data with probe_per_class > 0 (ltdd groups "
                            "--probe-per-class N), or use features_from='train'")
        x, y = data.probe_x, data.probe_y
        counts = torch.bincount(y, minlength=data.num_classes).tolist()
        short = [c for c in range(data.num_classes) if counts[c] < M]
        if short:
            add = torch.cat([torch.nonzero(data.train_y == c).flatten() for c in short])
            x = torch.cat([x, data.train_x[add]])
            y = torch.cat([y, data.train_y[add]])
        return x, y, {"split": "probe", "probe_counts": counts, "supplemented_from_train": short}
    if features_from == "test":
        return data.test_x, data.test_y, {"split": "test", "warning": TEST_SPLIT_WARNING}
    if features_from == "train":
        return data.train_x, data.train_y, {"split": "train (long-tailed)"}
    raise LtddError(f"unknown feature split '{features_from}' (known: probe, test, train)")


def _train_classifier(data, x, y, model_cfg, train_cfg, seed: int, device, progress: bool, desc: str):
    from .models import create_model
    from .train import train_model

    torch.manual_seed(seed)
    model = create_model(model_cfg.name, data.num_classes, data.channels, data.im_size, **model_cfg.args)
    if device is not None:
        model = model.to(device)
    train_model(model, x, y, train_cfg, num_classes=data.num_classes, seed=seed, progress=progress, desc=desc)
    return model


def _grouping_of(model, x, y, data, *, k, M, method, min_size, top, seed) -> dict:
    feats = embed_features(model, x)
    yn = y.numpy()
    cents = class_centroids(feats, yn, data.num_classes, M=M, seed=seed)
    D = class_distance_matrix(cents)
    part = partition(D, k, method, min_size=min_size, top=top, seed=seed)
    from .train import predict

    pred = predict(model, x).argmax(1).numpy()
    return {"features": feats, "centroids": cents, "D": D, "partition": part,
            "accuracy": float((pred == yn).mean()), "errors": error_structure(yn, pred, part["groups"],
                                                                              data.num_classes)}


def _names(groups, class_names) -> list[list[str]]:
    return [[str(class_names[c]) for c in g] for g in groups]


def analyse_groups(data, *, model: torch.nn.Module | None = None, model_cfg=None, train_cfg=None,
                   features_from: str = "probe", k: int = 2, M: int = 5, method: str = "auto", min_size: int = 1,
                   top: int = 5, seed: int = 0, device=None, seeds: int = 1, balanced: bool = True,
                   training_sets: dict | None = None, references: dict | None = None, n_random: int = 1000,
                   out_dir: str | Path | None = None, tsne: bool = True, perplexity: float = 50.0,
                   progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """The grouping analysis of two-stage.md §5, as a JSON-able dict.

    1. The main model: ``model`` if given, else a ``model_cfg`` network trained on the long-tailed training set with
       ``train_cfg`` (default: the DC protocol, two-stage.md §4.1).
    2. Embed the feature split (``probe`` by default; ``test`` only when asked, flagged in ``features_split`` and
       ``warning``; ``train`` = the long-tailed set with ``M_i = min(M, n_i)``), per-class k-means, the distance
       matrix ``D``, the partition (``partition``), ranked alternatives, and the rank of each ``references`` split
       (``{name: groups}``; two groups only).
    3. Stability: further models, each giving its own partition on the same features split: ``seeds - 1`` more
       long-tailed seeds, a class-balanced re-sampling of the long-tailed set (``balanced``; no new images) and
       every ``training_sets`` entry ``{name: (x, y)}`` (``y`` hard labels or soft-label logits, e.g. a distilled
       set). Pairwise ARI against a random control (:func:`partition_stability`).
    4. With ``out_dir``: ``tsne.png`` (main model) and ``tsne_<name>.png`` per further model (``tsne=False`` skips
       them). Nothing else is written here; the caller saves the dict.
    """
    import dataclasses

    from .config import ModelConfig, protocol_preset

    say = log or (lambda s: None)
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or protocol_preset("dc").train
    x, y, split_info = _feature_split(data, features_from, M)
    feature_counts = torch.bincount(y, minlength=data.num_classes).tolist()
    common = dict(k=k, M=M, method=method, min_size=min_size, top=top, seed=seed)

    runs: dict[str, dict] = {}
    specs: list[tuple[str, Callable[[], torch.nn.Module], int]] = []
    if model is not None:
        specs.append(("given", lambda: model, 0))
    else:
        specs.append(("long_tailed", lambda: _train_classifier(data, data.train_x, data.train_y, model_cfg, train_cfg,
                                                              seed, device, progress, "long-tailed model"),
                      int(len(data.train_y))))
    for s in range(1, max(1, int(seeds))):
        specs.append((f"long_tailed_seed{seed + s}", lambda s=s: _train_classifier(
            data, data.train_x, data.train_y, model_cfg, train_cfg, seed + s, device, progress,
            f"long-tailed model, seed {seed + s}"), int(len(data.train_y))))
    if balanced:
        bal_cfg = dataclasses.replace(train_cfg, sampler="class_balanced")
        specs.append(("balanced_resampled", lambda: _train_classifier(
            data, data.train_x, data.train_y, model_cfg, bal_cfg, seed, device, progress, "class-balanced model"),
            int(len(data.train_y))))
    for name, (tx, ty) in (training_sets or {}).items():
        specs.append((name, lambda tx=tx, ty=ty, name=name: _train_classifier(
            data, tx, ty, model_cfg, train_cfg, seed, device, progress, f"{name} model"), int(len(tx))))

    main_name = specs[0][0]
    for name, build, n_train in specs:
        say(f"training / embedding: {name}")
        m = build()
        g = _grouping_of(m, x, y, data, **common)
        g["train_images"] = n_train
        runs[name] = g

    main = runs[main_name]
    part = main["partition"]
    groups = part["groups"]
    result: dict = {
        "features_split": split_info["split"],
        **({"warning": split_info["warning"]} if "warning" in split_info else {}),
        **({"supplemented_from_train": split_info["supplemented_from_train"],
            "probe_counts": split_info["probe_counts"]} if features_from == "probe" else {}),
        "feature_counts": feature_counts,
        "class_names": list(data.class_names),
        "M": int(M),
        "M_per_class": [int(len(c)) for c in main["centroids"]],
        "k": int(k),
        "method": part["method"],
        "min_size": int(min_size),
        "model": main_name,
        "groups": groups,
        "group_names": _names(groups, data.class_names),
        "cut": part["cut"],
        "alternatives": [{**a, "group_names": _names(a["groups"], data.class_names)} for a in part["alternatives"]],
        "group_summary": group_summary(groups, data.train_counts, data.class_names),
        "distance_matrix": main["D"].tolist(),
        "model_accuracy_on_features_split": main["accuracy"],
        "error_structure": main["errors"],
        "seed": int(seed),
        "model_config": {"name": model_cfg.name, "args": dict(model_cfg.args)},
        "train_config": dataclasses.asdict(train_cfg),
    }
    if references and len(groups) == 2 and data.num_classes <= EXHAUSTIVE_MAX_CLASSES:
        result["references"] = {}
        for rname, rg in references.items():
            rg = check_groups(rg, data.num_classes)
            result["references"][rname] = {"groups": _canonical(rg), "group_names": _names(_canonical(rg),
                                                                                          data.class_names),
                                           **bipartition_rank(main["D"], rg, min_size=min_size)}
    result["models"] = {name: {"train_images": r["train_images"], "groups": r["partition"]["groups"],
                               "group_names": _names(r["partition"]["groups"], data.class_names),
                               "cut": r["partition"]["cut"], "accuracy_on_features_split": r["accuracy"],
                               "error_structure": r["errors"]} for name, r in runs.items()}
    if len(runs) >= 2:
        result["stability"] = partition_stability({n: r["partition"]["groups"] for n, r in runs.items()},
                                                  data.num_classes, n_random=n_random, seed=seed)
    else:
        result["stability"] = None
    if out_dir is not None and tsne:
        out_dir = Path(out_dir)
        yn = y.numpy()
        split_word = "TEST SPLIT" if features_from == "test" else split_info["split"] + " split"
        result["tsne"] = {}
        for name, r in runs.items():
            fname = "tsne.png" if name == main_name else f"tsne_{name}.png"
            say(f"t-SNE: {fname}")
            result["tsne"][name] = tsne_plot(
                r["features"], yn, r["centroids"], r["partition"]["groups"], data.class_names, out_dir / fname,
                perplexity=perplexity, seed=seed,
                title=f"{data.name}: model trained on {name} data\nfeatures of the {split_word} "
                      f"(M = {M}; triangles = k-means centres)")
    return result
