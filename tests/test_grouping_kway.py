"""The k-way max-cut heuristic (``max_cut_k``): known answers, agreement with the exhaustive two-way max-cut, and
that its local search and restarts are what make it right."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ltdd.errors import LtddError
from ltdd.grouping import cut_value, max_cut_bipartition, max_cut_k, partition, partition_k


def _clusters(labels, within=1.0, between=10.0, jitter=0.0, seed=0):
    """Distances: ``within`` inside a cluster, ``between`` across, plus symmetric jitter; zero diagonal."""
    lab = np.asarray(labels)
    D = np.where(lab[:, None] == lab[None, :], within, between).astype(float)
    if jitter:
        J = np.random.default_rng(seed).random(D.shape) * jitter
        D += J + J.T
    np.fill_diagonal(D, 0.0)
    return D


def _matrices(n=10, count=30):
    """Random distance matrices of three kinds: Euclidean, arbitrary symmetric, and the class-distance form
    ``M sqrt(|c_i - c_k|^2 + s_i^2 + s_k^2)`` (large, nearly uniform entries and a non-zero diagonal, as the real
    grouping gives)."""
    out = []
    for t in range(count):
        rng = np.random.default_rng(t)
        if t % 3 == 0:
            X = rng.normal(size=(n, 5))
            D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
        elif t % 3 == 1:
            A = rng.random((n, n))
            D = A + A.T
        else:
            c, s = rng.normal(size=(n, 20)), 2 * rng.random(n)
            D = 5 * np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1) + s[:, None] ** 2 + s[None] ** 2)
            out.append(D)  # D_ii = 5 sqrt(2) s_i: no cut counts it
            continue
        np.fill_diagonal(D, 0.0)
        out.append(D)
    return out


def test_three_separated_clusters_are_recovered():
    labels = [0, 1, 2, 0, 1, 2, 2, 0, 1, 2]  # interleaved, sizes 3 / 3 / 4
    D = _clusters(labels, jitter=0.5)
    expect = [[0, 3, 7], [1, 4, 8], [2, 5, 6, 9]]
    for seed in (0, 1, 7):
        groups, cut = max_cut_k(D, 3, seed=seed)
        assert groups == expect
        assert cut == pytest.approx(cut_value(D, expect))
    assert partition_k(D, 3, "maxcut") == expect
    res = partition(D, 3, "maxcut")
    assert res["method"] == "maxcut" and res["groups"] == expect


def test_many_classes_five_clusters_like_cifar100():
    """100 classes in 5 clusters of 20 (shuffled indices): recovered, fast, the same for the same seed."""
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), 20))
    D = _clusters(labels, within=2.0, between=6.0, jitter=1.0)
    groups, cut = max_cut_k(D, 5, seed=3)
    assert sorted(map(sorted, groups)) == sorted(np.flatnonzero(labels == g).tolist() for g in range(5))
    assert max_cut_k(D, 5, seed=3) == (groups, cut)


def test_two_groups_reproduce_the_exhaustive_max_cut():
    """For k = 2 on 10 classes the heuristic finds the exhaustive max-cut on every matrix - and the greedy start
    alone, or one start with local search, does not, so the test would catch a heuristic without them."""
    greedy_misses = single_start_misses = 0
    for D in _matrices():
        exact, cut, _ = max_cut_bipartition(D, top=0)
        groups, c = max_cut_k(D, 2, seed=0)
        assert groups == exact and c == pytest.approx(cut)
        greedy_misses += max_cut_k(D, 2, seed=0, local_search=False)[0] != exact
        single_start_misses += max_cut_k(D, 2, seed=0, restarts=1)[0] != exact
    assert greedy_misses >= 5 and single_start_misses >= 3


def test_three_groups_reach_the_brute_force_optimum():
    """k = 3 on 8 classes: the best of all 3-way partitions (brute force over labelings)."""
    for D in _matrices(n=8, count=6):
        best = max(cut_value(D, [[i for i in range(8) if lab[i] == g] for g in range(3)])
                   for lab in itertools.product(range(3), repeat=8) if len(set(lab)) == 3 and lab[0] == 0)
        assert max_cut_k(D, 3, seed=0)[1] == pytest.approx(best)


def test_min_size_and_bad_input():
    # one far outlier: without a size floor it is a group of its own
    D = _clusters([0] * 6 + [1], within=1.0, between=50.0)
    assert max_cut_k(D, 2)[0] == [[0, 1, 2, 3, 4, 5], [6]]
    groups, _ = max_cut_k(D, 2, min_size=3)
    assert sorted(len(g) for g in groups) == [3, 4] and max_cut_k(D, 3, min_size=2)[0][0][0] == 0
    assert all(len(g) >= 2 for g in max_cut_k(D, 3, min_size=2)[0])
    with pytest.raises(LtddError, match="2..7"):
        max_cut_k(D, 8)
    with pytest.raises(LtddError, match="min_size 4 is impossible"):
        max_cut_k(D, 2, min_size=4)
    with pytest.raises(LtddError, match="restarts"):
        max_cut_k(D, 2, restarts=0)
