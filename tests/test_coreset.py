"""Coresets: herding and K-center on constructed features (known answers), random selection, the n_c < IPC
policy, feature networks (random / expert store), one-shot runs through the shared loop, presets."""

from __future__ import annotations

import pytest
import torch

from ltdd.config import DistillConfig, RunConfig, load_preset
from ltdd.distill import distill, make_distiller
from ltdd.distill.coreset import herding_select, kcenter_select
from ltdd.distill.gradient_matching import model_config, seeded_model
from ltdd.errors import LtddError
from ltdd.synset import SyntheticSet

TINY = {"name": "convnet", "args": {"width": 4, "depth": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_herding_known_answer():
    # 1-D features 0, 10, 4, 6, 5.5: mean 5.1. Step 1 takes 5.5 (closest to 5.1); step 2 needs x near
    # 2 * 5.1 - 5.5 = 4.7 -> 4; step 3 needs 3 * 5.1 - 9.5 = 5.8 -> 6; step 4 needs 4.9 -> 0 (not 10); then 10.
    f = torch.tensor([[0.0], [10.0], [4.0], [6.0], [5.5]])
    assert herding_select(f, 5) == [4, 2, 3, 0, 1]
    assert herding_select(f, 2) == [4, 2]  # not "the 2 closest to the mean" (that would be [4, 3])
    assert herding_select(f, 9) == [4, 2, 3, 0, 1]  # k > n: everything once
    assert herding_select(f[:0], 3) == []
    # 2-D: two tight pairs around (+-1, 0) - herding alternates between them to keep the running mean at 0
    g = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1], [0.2, 0.0]])
    sel = herding_select(g, 3)
    assert sel[0] == 4 and {sel[1] // 2, sel[2] // 2} == {0, 1}


def test_kcenter_known_answer():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 10.0], [5.0, 5.0], [0.5, 0.2]])
    # start: closest to the mean (2.75, 2.53) is (1, 0); farthest from it (0, 10); then (10, 0) (81 vs 41 for
    # (5, 5)); then (5, 5); then (0, 0) (1 vs 0.29)
    assert kcenter_select(pts, 6) == [1, 3, 2, 4, 0, 5]
    assert kcenter_select(pts, 3) == [1, 3, 2]
    # a given first centre; (10, 0) and (0, 10) tie at 100 -> the lower index
    assert kcenter_select(pts, 3, first=0) == [0, 2, 3]
    # duplicated points: never the same row twice
    dup = torch.tensor([[1.0, 1.0]] * 3)
    assert sorted(kcenter_select(dup, 3)) == [0, 1, 2]


def _cfg(method, ipc=4, **kw):
    opts = kw.pop("options", {"model": TINY} if method != "random" else {})
    return DistillConfig(method=method, ipc=ipc, options=opts, **kw)


def _check_real_and_class(syn_images, labels, sources, data):
    for img, y, s in zip(syn_images, labels.tolist(), sources):
        assert s >= 0 and int(data.train_y[s]) == y
        assert torch.equal(img, data.train_x[s])


def test_random_picks_ipc_real_images_and_duplicates_short_class(tiny_data):
    d = make_distiller(_cfg("random", ipc=4), tiny_data)  # classes have 12, 6, 3 images
    d.initialise()
    syn = d.synthetic_set()
    assert syn.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert syn.soft_labels is None and syn.lr is None
    _check_real_and_class(syn.images, syn.labels, d.sources, tiny_data)
    assert len(set(d.sources[:4])) == 4 and len(set(d.sources[4:8])) == 4  # distinct when the class has enough
    short = d.sources[8:]
    assert len(set(short)) == 3 and short[3] == short[0]  # all 3 images, then cyclic duplicates
    # no duplication: the missing slot is noise
    d2 = make_distiller(_cfg("random", ipc=4, duplicate=False), tiny_data)
    d2.initialise()
    assert d2.sources[11] == -1 and len(set(d2.sources[8:11])) == 3
    # the seed decides the pick
    d3 = make_distiller(_cfg("random", ipc=4, seed=1), tiny_data)
    d3.initialise()
    assert d3.sources != d.sources


@pytest.mark.parametrize("method,select", [("herding", herding_select), ("kcenter", kcenter_select)])
def test_feature_coresets_use_their_selection(tiny_data, method, select):
    d = make_distiller(_cfg(method, ipc=4), tiny_data)
    d.initialise()
    # the same random feature network, rebuilt from the first seed the run's generator draws
    g = torch.Generator().manual_seed(0)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    net = seeded_model(model_config({"model": TINY}), tiny_data, seed).eval()
    for c in range(3):
        idx = torch.nonzero(tiny_data.train_y == c).flatten()
        with torch.no_grad():
            feats = net.embed(tiny_data.train_x[idx])
        want = idx[torch.tensor(select(feats, 4))].tolist()
        got = d.sources[4 * c:4 * c + 4]
        if len(idx) >= 4:
            assert got == want
        else:  # the short class: its 3 images in selection order, then cyclic duplicates
            assert got == want + want[:1]
    syn = d.synthetic_set()
    _check_real_and_class(syn.images, syn.labels, d.sources, tiny_data)


def test_feature_model_from_expert_store(tiny_data, tiny_store):
    d = make_distiller(_cfg("herding", options={"feature_model": str(tiny_store.root)}), tiny_data)
    d.initialise()
    _check_real_and_class(d.images, d.labels, d.sources, tiny_data)
    d2 = make_distiller(_cfg("kcenter", options={"feature_model": "experts", "feature_norm": "l2"}), tiny_data,
                        experts_dir=tiny_store.root)
    d2.initialise()
    _check_real_and_class(d2.images, d2.labels, d2.sources, tiny_data)
    with pytest.raises(LtddError, match="--experts"):
        make_distiller(_cfg("kcenter", options={"feature_model": "experts"}), tiny_data).initialise()


def test_bad_options_are_refused(tiny_data):
    with pytest.raises(LtddError, match="feature_norm"):
        make_distiller(_cfg("herding", options={"feature_norm": "l1"}), tiny_data)
    with pytest.raises(LtddError, match="unknown option"):
        make_distiller(_cfg("random", options={"model": TINY}), tiny_data)


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_one_shot_run_through_the_shared_loop(tmp_path, tiny_data, method):
    cfg = RunConfig(distill=_cfg(method, ipc=2), protocol="cpu")
    res = distill(cfg, tiny_data, tmp_path / method, progress=False, evaluate=False)
    assert res["iterations"] == 0
    syn = SyntheticSet.load(tmp_path / method)
    assert syn.images.shape == (6, 1, 8, 8) and syn.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert (tmp_path / method / "grid.png").exists()
    assert (tmp_path / method / "log.jsonl").read_text() == ""
    again = distill(cfg, tiny_data, tmp_path / (method + "2"), progress=False, evaluate=False)
    assert again["iterations"] == 0
    assert torch.equal(SyntheticSet.load(tmp_path / (method + "2")).images, syn.images)  # seeded


@pytest.mark.parametrize("name", ["random", "herding", "kcenter"])
def test_presets(name, tiny_data):
    for profile in (None, "cpu"):
        cfg = load_preset(name, profile)
        assert cfg.distill.method == name and cfg.distill.ipc == 10 and cfg.data.imbalance_factor == 100
        make_distiller(cfg.distill, tiny_data)  # every option of the preset is known to the method
        if profile == "cpu":
            assert cfg.protocol == "cpu"
