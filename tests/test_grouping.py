"""Grouping analysis (two-stage.md §5): distances, max-cut, partitions, stability, the full analysis and its CLI."""

from __future__ import annotations

import itertools
import json

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ltdd.errors import LtddError
from ltdd.grouping import (
    analyse_groups,
    bipartition_rank,
    check_groups,
    class_centroids,
    class_distance_closed_form,
    class_distance_matrix,
    cut_value,
    embed_features,
    error_structure,
    max_cut_bipartition,
    partition,
    partition_k,
    partition_stability,
    tsne_plot,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _block_matrix(blocks, within=1.0, between=5.0):
    n = sum(len(b) for b in blocks)
    lab = np.empty(n, dtype=int)
    for gi, b in enumerate(blocks):
        lab[b] = gi
    D = np.where(lab[:, None] == lab[None, :], within, between).astype(float)
    np.fill_diagonal(D, 0.0)
    return D


def _brute_force(D, min_size=1):
    n = len(D)
    best = []
    for r in range(min_size, n - min_size + 1):
        for g2 in itertools.combinations(range(1, n), r):
            g1 = [i for i in range(n) if i not in g2]
            if len(g1) < min_size:
                continue
            best.append((sum(D[i, k] for i in g1 for k in g2), [g1, list(g2)]))
    best.sort(key=lambda t: -t[0])
    return best


# ----------------------------------------------------------------------------------------------------------------
# distances


@pytest.mark.parametrize("sizes", [(5, 5, 5, 5), (1, 3, 5, 2, 4)])
def test_closed_form_distance_equals_pairwise_definition(sizes):
    rng = np.random.default_rng(1)
    cents = [rng.normal(size=(m, 6)) * rng.uniform(0.5, 2) + rng.normal(size=6) for m in sizes]
    pair = class_distance_matrix(cents)
    closed = class_distance_closed_form(cents)
    np.testing.assert_allclose(pair, closed, rtol=1e-10, atol=1e-10)
    # against the literal double sum
    i, k = 0, 1
    direct = np.sqrt(sum(((a - b) ** 2).sum() for a in cents[i] for b in cents[k]))
    assert pair[i, k] == pytest.approx(direct)
    if len(set(sizes)) == 1:  # equal M: D = M sqrt(||m_i - m_k||^2 + s_i^2 + s_k^2)
        M = sizes[0]
        m = [c.mean(0) for c in cents]
        s2 = [((c - c.mean(0)) ** 2).sum(1).mean() for c in cents]
        assert pair[0, 1] == pytest.approx(M * np.sqrt(((m[0] - m[1]) ** 2).sum() + s2[0] + s2[1]))


def test_class_centroids_uses_min_M_n_and_names_empty_class():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(size=(30, 4)), rng.normal(size=(2, 4)) + 5])
    labels = np.array([0] * 30 + [1] * 2)
    cents = class_centroids(feats, labels, 2, M=5, seed=0, n_init=2)
    assert [len(c) for c in cents] == [5, 2]
    np.testing.assert_allclose(np.sort(cents[1], 0), np.sort(feats[30:], 0))
    with pytest.raises(LtddError, match="class 2"):
        class_centroids(feats, labels, 3, M=5)


# ----------------------------------------------------------------------------------------------------------------
# max-cut


def test_max_cut_finds_two_obvious_blocks():
    D = _block_matrix([[0, 2, 5, 7], [1, 3, 4, 6]])
    groups, cut, alts = max_cut_bipartition(D, top=5)
    assert groups == [[0, 2, 5, 7], [1, 3, 4, 6]]
    assert cut == pytest.approx(16 * 5.0)
    assert len(alts) == 5
    cuts = [cut] + [a["cut"] for a in alts]
    assert cuts == sorted(cuts, reverse=True)  # ranked
    assert [a["rank"] for a in alts] == [2, 3, 4, 5, 6]
    assert all(a["gap"] == pytest.approx(cut - a["cut"]) for a in alts)
    assert all(0 in a["groups"][0] for a in alts)  # class 0 fixed in G1


def test_max_cut_hand_made_5x5_matches_brute_force():
    D = np.array([[0, 3, 1, 7, 2],
                  [3, 0, 4, 1, 6],
                  [1, 4, 0, 5, 2],
                  [7, 1, 5, 0, 3],
                  [2, 6, 2, 3, 0]], dtype=float)
    groups, cut, alts = max_cut_bipartition(D, top=3)
    # by hand: {0,2,4} | {1,3}: (3+7) + (4+5) + (6+3) = 28; the runners-up tie at 23: {0,1,2} | {3,4}
    # (7+2 + 1+6 + 5+2) and {0,2} | {1,3,4} (3+7+2 + 4+5+2); the tie keeps the smaller mask first
    assert groups == [[0, 2, 4], [1, 3]] and cut == pytest.approx(28.0)
    assert [a["groups"] for a in alts[:2]] == [[[0, 1, 2], [3, 4]], [[0, 2], [1, 3, 4]]]
    assert [a["cut"] for a in alts[:2]] == pytest.approx([23.0, 23.0]) and alts[0]["gap"] == pytest.approx(5.0)
    bf = _brute_force(D)
    assert cut == pytest.approx(bf[0][0])
    assert [a["cut"] for a in alts] == pytest.approx([c for c, _ in bf[1:4]])
    assert cut_value(D, [[0, 1, 2], [3, 4]]) == pytest.approx(23.0)
    assert bipartition_rank(D, groups)["rank"] == 1 and bipartition_rank(D, groups)["of"] == 15
    assert bipartition_rank(D, [[3, 4], [0, 1, 2]])["rank"] == 2


def test_max_cut_respects_min_size():
    # class 4 is an outlier: unconstrained max-cut isolates it, min_size=2 must not
    D = _block_matrix([[0, 1, 2, 3], [4]], within=1.0, between=10.0)
    groups, cut, _ = max_cut_bipartition(D)
    assert groups == [[0, 1, 2, 3], [4]]
    groups2, cut2, alts2 = max_cut_bipartition(D, min_size=2, top=20)
    assert min(len(g) for g in groups2) >= 2
    assert all(min(len(g) for g in a["groups"]) >= 2 for a in alts2)
    assert cut2 == pytest.approx(_brute_force(D, 2)[0][0])
    assert len(alts2) == len(_brute_force(D, 2)) - 1
    with pytest.raises(LtddError, match="min_size"):
        max_cut_bipartition(D, min_size=3)


def test_max_cut_vectorised_matches_brute_force_on_random_matrix():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(9, 3))
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    groups, cut, alts = max_cut_bipartition(D, top=4)
    bf = _brute_force(D)
    assert cut == pytest.approx(bf[0][0])
    assert sorted(map(sorted, groups)) == sorted(map(sorted, bf[0][1]))


def test_partition_k_and_dispatch():
    blocks = [[0, 4, 8], [1, 5, 9, 2], [3, 6, 7]]
    D = _block_matrix(blocks, within=1.0, between=6.0)
    expect = sorted(sorted(b) for b in blocks)
    assert partition_k(D, 3, "spectral") == expect
    assert partition_k(D, 3, "recursive") == expect
    res = partition(D, 3)
    assert res["method"] == "spectral" and res["groups"] == expect
    assert res["cut"] == pytest.approx(cut_value(D, expect))
    assert partition(D, 2)["method"] == "exhaustive"
    # more than 20 classes: auto uses the recursive (local-search) max-cut
    big = _block_matrix([list(range(0, 24, 2)), list(range(1, 24, 2))])
    res = partition(big, 2)
    assert res["method"] == "recursive" and res["groups"] == [list(range(0, 24, 2)), list(range(1, 24, 2))]
    with pytest.raises(LtddError, match="exhaustive"):
        max_cut_bipartition(big)
    with pytest.raises(LtddError, match="unknown partition method"):
        partition_k(D, 2, "magic")


def test_check_groups_errors():
    assert check_groups([[0, 2], [1]], 3) == [[0, 2], [1]]
    with pytest.raises(LtddError, match="class 1 appears"):
        check_groups([[0, 1], [1, 2]], 3)
    with pytest.raises(LtddError, match=r"classes \[2\] are in no group"):
        check_groups([[0], [1]], 3)
    with pytest.raises(LtddError, match="only 3 classes"):
        check_groups([[0, 1], [2, 3]], 3)


# ----------------------------------------------------------------------------------------------------------------
# stability and error structure


def test_stability_identical_partitions_and_random_control():
    parts = {"balanced": [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]], "long_tailed": [[3, 4, 5, 6, 7], [0, 1, 2, 8, 9]],
             "distilled": [[9, 8, 2, 1, 0], [7, 6, 5, 4, 3]]}
    st = partition_stability(parts, 10, n_random=500, seed=0)
    assert st["mean_ari"] == pytest.approx(1.0)
    assert all(p["ari"] == pytest.approx(1.0) for p in st["pairwise"])
    assert abs(st["random"]["mean"]) < 0.05  # the control sits near 0
    assert st["frac_random_at_least"] < 0.02 and st["p_value"] < 0.02
    assert len(st["identical"]) == 3
    # two unrelated partitions look like the control
    st2 = partition_stability([[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], [[0, 5, 1, 6, 2], [7, 3, 8, 4, 9]]], 10,
                              n_random=300)
    assert st2["mean_ari"] < 0.2 and st2["p_value"] > 0.05
    assert partition_stability([[[0], [1]]], 2)["mean_ari"] is None


def test_fast_ari_matches_sklearn():
    from sklearn.metrics import adjusted_rand_score

    from ltdd.grouping import adjusted_rand_batch

    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, size=(200, 10))
    b = rng.integers(0, 2, size=(200, 10))
    b[:5] = a[:5]  # identical rows
    a[5], b[5] = 0, 0  # both trivial
    ours = adjusted_rand_batch(a, b)
    ref = [adjusted_rand_score(x, y) for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_error_structure():
    groups = [[0, 1], [2, 3]]
    y = np.array([0, 0, 1, 2, 3, 3])
    p = np.array([1, 0, 0, 3, 0, 3])  # errors: 0->1 (in), 1->0 (in), 2->3 (in), 3->0 (out)
    es = error_structure(y, p, groups, 4)
    assert es["errors"] == 4 and es["within_group_error_fraction"] == pytest.approx(0.75)
    assert es["chance"] == pytest.approx(1 / 3)
    assert es["group_accuracy"] == pytest.approx(5 / 6)


# ----------------------------------------------------------------------------------------------------------------
# features, t-SNE, the full analysis


class _Lin(torch.nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.body = torch.nn.Linear(d, 3)
        self.classifier = torch.nn.Linear(3, c)

    def embed(self, x):
        return self.body(x.flatten(1))

    def forward(self, x):
        return self.classifier(self.embed(x))


def test_embed_features_batched_eval_mode():
    m = _Lin(4, 2).train()
    x = torch.randn(10, 4)
    f = embed_features(m, x, batch_size=3)
    assert f.shape == (10, 3) and f.dtype == np.float32 and m.training
    np.testing.assert_allclose(f, m.embed(x).detach().numpy(), rtol=1e-6)


def test_tsne_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 15)
    feats = rng.normal(size=(45, 8)) + labels[:, None] * 4.0
    cents = class_centroids(feats, labels, 3, M=2, n_init=2)
    info = tsne_plot(feats, labels, cents, [[0, 1], [2]], ["a", "b", "c"], tmp_path / "t.png", perplexity=50)
    data = (tmp_path / "t.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and info["centres"] == 6 and info["perplexity"] < 50


def _tiny_grouped_data():
    """4 classes in 2 obvious pairs ({0,1} dark patterns, {2,3} bright ones), long-tailed train, balanced probe."""
    import types

    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 1, 6, 6, generator=g) * 3
    delta = torch.randn(4, 1, 6, 6, generator=g) * 0.6
    means = torch.stack([base[0] + delta[0], base[0] + delta[1], base[1] + delta[2], base[1] + delta[3]])

    def draw(counts):
        y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
        return means[y] + 0.3 * torch.randn(len(y), 1, 6, 6, generator=g), y

    tx, ty = draw([30, 20, 12, 8])
    px, py = draw([0, 10, 10, 10])  # class 0 has no probe image: topped up from train
    sx, sy = draw([10, 10, 10, 10])
    return types.SimpleNamespace(name="tiny", class_names=["a", "b", "c", "d"], num_classes=4, channels=1,
                                 im_size=(6, 6), train_x=tx, train_y=ty, test_x=sx, test_y=sy, probe_x=px, probe_y=py,
                                 train_counts=[30, 20, 12, 8], num_train=70)


def test_analyse_groups_tiny(tmp_path):
    from ltdd.config import ModelConfig, TrainConfig

    data = _tiny_grouped_data()
    tc = TrainConfig(epochs=15, lr=0.05, batch_size=32, schedule="constant", dsa=False)
    res = analyse_groups(data, model_cfg=ModelConfig("convnet", {"width": 8, "depth": 1}), train_cfg=tc, M=3,
                         seeds=2, balanced=True, training_sets={"distilled": (data.test_x, data.test_y)},
                         references={"pairs": [[0, 1], [2, 3]]}, n_random=100, out_dir=tmp_path, perplexity=5)
    assert res["features_split"] == "probe" and res["supplemented_from_train"] == [0]
    assert res["groups"] == [[0, 1], [2, 3]]
    assert res["references"]["pairs"]["rank"] == 1
    assert set(res["models"]) == {"long_tailed", "long_tailed_seed1", "balanced_resampled", "distilled"}
    assert res["stability"]["mean_ari"] == pytest.approx(1.0)
    assert (tmp_path / "tsne.png").is_file() and (tmp_path / "tsne_distilled.png").is_file()
    json.dumps(res)  # JSON-able
    res_t = analyse_groups(data, model_cfg=ModelConfig("convnet", {"width": 8, "depth": 1}), train_cfg=tc, M=3,
                           features_from="test", balanced=False, tsne=False)
    assert res_t["features_split"] == "test" and "TEST SPLIT" in res_t["warning"] and res_t["stability"] is None


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _cli():
    from ltdd.cli import LtddGroup
    from ltdd.cli.analysis_cmds import register

    @click.group(cls=LtddGroup)
    def root():
        pass

    register(root)
    return root


def test_groups_cli_digits(tmp_path):
    out = tmp_path / "g"
    r = CliRunner().invoke(_cli(), ["groups", "--dataset", "digits", "--imbalance-factor", "10", "--no-zca",
                                    "--model-epochs", "2", "--set", "model.args.width=8", "--n-random", "50",
                                    "--M", "3", "--no-tsne", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "partition (exhaustive" in r.output and "mean ARI" in r.output and "frequency_halves" in r.output
    res = json.loads((out / "groups.json").read_text())
    assert sorted(c for g in res["groups"] for c in g) == list(range(10))
    assert res["features_split"] == "probe" and len(res["alternatives"]) == 5
    r = CliRunner().invoke(_cli(), ["groups", "--dataset", "digits", "--distilled", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "distilled set not found" in r.output
