"""Two-stage classification (two-stage.md §6, §10): routing, re-indexing, prior correction, training, ablation,
CLI."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ltdd.config import DataConfig, ModelConfig, TrainConfig, to_dict
from ltdd.errors import LtddError
from ltdd.synset import SyntheticSet
from ltdd.two_stage import (
    TwoStageClassifier,
    evaluate_two_stage,
    parse_groups,
    run_ablation,
    train_two_stage,
)


pytestmark = pytest.mark.usefixtures("one_thread")


class Lookup(nn.Module):
    """A fixed "model": input x[:, 0] is a row index into a table of logits."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))

    def forward(self, x):
        return self.table[x[:, 0].long()]


# groups deliberately non-contiguous, so that local -> global re-indexing matters
GROUPS = [[0, 3], [1, 2, 4]]
GROUP_LOGITS = [[4.0, 0.0],    # 0: clearly group 0
                [0.0, 3.0],    # 1: clearly group 1
                [0.1, 0.0],    # 2: borderline, group 0 by a hair
                [0.2, 0.0]]    # 3: group 0, but unsure
LOCAL0 = [[0.1, 0.9],          # group-0 classes (0, 3)
          [2.0, 0.0],
          [3.0, 0.0],
          [0.01, 0.0]]         # 3: no idea inside group 0
LOCAL1 = [[0.0, 0.0, 4.0],     # group-1 classes (1, 2, 4)
          [0.0, 5.0, 1.0],
          [0.0, 0.0, 2.0],
          [10.0, 0.0, 0.0]]    # 3: sure it is class 1, if in group 1


def _clf(priors=None):
    return TwoStageClassifier(Lookup(GROUP_LOGITS), [Lookup(LOCAL0), Lookup(LOCAL1)], GROUPS, 5, group_priors=priors)


X = torch.arange(4, dtype=torch.float32)[:, None]


def _soft_reference(tau=0.0, priors=None):
    g = np.asarray(GROUP_LOGITS)
    if tau:
        g = g - tau * np.log(np.asarray(priors) / np.sum(priors))
    pg = np.exp(g) / np.exp(g).sum(1, keepdims=True)
    out = []
    for i in range(4):
        score = np.zeros(5)
        for gi, (tab, members) in enumerate(zip((LOCAL0, LOCAL1), GROUPS)):
            z = np.asarray(tab[i])
            p = np.exp(z) / np.exp(z).sum()
            score[members] = pg[i, gi] * p
        out.append(int(score.argmax()))
    return out


def test_hard_routing_and_reindexing():
    clf = _clf()
    assert clf.group_predictions(X).tolist() == [0, 1, 0, 0]
    # 0: group 0, local 1 -> class 3; 1: group 1, local 1 -> class 2; 2: group 0, local 0 -> 0; 3: group 0 -> 0
    assert clf.predict(X, "hard").tolist() == [3, 2, 0, 0]


def test_soft_routing_uses_the_product_of_probabilities():
    clf = _clf()
    soft = clf.predict(X, "soft").tolist()
    assert soft == _soft_reference()
    assert soft[3] == 1  # p(g1) p(1|g1) ~ 0.45 beats p(g0) p(0|g0) ~ 0.28: soft routing escapes the unsure group
    scores = clf.class_scores(X)
    np.testing.assert_allclose(torch.logsumexp(scores, 1).numpy(), 0.0, atol=1e-5)  # a distribution over classes


def test_group_prior_correction_flips_the_borderline_case():
    priors = [0.9, 0.1]  # group 0 is the head-heavy group
    clf = _clf(priors)
    assert clf.predict(X, "hard", group_prior_tau=1.0).tolist() == [3, 2, 4, 1]
    # sample 2: 0.1 - log 0.9 = 0.205 < 0 - log 0.1 = 2.303 -> group 1 -> local argmax 2 -> class 4
    assert clf.group_predictions(X, group_prior_tau=1.0).tolist() == [0, 1, 1, 1]
    assert clf.predict(X, "soft", group_prior_tau=1.0).tolist() == _soft_reference(1.0, priors)
    # explicit priors override the stored ones; no priors at all is an error
    assert clf.predict(X, "hard", group_prior_tau=1.0, group_priors=[0.5, 0.5]).tolist() == [3, 2, 0, 0]
    with pytest.raises(LtddError, match="group priors"):
        _clf().predict(X, "hard", group_prior_tau=1.0)
    with pytest.raises(LtddError, match="routing"):
        clf.predict(X, "fuzzy")


def test_single_class_group_needs_no_classifier():
    clf = TwoStageClassifier(Lookup(GROUP_LOGITS), [Lookup([[0.0, 1.0, 0.0]] * 4), None], [[0, 1, 2], [3]], 4)
    assert clf.predict(X, "hard").tolist() == [1, 3, 1, 1]
    assert clf.predict(X, "soft").tolist()[1] == 3


def test_evaluate_two_stage_metrics():
    import types

    clf = _clf([0.9, 0.1])
    data = types.SimpleNamespace(test_x=X, test_y=torch.tensor([3, 2, 4, 1]), num_classes=5,
                                 groups={"head": [0, 1], "tail": [2, 3, 4]})
    m = evaluate_two_stage(clf, data, "hard", train_images=123, variants=True)
    assert m.accuracy == pytest.approx(0.5)  # hard: [3, 2, 0, 0]
    assert m.extra["group_accuracy"] == pytest.approx(0.5) and m.extra["train_images"] == 123
    assert m.extra["routing"] == "hard" and m.extra["within_group_accuracy"] == pytest.approx(1.0)
    assert m.extra["acc_hard_tau1"] == pytest.approx(1.0) and m.extra["acc_hard"] == pytest.approx(0.5)


def test_parse_groups():
    names = ["air", "auto", "bird", "cat"]
    assert parse_groups("0,1;2,3", 4) == [[0, 1], [2, 3]]
    assert parse_groups("air, auto ; bird,3", 4, names) == [[0, 1], [2, 3]]
    with pytest.raises(LtddError, match="'dog' in group 2"):
        parse_groups("0,1;dog,3", 4, names)
    with pytest.raises(LtddError, match=r"classes \[3\] are in no group"):
        parse_groups("0,1;2", 4)
    with pytest.raises(LtddError, match="class 1 appears"):
        parse_groups("0,1;1,2,3", 4)
    with pytest.raises(LtddError, match="group 2 is empty"):
        parse_groups("0,1,2,3;", 4)


# ----------------------------------------------------------------------------------------------------------------
# training on real data


@pytest.fixture(scope="module")
def digits():
    from ltdd.data import prepare_data

    cfg = DataConfig(dataset="digits", zca=False, image_size=16, imbalance_factor=10)
    return cfg, prepare_data(cfg, cache_dir=False)


def _synthetic(data, cfg, per_class=5, soft=False, seed=0):
    """A 'distilled' set of random real digits images (balanced), optionally with soft-label logits."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(data.train_y == c).flatten()[torch.randperm(int((data.train_y == c).sum()),
                                                                               generator=g)[:per_class]]
                     for c in range(data.num_classes)])
    labels = data.train_y[idx]
    soft_labels = 4.0 * nn.functional.one_hot(labels, data.num_classes).float() if soft else None
    return SyntheticSet(data.train_x[idx].clone(), labels.clone(), soft_labels, None, {"data": to_dict(cfg)})


FAST = TrainConfig(epochs=10, lr=0.01, batch_size=64, schedule="constant", dsa=False)
SMALL = ModelConfig("convnet", {"width": 16})


@pytest.mark.parametrize("soft", [False, True])
def test_train_two_stage_learns_digits(digits, soft):
    cfg, data = digits
    syn = _synthetic(data, cfg, soft=soft)
    groups = [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]]
    clf, info = train_two_stage(data, groups, "real", "distilled", syn, SMALL, FAST, seed=0)
    assert info["train_images"] == data.num_train + len(syn.labels)
    assert info["stage2_images_per_group"] == [25, 25]
    assert info["group_priors"][0] == pytest.approx(sum(data.train_counts[c] for c in groups[0]) / data.num_train)
    assert clf.class_models[0].classifier.out_features == 5 and clf.group_model.classifier.out_features == 2
    m = evaluate_two_stage(clf, data, "hard", train_images=info["train_images"])
    assert m.extra["group_accuracy"] > 0.8
    assert m.accuracy > 0.6  # chance is 0.1
    assert evaluate_two_stage(clf, data, "soft").accuracy > 0.6


def test_train_two_stage_distilled_stage1_with_soft_labels(digits):
    cfg, data = digits
    syn = _synthetic(data, cfg, soft=True)
    clf, info = train_two_stage(data, [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]], "distilled", "distilled", syn, SMALL,
                                FAST, seed=1)
    assert info["train_images"] == 2 * len(syn.labels) and info["group_priors"] == pytest.approx([0.5, 0.5])
    assert evaluate_two_stage(clf, data).accuracy > 0.4
    with pytest.raises(LtddError, match="no distilled set"):
        train_two_stage(data, [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]], "real", "distilled", None, SMALL, FAST)


def test_run_ablation_rows_and_computed_groups(tiny_data):
    syn = SyntheticSet(tiny_data.test_x[::2].clone(), tiny_data.test_y[::2].clone())
    tiny = ModelConfig("convnet", {"width": 4, "depth": 1})
    tc = TrainConfig(epochs=3, lr=0.01, batch_size=16, schedule="constant", dsa=False)
    seen = []

    def groups_fn(model):
        seen.append(model)
        return [[0, 2], [1]]

    res = run_ablation(tiny_data, syn, None, model_cfg=tiny, train_cfg=tc, runs=2, groups_fn=groups_fn,
                       routing="soft", group_prior_tau=0.5)
    assert len(seen) == 1 and res["groups"] == [[0, 2], [1]] and res["groups_source"].startswith("computed")
    rows = res["rows"]
    assert list(rows) == ["original_flat", "distilled_flat", "original+original", "distilled+distilled",
                          "original+distilled"]
    n, s = len(tiny_data.train_y), len(syn.labels)
    assert [rows[r]["train_images"] for r in rows] == [n, s, 2 * n, 2 * s, n + s]
    for r in rows.values():
        assert r["summary"]["runs"] == 2 and "group_accuracy" in r["summary"]
    two = rows["original+distilled"]["summary"]
    assert {"acc_hard", "acc_soft", "acc_hard_tau0.5", "acc_soft_tau0.5"} <= set(two)
    assert rows["original+distilled"]["runs"][0]["extra"]["routing"] == "soft"
    json.dumps(res)
    with pytest.raises(LtddError, match="unknown ablation row"):
        run_ablation(tiny_data, syn, [[0, 2], [1]], rows=["nope"])


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


def test_two_stage_cli(digits, tmp_path):
    cfg, data = digits
    path = _synthetic(data, cfg).save(tmp_path / "set")
    out = tmp_path / "out"
    args = ["two-stage", "--distilled", str(tmp_path / "set"), "--protocol", "dc", "--set", "train.epochs=2",
            "--set", "model.args.width=8", "--runs", "1", "--out", str(out),
            "--rows", "original_flat,original+distilled"]
    r = CliRunner().invoke(_cli(), args + ["--groups", "0,1,2,8,9;3,4,5,6,7", "--routing", "soft",
                                           "--group-prior-tau", "1"])
    assert r.exit_code == 0, r.output
    assert "Original + Distilled" in r.output and "head/med/tail" in r.output and "worst class" in r.output
    res = json.loads((out / "two_stage.json").read_text())
    assert res["groups"] == [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]] and res["routing"] == "soft"
    assert res["rows"]["original+distilled"]["train_images"] == data.num_train + 50
    # computed groups (probe split, max-cut) by default
    r = CliRunner().invoke(_cli(), args + ["--M", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["rows"]["original_flat"]["train_images"] == data.num_train
    res = json.loads((out / "two_stage.json").read_text())
    assert res["grouping"]["method"] == "exhaustive" and res["groups_source"].startswith("computed")
    # user errors: one line, exit code 2
    for extra, msg in [(["--groups", "0,1,2;3,4,x"], "'x' in group 2"),
                       (["--groups", "0,1,2,3,4;5,6,7,8"], "classes [9] are in no group"),
                       (["--groups", "0,1,2,3,4;4,5,6,7,8,9"], "class 4 appears")]:
        r = CliRunner().invoke(_cli(), args + extra)
        assert r.exit_code == 2 and msg in r.output, r.output
    r = CliRunner().invoke(_cli(), ["two-stage", "--distilled", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "distilled set not found" in r.output
    assert path.is_file()


def test_two_stage_cli_num_groups(digits, tmp_path):
    """--num-groups K: K computed groups by the k-way max-cut heuristic (the exhaustive max-cut only gives two)."""
    cfg, data = digits
    _synthetic(data, cfg).save(tmp_path / "set")
    out = tmp_path / "out"
    args = ["two-stage", "--distilled", str(tmp_path / "set"), "--protocol", "dc", "--set", "train.epochs=1",
            "--set", "model.args.width=4", "--runs", "1", "--out", str(out), "--rows", "original+distilled",
            "--M", "3"]
    r = CliRunner().invoke(_cli(), args + ["--num-groups", "3"])
    assert r.exit_code == 0, r.output
    assert "k-way max-cut heuristic into 3 groups" in r.output
    res = json.loads((out / "two_stage.json").read_text())
    g = res["grouping"]
    assert g["method"] == "maxcut" and len(res["groups"]) == 3
    assert sorted(c for grp in res["groups"] for c in grp) == list(range(10))
    from ltdd.grouping import cut_value, max_cut_k

    assert (res["groups"], g["cut"]) == max_cut_k(np.asarray(g["distance_matrix"]), 3, seed=0)
    assert res["rows"]["original+distilled"]["train_images"] == data.num_train + 50
    # two groups of ten classes stay the exhaustive max-cut
    r = CliRunner().invoke(_cli(), args + ["--num-groups", "2", "--json"])
    assert r.exit_code == 0, r.output
    g = json.loads(r.output)["grouping"]
    assert g["method"] == "exhaustive" and g["cut"] == pytest.approx(cut_value(g["distance_matrix"], g["groups"]))
    for extra, msg in [(["--num-groups", "3", "--groups", "0,1,2,3,4;5,6,7,8,9"], "exclude each other"),
                       (["--num-groups", "1"], "--num-groups must be >= 2"),
                       (["--num-groups", "11"], "has only 10 classes")]:
        r = CliRunner().invoke(_cli(), args + extra)
        assert r.exit_code == 2 and msg in r.output, r.output
