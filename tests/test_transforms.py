"""Normalizer, ZCA and Preprocessor: statistics, inverses, gradients, consistency, state round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ltdd.data.transforms import ZCA, Normalizer, Preprocessor, to_float_pixels
from ltdd.errors import LtddError


def _correlated(n=3000, shape=(3, 4, 4), seed=0) -> torch.Tensor:
    """Float images with strongly correlated, unequal-variance pixels."""
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    # well conditioned (singular values of mix in about [0.4, 1.6]) so that a tiny eps is negligible
    mix = 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 + torch.eye(d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    return (z @ mix + 0.3).float().reshape(n, *shape)


def _uint8_images(n=64, h=6, w=5, c=3, seed=0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 256, size=(n, 1, 1, c))
    noise = rng.randint(-40, 40, size=(n, h, w, c))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_to_float_pixels_layout():
    imgs = _uint8_images(n=2, h=3, w=4, c=3)
    x = to_float_pixels(imgs)
    assert x.shape == (2, 3, 3, 4) and x.dtype == torch.float32
    assert x[1, 2, 0, 3].item() == pytest.approx(imgs[1, 0, 3, 2] / 255.0)
    assert to_float_pixels(imgs[..., 0]).shape == (2, 1, 3, 4)


def test_normalizer_statistics_inverse_and_state():
    x = _correlated(500)
    norm = Normalizer().fit(x)
    y = norm(x)
    per_channel = y.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(norm.inverse(y), x, atol=1e-5, rtol=1e-5)
    other = Normalizer().load_state_dict(norm.state_dict())
    torch.testing.assert_close(other(x), y)
    const = Normalizer().fit(torch.ones(4, 1, 2, 2))  # a constant channel must not divide by zero
    assert torch.isfinite(const(torch.ones(1, 1, 2, 2))).all()


def test_zca_whitens_to_identity_covariance():
    x = _correlated(4000)
    zca = ZCA(eps=1e-6).fit(x)
    y = zca(x).reshape(len(x), -1).double()
    yc = y - y.mean(0)
    cov = yc.T @ yc / (len(y) - 1)
    assert torch.allclose(y.mean(0), torch.zeros(y.shape[1], dtype=torch.float64), atol=1e-3)
    assert (cov - torch.eye(cov.shape[0], dtype=torch.float64)).abs().max() < 1e-3
    # with the kornia default eps=0.1 the covariance is U diag(s / (s + eps)) U^T: shrunk, still symmetric
    y01 = ZCA(eps=0.1).fit(x)(x).reshape(len(x), -1).double()
    c01 = torch.cov(y01.T)
    assert torch.allclose(c01, c01.T, atol=1e-5) and c01.diagonal().max() < 1.0


def test_zca_matches_reference_formula():
    x = _correlated(800, shape=(1, 3, 3))
    eps = 0.1
    flat = x.reshape(len(x), -1).double()
    mean = flat.mean(0)
    cov = (flat - mean).T @ (flat - mean) / (len(x) - 1)
    s, u = torch.linalg.eigh(cov)
    w = u @ torch.diag(1.0 / torch.sqrt(s + eps)) @ u.T
    zca = ZCA(eps).fit(x)
    torch.testing.assert_close(zca.matrix.double(), w, atol=1e-5, rtol=1e-4)
    expected = ((flat - mean) @ w).float().reshape(x.shape)
    torch.testing.assert_close(zca(x), expected, atol=1e-4, rtol=1e-4)


def test_zca_inverse_batches_and_gradients():
    x = _correlated(600)
    zca = ZCA(eps=0.1).fit(x)
    torch.testing.assert_close(zca.inverse(zca(x)), x, atol=1e-4, rtol=1e-4)
    # batched application equals whole-set application (rows are independent)
    torch.testing.assert_close(torch.cat([zca(x[:7]), zca(x[7:20])]), zca(x[:20]))
    # gradients flow through (distillation optimises pixels through the transform)
    p = x[:5].clone().requires_grad_(True)
    zca(p).square().sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    x64 = x[:3].double()
    torch.testing.assert_close(zca(x64).float(), zca(x[:3]), atol=1e-5, rtol=1e-5)
    with pytest.raises(LtddError, match="fitted on"):
        zca(torch.zeros(2, 3, 5, 5))
    with pytest.raises(RuntimeError):
        ZCA()(x)


def test_zca_state_round_trip():
    x = _correlated(300)
    zca = ZCA(eps=0.1).fit(x)
    state = zca.state_dict()
    assert set(state) == {"mean", "matrix", "inverse"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    back = ZCA().load_state_dict(state)
    torch.testing.assert_close(back(x), zca(x))
    torch.testing.assert_close(back.inverse(x), zca.inverse(x))


@pytest.mark.parametrize("normalize,zca", [(False, False), (True, False), (False, True), (True, True)])
def test_preprocessor_modes_round_trip(normalize, zca):
    train = _uint8_images(n=200, h=4, w=4, c=3, seed=1)
    test = _uint8_images(n=30, h=4, w=4, c=3, seed=2)
    pre = Preprocessor(normalize=normalize, zca=zca, zca_eps=0.1).fit(train)
    out = pre(train)
    assert out.shape == (200, 3, 4, 4) and out.dtype == torch.float32
    # train and test go through the very same function
    both = pre(np.concatenate([train, test]))
    torch.testing.assert_close(both[200:], pre(test))
    torch.testing.assert_close(both[:200], out)
    # uint8 input == float pixels through to_model_space; to_pixels inverts
    pixels = to_float_pixels(test)
    torch.testing.assert_close(pre(test), pre.to_model_space(pixels))
    torch.testing.assert_close(pre.to_pixels(pre(test), clamp=False), pixels, atol=1e-4, rtol=1e-4)
    assert pre.to_pixels(pre(test) * 10).min() >= 0 and pre.to_pixels(pre(test) * 10).max() <= 1
    # small block size gives the same result
    torch.testing.assert_close(pre(test, batch_size=7), pre(test))
    # state round trip into a differently configured instance
    back = Preprocessor(normalize=not normalize, zca=not zca).load_state_dict(pre.state_dict())
    assert (back.normalize, back.zca) == (normalize, zca)
    torch.testing.assert_close(back(test), pre(test))
    torch.testing.assert_close(Preprocessor.from_state_dict(pre.state_dict())(test), pre(test))
    cfg = json.loads(json.dumps(pre.config()))
    assert cfg["normalize"] == normalize and cfg["zca"] == zca and cfg["zca_eps"] == 0.1


def test_preprocessor_normalised_train_stats_and_grayscale():
    train = _uint8_images(n=100, h=5, w=5, c=1, seed=3)
    pre = Preprocessor(normalize=True, zca=False).fit(train)
    out = pre(train)
    assert out.shape == (100, 1, 5, 5)
    assert abs(out.mean().item()) < 1e-4 and abs(out.std(unbiased=False).item() - 1) < 1e-3
    assert pre(torch.from_numpy(train)).shape == (100, 1, 5, 5)  # uint8 tensor input
    with pytest.raises(RuntimeError):
        Preprocessor(normalize=True)(train)
    with pytest.raises(ValueError):
        pre(np.zeros((2, 5, 5, 1), dtype=np.int32))


def test_preprocessor_keeps_gradients_on_float_input():
    train = _uint8_images(n=80, h=3, w=3, c=3)
    pre = Preprocessor(normalize=True, zca=True).fit(train)
    syn = torch.rand(4, 3, 3, 3, requires_grad=True)
    pre(syn).sum().backward()
    assert syn.grad is not None and torch.isfinite(syn.grad).all()
