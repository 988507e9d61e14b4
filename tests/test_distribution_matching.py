"""DM: the per-class mean-embedding loss (by hand), Siamese DSA, the objective going down, presets, resume."""

from __future__ import annotations

import json

import pytest
import torch

from ltdd.config import DistillConfig, RunConfig, load_preset
from ltdd.distill import distill, make_distiller
from ltdd.synset import SyntheticSet

TINY = {"name": "convnet", "args": {"width": 4, "depth": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _dm(dsa=True, **kw):
    base = dict(method="dm", ipc=2, iterations=4, image_init="real", lr_img=1.0, momentum_img=0.5, dsa=dsa,
                dsa_strategy="color_crop_cutout_flip_scale_rotate", checkpoint_every=2,
                options={"model": TINY, "batch_real": 8})
    base.update(kw)
    return DistillConfig(**base)


def test_loss_is_squared_distance_of_mean_embeddings(tiny_data):
    eng = make_distiller(_dm(dsa=False), tiny_data)
    eng.initialise()
    net = eng.fresh_network(3)
    assert not any(p.requires_grad for p in net.parameters())  # the network is never trained
    total = eng.matching_loss(net, torch.Generator().manual_seed(0)).item()
    # by hand: class 0 (12 images > batch_real 8) takes the first 8 of a permutation drawn from the generator;
    # classes 1 and 2 (6 and 3 images) contribute all of theirs
    g = torch.Generator().manual_seed(0)
    syn = eng.images.detach()
    by_hand = 0.0
    for c in range(3):
        idx = torch.nonzero(tiny_data.train_y == c).flatten()
        if len(idx) > 8:
            idx = idx[torch.randperm(len(idx), generator=g)[:8]]
        diff = net.embed(tiny_data.train_x[idx]).mean(0) - net.embed(syn[2 * c:2 * c + 2]).mean(0)
        by_hand += diff.pow(2).sum().item()
    assert total == pytest.approx(by_hand, rel=1e-5)


def test_loss_gradient_reaches_only_the_images(tiny_data):
    eng = make_distiller(_dm(), tiny_data)
    eng.initialise()
    before = eng.images.detach().clone()
    eng.step(0)
    assert not torch.equal(before, eng.images.detach())
    assert eng.images.grad is not None and torch.isfinite(eng.images.grad).all()


@pytest.mark.parametrize("dsa", [False, True])
def test_objective_goes_down(tiny_data, dsa):
    eng = make_distiller(_dm(dsa=dsa, image_init="noise"), tiny_data)
    eng.initialise()
    seeds = (11, 12, 13)
    before = sum(eng.objective(s) for s in seeds)
    assert before == pytest.approx(sum(eng.objective(s) for s in seeds))
    for it in range(30):
        eng.step(it)
    assert sum(eng.objective(s) for s in seeds) < 0.5 * before


def test_dm_resume_equals_uninterrupted(tmp_path, tiny_data):
    cfg = RunConfig(distill=_dm(iterations=5), protocol="cpu")
    distill(cfg, tiny_data, tmp_path / "a", progress=False, evaluate=False)
    assert distill(cfg, tiny_data, tmp_path / "b", progress=False, evaluate=False, stop_after=3) == {"stopped_at": 3}
    distill(cfg, tiny_data, tmp_path / "b", progress=False, evaluate=False, resume=True)
    a, b = SyntheticSet.load(tmp_path / "a"), SyntheticSet.load(tmp_path / "b")
    assert torch.equal(a.images, b.images)
    strip = lambda s: {k: v for k, v in json.loads(s).items() if k not in ("seconds", "peak_memory_mb")}  # noqa: E731
    la = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert len(la) == 5 and [strip(s) for s in la] == [strip(s) for s in lb]


def test_preset(tiny_data):
    full = load_preset("dm")
    assert (full.distill.method, full.distill.iterations, full.distill.lr_img, full.distill.momentum_img) == \
        ("dm", 20000, 1.0, 0.5)
    assert full.distill.image_init == "real" and full.distill.dsa and full.distill.options["batch_real"] == 256
    cpu = load_preset("dm", "cpu")
    assert cpu.protocol == "cpu" and cpu.distill.options["model"]["args"]["width"] == 32
    for cfg in (full, cpu):
        make_distiller(cfg.distill, tiny_data)  # every option of the preset is known to the method
