"""DC / DSA gradient matching: the layer-wise cosine distance (by hand), 1-D parameters left out, DC's loop table,
Siamese augmentation, the objective going down, presets, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ltdd.config import DistillConfig, RunConfig, load_preset
from ltdd.distill import distill, make_distiller
from ltdd.distill.gradient_matching import (dc_loops, gradient_match_distance, layer_distance, matched_parameters,
                                            seeded_model)
from ltdd.errors import LtddError
from ltdd.models import create_model
from ltdd.synset import SyntheticSet

TINY = {"name": "convnet", "args": {"width": 4, "depth": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _dc(data, method="dc", dsa=False, **kw):
    opts = {"model": TINY, "outer_loop": 2, "inner_loop": 2, "batch_real": 8, **kw.pop("options", {})}
    base = dict(method=method, ipc=2, iterations=4, image_init="noise", lr_img=0.1, dsa=dsa,
                dsa_strategy="color_crop_cutout_flip_scale_rotate", checkpoint_every=2, options=opts)
    base.update(kw)
    return DistillConfig(**base)


def test_layer_distance_by_hand():
    # a 2-unit layer: rows (3, 4) vs (4, 3) -> cos 24/25; rows (1, 0) vs (-1, 0) -> cos -1
    g_syn = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    g_real = torch.tensor([[4.0, 3.0], [-1.0, 0.0]])
    expected = (1 - 24 / 25) + (1 - (-1))  # 2.04
    assert layer_distance(g_syn, g_real, eps=0.0).item() == pytest.approx(expected, abs=1e-6)
    # the default guard eps = 1e-6 sits in the denominator, as in DC
    with_eps = (1 - 24 / (25 + 1e-6)) + (1 + 1 / (1 + 1e-6))
    assert layer_distance(g_syn, g_real).item() == pytest.approx(with_eps, abs=1e-6)
    # a conv weight (out 2, in 1, 1x2 kernel) is reshaped to (out, -1): the same rows, the same value
    assert layer_distance(g_syn.view(2, 1, 1, 2), g_real.view(2, 1, 1, 2), eps=0.0).item() == \
        pytest.approx(expected, abs=1e-6)
    # it is a per-output-unit cosine, not one cosine of the flattened tensors
    flat_cos = (g_syn.flatten() @ g_real.flatten()) / (g_syn.norm() * g_real.norm())
    assert abs(expected - (1 - flat_cos.item())) > 0.5
    # layers add up
    other = (torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, -1.0]]))  # cos 0 -> 1
    total = gradient_match_distance([g_syn, other[0]], [g_real, other[1]], eps=0.0)
    assert total.item() == pytest.approx(expected + 1.0, abs=1e-6)


def test_one_dimensional_parameters_are_left_out():
    g = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    b_syn, b_real = torch.tensor([1.0, -5.0]), torch.tensor([-3.0, 2.0])  # a bias pair that disagrees completely
    assert layer_distance(b_syn, b_real).item() == 0.0
    assert gradient_match_distance([g, b_syn], [g * 2, b_real]).item() == \
        pytest.approx(gradient_match_distance([g], [g * 2]).item())
    net = create_model("convnet", 3, 1, 8, width=4, depth=2)
    names = [n for n, _ in matched_parameters(net)]
    assert names == ["features.0.weight", "features.4.weight", "classifier.weight"]  # convs and the head
    one_d = [n for n, p in net.named_parameters() if p.dim() == 1]
    assert one_d and not set(one_d) & set(names)  # conv biases, norm weight/bias, head bias excluded


def test_matching_loss_ignores_biases(tiny_data):
    """Handing the distiller every parameter (biases and norm affines included) gives the same loss: the 1-D
    gradients contribute nothing."""
    eng = make_distiller(_dc(tiny_data), tiny_data)
    eng.initialise()
    net = eng.fresh_network(0)
    matched = [p for _, p in matched_parameters(net)]
    loss = eng.class_loss(net, matched, 0, torch.Generator().manual_seed(0))
    full = eng.class_loss(net, list(net.parameters()), 0, torch.Generator().manual_seed(0))
    assert len(matched) < len(list(net.parameters()))
    assert loss.item() > 0
    assert full.item() == pytest.approx(loss.item(), rel=1e-6)


def test_dc_loop_table():
    assert dc_loops(1) == (1, 1)
    assert dc_loops(10) == (10, 50)
    assert dc_loops(50) == (50, 10)
    assert dc_loops(5) == (1, 1)  # nearest listed IPC
    assert dc_loops(15) == (10, 50)  # tie between 10 and 20 -> the smaller


def test_siamese_augmentation_is_shared(tiny_data):
    eng = make_distiller(_dc(tiny_data, method="dsa", dsa=True), tiny_data)
    eng.initialise()
    real = tiny_data.train_x[:6]
    for seed in range(8):  # one op per draw: cover several ops
        g = torch.Generator().manual_seed(seed)
        ra, sa = eng.siamese(real, real[:2].clone(), g)
        assert torch.allclose(ra[:2], sa, atol=1e-6)


def test_dsa_method_needs_dsa(tiny_data):
    with pytest.raises(LtddError, match="dsa"):
        make_distiller(_dc(tiny_data, method="dsa", dsa=False), tiny_data)


def test_unknown_option_is_refused(tiny_data):
    with pytest.raises(LtddError, match="outer_lop"):
        make_distiller(_dc(tiny_data, options={"outer_lop": 3}), tiny_data)


@pytest.mark.parametrize("method,dsa", [("dc", False), ("dsa", True)])
def test_objective_goes_down(tiny_data, method, dsa):
    eng = make_distiller(_dc(tiny_data, method=method, dsa=dsa, lr_img=0.5, options={"outer_loop": 3}), tiny_data)
    eng.initialise()
    seeds = (101, 102, 103)
    before = sum(eng.objective(s) for s in seeds)
    assert before == pytest.approx(sum(eng.objective(s) for s in seeds))  # the measurement itself is fixed
    for it in range(12):
        rec = eng.step(it)
        assert math.isfinite(rec["loss"])
    after = sum(eng.objective(s) for s in seeds)
    assert after < 0.9 * before


def test_fresh_networks_are_seeded_and_leave_global_rng_alone(tiny_data):
    from ltdd.distill.gradient_matching import model_config

    state = torch.get_rng_state()
    a = seeded_model(model_config({"model": TINY}), tiny_data, 7)
    b = seeded_model(model_config({"model": TINY}), tiny_data, 7)
    c = seeded_model(model_config({"model": TINY}), tiny_data, 8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_dc_resume_equals_uninterrupted(tmp_path, tiny_data):
    cfg = RunConfig(distill=_dc(tiny_data, method="dsa", dsa=True), protocol="cpu")
    distill(cfg, tiny_data, tmp_path / "a", progress=False, evaluate=False)
    stopped = distill(cfg, tiny_data, tmp_path / "b", progress=False, evaluate=False, stop_after=3)
    assert stopped == {"stopped_at": 3}
    distill(cfg, tiny_data, tmp_path / "b", progress=False, evaluate=False, resume=True)
    a, b = SyntheticSet.load(tmp_path / "a"), SyntheticSet.load(tmp_path / "b")
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert a.soft_labels is None and a.lr is None
    assert a.labels.tolist() == [0, 0, 1, 1, 2, 2]
    strip = lambda s: {k: v for k, v in json.loads(s).items() if k not in ("seconds", "peak_memory_mb")}  # noqa: E731
    la = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert len(la) == 4 and [strip(s) for s in la] == [strip(s) for s in lb]


@pytest.mark.parametrize("name", ["dc", "dsa"])
def test_presets(name, tiny_data):
    for profile in (None, "cpu"):
        cfg = load_preset(name, profile)
        assert cfg.distill.method in ("dc", "dsa") and cfg.distill.ipc == 10
        eng = make_distiller(cfg.distill, tiny_data)  # every option of the preset is known to the method
        assert (eng.outer_loop, eng.inner_loop) in ((10, 50), (10, 10))
        if profile == "cpu":
            assert cfg.protocol == "cpu" and cfg.distill.options["model"]["args"]["width"] == 32
        else:
            assert cfg.distill.iterations == 1000 and cfg.distill.lr_img == 0.1 and cfg.distill.momentum_img == 0.5
            assert (eng.outer_loop, eng.inner_loop) == (10, 50) and eng.opts["batch_real"] == 256
    assert load_preset("dc").distill.dsa is False and load_preset("dsa").distill.dsa is True
