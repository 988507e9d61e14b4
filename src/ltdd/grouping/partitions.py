"""Partitions of the classes from a class distance matrix: exhaustive / local-search max-cut, spectral clustering.

* :func:`max_cut_bipartition`: exhaustive max-cut for up to 20 classes (class 0 fixed in the first group),
  vectorised over all ``2^(N-1)`` assignments, with ranked alternatives and a minimum group size.
* :func:`max_cut_k`: a k-way max-cut heuristic for any number of classes and groups (greedy assignment + local
  search of single-class moves and swaps, several starts, deterministic given the seed).
* :func:`partition_k` (spectral clustering on ``exp(-D^2 / sigma^2)``, recursive max-cut or the k-way max-cut) and
  :func:`partition`, which dispatches.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import LtddError
from .groups import _canonical, check_groups, groups_to_labels
from .threads import _threads_for

__all__ = [
    "all_bipartition_cuts",
    "max_cut_bipartition",
    "max_cut_k",
    "partition_k",
    "partition",
    "cut_value",
    "bipartition_rank",
    "EXHAUSTIVE_MAX_CLASSES",
]

EXHAUSTIVE_MAX_CLASSES = 20


def _check_D(D) -> np.ndarray:
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise LtddError(f"distance matrix must be square, got shape {D.shape}")
    if not np.isfinite(D).all():
        raise LtddError("distance matrix has non-finite entries")
    if not np.allclose(D, D.T, rtol=1e-8, atol=1e-10 * max(1.0, float(np.abs(D).max(initial=0.0)))):
        raise LtddError("distance matrix is not symmetric")
    return (D + D.T) / 2.0


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


def _greedy_assign(D: np.ndarray, k: int, min_size: int, seeds: list[int], order: list[int]) -> np.ndarray:
    """Labels from ``k`` seed classes (one per group): every other class, in ``order``, joins the group to which it
    adds the least within-group distance (lowest group index on ties); once the classes left are just enough to
    bring every group up to ``min_size``, only groups still short are open."""
    n = len(D)
    lab = np.full(n, -1, dtype=np.int64)
    lab[seeds] = np.arange(k)
    size = np.ones(k, dtype=np.int64)
    left = n - k
    for i in order:
        if lab[i] >= 0:
            continue
        add = np.array([D[i, lab == g].sum() for g in range(k)])
        short = np.maximum(0, min_size - size)
        if left <= short.sum():
            add[short == 0] = np.inf
        g = int(np.argmin(add))
        lab[i] = g
        size[g] += 1
        left -= 1
    return lab


def _farthest_first(D: np.ndarray, k: int) -> list[int]:
    """The two most distant classes, then repeatedly the class whose nearest chosen class is farthest (lowest
    index on ties)."""
    i, j = np.unravel_index(int(np.argmax(D)), D.shape)
    seeds = [int(min(i, j)), int(max(i, j))]
    while len(seeds) < k:
        near = D[:, seeds].min(1)
        near[seeds] = -np.inf
        seeds.append(int(np.argmax(near)))
    return seeds[:k]


def _improve(D: np.ndarray, lab: np.ndarray, k: int, min_size: int, tol: float) -> np.ndarray:
    """Local search on the k-way cut: apply the best single-class move to another group while one gains (the
    source group keeps ``min_size``); when none does, the best swap of two classes in different groups; stop when
    neither gains more than ``tol``. ``D`` has a zero diagonal. Every step raises the cut by more than ``tol``, so
    the search ends; ``100 n^2`` steps at most, as a guard."""
    n = len(D)
    lab = lab.copy()
    idx = np.arange(n)
    for _ in range(100 * n * n):
        W = D @ np.eye(k)[lab]                       # W[i, g]: sum of D from class i to the members of group g
        own = W[idx, lab]
        move = own[:, None] - W                      # cut gain of moving i to group g
        move[idx, lab] = -np.inf
        size = np.bincount(lab, minlength=k)
        move[size[lab] - 1 < min_size] = -np.inf
        i, g = np.unravel_index(int(np.argmax(move)), move.shape)
        if move[i, g] > tol:
            lab[i] = g
            continue
        # swap i (group a) and j (group b): W[i,a] + W[j,b] - W[i,b] - W[j,a] + 2 D[i,j]
        swap = own[:, None] + own[None, :] - W[:, lab] - W[:, lab].T + 2.0 * D
        swap[lab[:, None] == lab[None, :]] = -np.inf
        i, j = np.unravel_index(int(np.argmax(swap)), swap.shape)
        if swap[i, j] > tol:
            lab[i], lab[j] = lab[j], lab[i]
            continue
        break
    return lab


def max_cut_k(D, k: int, *, seed: int = 0, restarts: int = 10, min_size: int = 1,
              local_search: bool = True) -> tuple[list[list[int]], float]:
    """k-way max-cut heuristic: groups that maximise the sum of ``D_ik`` over class pairs in different groups
    (equivalently, minimise the within-group sum); for ``k = 2`` the two-way max-cut objective.

    Exhaustive search is impossible beyond ~20 classes (CIFAR-100 has ~6e29 two-way splits alone), so:

    1. start 0: farthest-first seed classes (:func:`_farthest_first`), the other classes in decreasing order of
       their distance to the nearest seed, each put greedily where it adds the least within-group distance;
       starts 1..``restarts``-1: ``k`` random seed classes and a random order (``numpy.random.default_rng(seed)``);
    2. each start is improved by local search (:func:`_improve`: best single-class moves, then best swaps, until
       no step gains); ``local_search=False`` keeps the greedy assignment (for comparison);
    3. the best cut over the starts wins (the earlier start on ties).

    Every group has at least ``min_size`` classes. Returns ``(groups, cut)`` with the groups sorted and ordered
    by their smallest class.
    """
    D = _check_D(D).copy()
    np.fill_diagonal(D, 0.0)  # D_ii (the spread of class i's own centres) is in no cut; the moves must not count it
    n = len(D)
    k = int(k)
    if k < 2 or k > n:
        raise LtddError(f"number of groups k must be in 2..{n}, got {k}")
    min_size = _check_min_size(min_size, n, k)
    if int(restarts) < 1:
        raise LtddError(f"restarts must be >= 1, got {restarts}")
    tol = 1e-10 * max(1.0, float(np.abs(D).max(initial=0.0)))
    rng = np.random.default_rng(seed)
    best_lab, best_cut = None, -np.inf
    for start in range(int(restarts)):
        if start == 0:
            seeds = _farthest_first(D, k)
            order = [int(i) for i in np.argsort(-D[:, seeds].min(1), kind="stable")]
        else:
            seeds = [int(i) for i in rng.choice(n, size=k, replace=False)]
            order = [int(i) for i in rng.permutation(n)]
        lab = _greedy_assign(D, k, min_size, seeds, order)
        if local_search:
            lab = _improve(D, lab, k, min_size, tol)
        groups = [np.flatnonzero(lab == g).tolist() for g in range(k)]
        c = cut_value(D, groups)
        if c > best_cut + tol:
            best_lab, best_cut = lab, c
    groups = _canonical([np.flatnonzero(best_lab == g).tolist() for g in range(k)])
    return groups, cut_value(D, groups)


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
    * ``maxcut``: the k-way max-cut heuristic :func:`max_cut_k` (the objective of the two-way max-cut, summed over
      every pair of groups).

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
    if method == "maxcut":
        return max_cut_k(D, k, seed=seed, min_size=min_size)[0]
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
    raise LtddError(f"unknown partition method '{method}' (known: exhaustive, spectral, recursive, maxcut)")


def partition(D, k: int = 2, method: str = "auto", *, min_size: int = 1, top: int = 5, seed: int = 0) -> dict:
    """Partition dispatcher. ``auto``: exhaustive max-cut when ``k == 2`` and N <= 20; recursive (local-search)
    max-cut when ``k == 2`` and N > 20; spectral clustering when ``k > 2`` (``maxcut``: the k-way max-cut
    heuristic for any ``k``).

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
