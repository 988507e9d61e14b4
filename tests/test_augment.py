"""Differentiable Siamese Augmentation: reproducibility, Siamese sharing, differentiability, op semantics."""

import math

import pytest
import torch

from ltdd.data.augment import DSA, DSA_DEFAULT_RATIOS, AugParams
from ltdd.errors import LtddError

torch.set_num_threads(min(2, torch.get_num_threads()))

ELEMENTARY = ["brightness", "saturation", "contrast", "crop", "cutout", "flip", "scale", "rotate"]
ALL_OPS = ["color"] + ELEMENTARY


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_defaults_match_dsa():
    assert DSA_DEFAULT_RATIOS == {
        "flip": 0.5,
        "scale": 1.2,
        "rotate": 15.0,
        "crop": 0.125,
        "cutout": 0.5,
        "brightness": 1.0,
        "saturation": 2.0,
        "contrast": 0.5,
    }
    d = DSA()
    assert d.ops == ["color", "crop", "cutout", "flip", "scale", "rotate"] and d.mode == "one"


@pytest.mark.parametrize("strategy", ["none", "", None, []])
def test_identity_strategy(strategy):
    d = DSA(strategy)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(d(x, gen()), x)
    p = d.sample(3, generator=gen())
    assert p.ops == [] and torch.equal(d.apply(x, p), x)


def test_errors():
    with pytest.raises(LtddError):
        DSA("color_blur")
    with pytest.raises(LtddError):
        DSA(["crop", "zoom"])
    with pytest.raises(LtddError):
        DSA(mode="some")
    with pytest.raises(LtddError):
        DSA(rotation=10)
    with pytest.raises(LtddError):
        DSA(scale=0.5)
    d = DSA("flip", mode="all")
    p = d.sample(4, generator=gen())
    with pytest.raises(LtddError):
        d.apply(torch.randn(5, 3, 8, 8), p)  # per-sample params for 4 images
    with pytest.raises(LtddError):
        d.apply(torch.randn(3, 8, 8), p)
    with pytest.raises(LtddError):
        d.apply(torch.randn(4, 3, 8, 8), AugParams(["blur"], {}, False))


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("siamese", [False, True])
def test_same_params_same_output(op, siamese):
    d = DSA(op)
    x = torch.randn(4, 3, 12, 12)
    p = d.sample(4, generator=gen(1), siamese=siamese)
    out1, out2 = d.apply(x, p), d.apply(x, p)
    assert torch.equal(out1, out2)
    assert out1.shape == x.shape and out1.dtype == x.dtype


def test_same_seed_same_output_and_no_global_rng():
    d = DSA()
    x = torch.randn(6, 3, 16, 16)
    outs = []
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)  # the global RNG must not matter
        outs.append(d(x, generator=gen(7)))
    assert torch.equal(outs[0], outs[1])
    d_all = DSA(mode="all")
    torch.manual_seed(5)
    a = d_all(x, gen(3))
    torch.manual_seed(6)
    b = d_all(x, gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(d_all(x, gen(4)), a)


def test_mode_one_picks_single_op_and_covers_all():
    d = DSA()
    chosen = set()
    g = gen(0)
    for _ in range(60):
        p = d.sample(2, generator=g)
        assert len(p.ops) == 1
        chosen.add(p.ops[0])
    assert chosen == set(d.ops)
    p = DSA("color").sample(2, generator=gen())
    assert set(p.values) == {"brightness", "saturation", "contrast"}


@pytest.mark.parametrize("op", ALL_OPS)
def test_siamese_same_transform_for_any_batch(op):
    """A siamese draw applied to batches of different sizes transforms a shared image identically."""
    d = DSA(op, mode="all")
    a = torch.randn(3, 3, 12, 12)
    b = torch.cat([a[:1], torch.randn(4, 3, 12, 12)])
    p = d.sample(3, generator=gen(2), siamese=True)
    assert all(v.shape[0] == 1 for v in p.values.values())
    oa, ob = d.apply(a, p), d.apply(b, p)
    assert ob.shape == b.shape
    torch.testing.assert_close(oa[0], ob[0])


def test_siamese_flip_all_or_none_and_crop_same_shift():
    x = torch.randn(5, 2, 8, 8)
    flip = DSA("flip", mode="all")
    seen = set()
    for seed in range(12):
        out = flip.apply(x, flip.sample(5, generator=gen(seed), siamese=True))
        if torch.equal(out, x.flip(3)):
            seen.add("flipped")
        else:
            assert torch.equal(out, x)
            seen.add("kept")
    assert seen == {"flipped", "kept"}

    crop = DSA("crop", mode="all", crop=0.25)
    ones = torch.ones(4, 1, 8, 8)
    p = crop.sample(4, generator=gen(3), siamese=True)
    masks = crop.apply(ones, p)
    assert all(torch.equal(masks[i], masks[0]) for i in range(4))


def test_per_sample_params_differ():
    x = torch.randn(64, 1, 6, 6)
    flip = DSA("flip", mode="all")
    p = flip.sample(64, generator=gen())
    assert 0 < int(p.values["flip"].sum()) < 64
    out = flip.apply(x, p)
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(2) if p.values["flip"][i] else x[i])


def test_crop_is_integer_translation_with_zero_fill():
    d = DSA("crop", mode="all", crop=0.25)  # pad 2 on an 8x8 image
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    p = d.sample(2, generator=gen(4))
    out = d.apply(x, p)
    for i in range(2):
        dy = int(math.floor(float(p.values["crop"][i, 0]) * 5)) - 2
        dx = int(math.floor(float(p.values["crop"][i, 1]) * 5)) - 2
        ref = torch.zeros(8, 8)
        for r in range(8):
            for s in range(8):
                if 0 <= r + dy < 8 and 0 <= s + dx < 8:
                    ref[r, s] = x[i, 0, r + dy, s + dx]
        assert torch.equal(out[i, 0], ref)


def test_cutout_zeroes_a_square():
    d = DSA("cutout", mode="all")  # side 4 on 8x8
    x = torch.ones(16, 1, 8, 8)
    out = d.apply(x, d.sample(16, generator=gen(5)))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert (zeros <= 16).all() and (zeros >= 4).all() and (zeros == 16).any()
    for i in range(16):
        rows = (out[i, 0] == 0).any(1).nonzero().flatten()
        cols = (out[i, 0] == 0).any(0).nonzero().flatten()
        assert int(zeros[i]) == len(rows) * len(cols)  # a (clipped) rectangle


def test_color_ops_semantics():
    x = torch.randn(3, 3, 4, 4)
    n = 3
    d = DSA("color", mode="all")
    vals = {
        "brightness": torch.tensor([0.0, 0.3, -0.2]),
        "saturation": torch.ones(n),
        "contrast": torch.ones(n),
    }
    out = d.apply(x, AugParams(["color"], vals, False))
    torch.testing.assert_close(out, x + vals["brightness"].view(-1, 1, 1, 1))
    vals = {"brightness": torch.zeros(n), "saturation": torch.zeros(n), "contrast": torch.ones(n)}
    grey = d.apply(x, AugParams(["color"], vals, False))
    torch.testing.assert_close(grey, x.mean(1, keepdim=True).expand_as(x))
    vals = {"brightness": torch.zeros(n), "saturation": torch.ones(n), "contrast": torch.zeros(n)}
    flat = d.apply(x, AugParams(["color"], vals, False))
    torch.testing.assert_close(flat, x.mean((1, 2, 3), keepdim=True).expand_as(x))


def test_scale_and_rotate_identity_and_ranges():
    x = torch.randn(2, 3, 9, 9)
    d = DSA("scale_rotate", mode="all")
    ident = AugParams(["scale", "rotate"], {"scale": torch.ones(2, 2), "rotate": torch.zeros(2)}, False)
    torch.testing.assert_close(d.apply(x, ident), x, rtol=1e-5, atol=1e-5)
    p = d.sample(1000, generator=gen())
    s, r = p.values["scale"], p.values["rotate"]
    assert s.min() >= 1 / 1.2 - 1e-6 and s.max() < 1.2
    assert r.abs().max() <= math.radians(15) and r.min() < 0 < r.max()
    # a 90-degree rotation of a square image permutes pixels exactly
    rot90 = d.apply(x, AugParams(["rotate"], {"rotate": torch.full((2,), math.pi / 2)}, False))
    assert torch.allclose(rot90, torch.rot90(x, 1, dims=(2, 3)), atol=1e-5) or torch.allclose(
        rot90, torch.rot90(x, -1, dims=(2, 3)), atol=1e-5
    )


@pytest.mark.parametrize("op", ALL_OPS)
def test_gradcheck_wrt_pixels(op):
    d = DSA(op, mode="all", crop=0.25)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    p = d.sample(2, generator=gen(11))
    assert torch.autograd.gradcheck(lambda t: d.apply(t, p), (x,), eps=1e-6, atol=1e-5)


def test_gradients_reach_pixels_through_default_strategy():
    d = DSA(mode="all")
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    d(x, gen(0)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_generator_and_device_placement():
    d = DSA()
    p = d.sample(4, generator=gen(), device="cpu", siamese=True)
    assert all(v.device.type == "cpu" for v in p.values.values())
    assert p.siamese and p.batch_size == 1
    assert p.to("cpu").values.keys() == p.values.keys()
    assert DSA("flip_crop", mode="all").strategy == "flip_crop"
