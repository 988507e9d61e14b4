"""Class-fair BN statistics (ltdd.distill.bn_stats): exact per-class moments in one pass, the class-balanced target,
and the recovery's BN-matching loss."""

from __future__ import annotations

import pytest
import torch

from ltdd.distill.bn_stats import (
    bn_matching_loss,
    capture_bn_inputs,
    class_bn_moments,
    fair_targets,
    running_targets,
)
from ltdd.models import create_model

TOL = dict(rtol=1e-6, atol=1e-7)  # float32 activations, float64 accumulation


@pytest.fixture
def observer():
    torch.manual_seed(0)
    m = create_model("convnet", 3, 1, 8, width=4, depth=2, norm="batchnorm")
    with torch.no_grad():  # non-trivial normalisation in eval mode
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    return m.eval()


def _imbalanced(counts=(40, 12, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    offset = torch.tensor([0.0, 3.0, -4.0])[y].view(-1, 1, 1, 1)  # classes far apart: pooled != balanced
    x = torch.randn(len(y), 1, 8, 8, generator=g) + offset
    return x, y


def _direct(model, x, y, num_classes):
    """Per layer: (per-class mean, per-class biased variance, pooled mean) computed directly from all activations."""
    with torch.no_grad(), capture_bn_inputs(model) as acts:
        model(x)
    out = {}
    for n, a in acts.items():
        a = a.double()
        means = torch.stack([a[y == c].mean((0, 2, 3)) for c in range(num_classes)])
        vars_ = torch.stack([a[y == c].var((0, 2, 3), unbiased=False) for c in range(num_classes)])
        out[n] = (means, vars_, a.mean((0, 2, 3)), a)
    return out


def test_moments_do_not_depend_on_order_or_batch_size(observer):
    x, y = _imbalanced()
    a = class_bn_moments(observer, x, y, 3, batch_size=64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    b = class_bn_moments(observer, x[perm], y[perm], 3, batch_size=7)
    c = class_bn_moments(observer, x.flip(0), y.flip(0), 3, batch_size=1)
    assert set(a) == set(b) == set(c) and len(a) == 2
    for n in a:
        for other in (b, c):
            torch.testing.assert_close(other[n].count, a[n].count)
            torch.testing.assert_close(other[n].mean, a[n].mean, **TOL)
            torch.testing.assert_close(other[n].var, a[n].var, **TOL)
        assert a[n].count.tolist() == [40.0, 12.0, 5.0]  # every sample counted once


def test_moments_equal_a_direct_per_class_computation(observer):
    x, y = _imbalanced()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(2))
    mom = class_bn_moments(observer, x[perm], y[perm], 3, batch_size=9)  # class-mixed, uneven batches
    direct = _direct(observer, x, y, 3)
    for n, (means, vars_, _, _) in direct.items():
        torch.testing.assert_close(mom[n].mean, means, **TOL)
        torch.testing.assert_close(mom[n].var, vars_, **TOL)


def test_imbalanced_pass_gives_the_balanced_target(observer):
    x, y = _imbalanced()
    targets = fair_targets(class_bn_moments(observer, x, y, 3, batch_size=16))
    direct = _direct(observer, x, y, 3)
    for n, (means, vars_, pooled, _) in direct.items():
        mu, var = targets[n]
        torch.testing.assert_close(mu, means.mean(0), **TOL)  # (1/C) sum_c mu^c
        torch.testing.assert_close(var, vars_.mean(0), **TOL)  # (1/C) sum_c var^c
        assert (mu - pooled).abs().max() > 0.05  # not the long-tailed (count-weighted) statistics


def test_balanced_target_is_not_the_running_statistics():
    """A BN network trained on the long-tailed stream tracks the count-weighted statistics; the class-fair pass
    does not."""
    torch.manual_seed(0)
    m = create_model("convnet", 3, 1, 8, width=4, depth=1, norm="batchnorm", pool="none")
    x, y = _imbalanced()
    bn = next(b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
    bn.momentum = None  # cumulative average: running_mean becomes the pooled mean of the stream
    m.train()
    with torch.no_grad():
        m(x)
    m.eval()
    (name,) = running_targets(m)
    direct = _direct(m, x, y, 3)[name]
    torch.testing.assert_close(running_targets(m)[name][0], direct[2], **TOL)  # LT-weighted
    fair = fair_targets(class_bn_moments(m, x, y, 3, batch_size=10))[name][0]
    torch.testing.assert_close(fair, direct[0].mean(0), **TOL)
    assert (fair - running_targets(m)[name][0]).abs().max() > 0.05


def test_mixture_variance_is_the_class_balanced_variance(observer):
    x, y = _imbalanced(counts=(6, 6, 6))  # equal counts: the mixture is the plain pooled set
    mom = class_bn_moments(observer, x, y, 3, batch_size=5)
    mixture = fair_targets(mom, "mixture")
    for n, (_, _, _, a) in _direct(observer, x, y, 3).items():
        torch.testing.assert_close(mixture[n][1], a.var((0, 2, 3), unbiased=False), **TOL)
        torch.testing.assert_close(mixture[n][0], a.mean((0, 2, 3)), **TOL)


def test_bn_matching_loss_hand_computed():
    # one layer, 2 channels, 4 images of 1x1: channel 0 = 1, 3, 5, 7; channel 1 = 0, 0, 2, 2; labels 0, 0, 1, 1
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [7.0, 2.0]]).view(4, 2, 1, 1)
    labels = torch.tensor([0, 0, 1, 1])
    # batch mean (4, 1), variance (5, 1); target mean (4, 0), variance (5, 0): 1 + 1
    targets = {"bn": (torch.tensor([4.0, 0.0]), torch.tensor([5.0, 0.0]))}

    class M:  # per-class moments: class 0 matched exactly; class 1 off by (0, 2) in mean and (0, -3) in variance
        count = torch.tensor([2.0, 2.0])
        mean = torch.tensor([[2.0, 0.0], [6.0, 0.0]])
        var = torch.tensor([[1.0, 0.0], [1.0, 3.0]])

    glob, cls = bn_matching_loss({"bn": a}, labels, targets, {"bn": M})
    assert glob.item() == pytest.approx(2.0)
    assert cls.item() == pytest.approx((0.0 + 2.0 + 3.0) / 2)  # averaged over the batch's 2 classes
    glob2, cls2 = bn_matching_loss({"bn": a}, labels, targets, None)
    assert glob2.item() == pytest.approx(2.0) and cls2.item() == 0.0
