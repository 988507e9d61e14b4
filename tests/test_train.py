"""The training loop: samplers, losses, cRT freezing, SAM/GSAM, learning on a tiny problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ltdd.config import TrainConfig
from ltdd.errors import LtddError
from ltdd.losses import classification_loss, dam_weights, soft_cross_entropy
from ltdd.models import create_model
from ltdd.train import class_aware_order, class_balanced_order, lr_at, train_model


def test_class_aware_sampler_visits():
    labels = np.array([0] * 20 + [1] * 5 + [2] * 2)
    order = class_aware_order(labels, 3, np.random.default_rng(0), samples_per_visit=4)
    assert len(order) == 20 * 3  # n_max x C
    blocks = labels[order].reshape(-1, 4)
    assert (blocks == blocks[:, :1]).all()  # each visit: 4 consecutive samples of one class
    counts = np.bincount(labels[order], minlength=3)
    assert counts.tolist() == [20, 20, 20]  # every class seen n_max times
    # a class's own iterator is cyclic: the 2 tail images alternate within each reshuffled cycle
    tail = order[labels[order] == 2]
    for i in range(0, len(tail) - 1, 2):
        assert set(tail[i:i + 2]) == {25, 26}


def test_class_balanced_sampler_is_balanced():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    order = class_balanced_order(labels, 3, np.random.default_rng(0), length=30000)
    frac = np.bincount(labels[order], minlength=3) / 30000
    assert np.allclose(frac, 1 / 3, atol=0.02)


def test_lr_schedules():
    cfg = TrainConfig(epochs=10, schedule="step_half")
    assert lr_at(cfg, 4, 1.0) == 1.0 and lr_at(cfg, 5, 1.0) == pytest.approx(0.1)
    assert lr_at(TrainConfig(epochs=10, schedule="cosine"), 0, 1.0) == 1.0
    with pytest.raises(LtddError):
        lr_at(TrainConfig(schedule="bogus"), 0, 1.0)


def test_soft_ce_and_dam_reduce_to_known_forms():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 4), torch.randn(6, 4)
    p = F.softmax(target, 1)
    assert torch.allclose(soft_cross_entropy(logits, target), -(p * F.log_softmax(logits, 1)).sum(1).mean())
    # DAM with uniform class counts is soft CE divided by C
    w = dam_weights([5, 5, 5, 5])
    assert torch.allclose(soft_cross_entropy(logits, target, class_weights=w), soft_cross_entropy(logits, target) / 4)
    # DAM weights are the class frequencies (sum 1); eps smoothing as in the released code
    assert torch.allclose(dam_weights([30, 10]), torch.tensor([0.75, 0.25]))
    assert torch.allclose(dam_weights([30, 10], epsilon=10), torch.tensor([40 / 50, 20 / 50]))
    # hard-label DAM = pi_y * CE
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    w = dam_weights([4, 3, 2, 1])
    manual = (w[y] * F.cross_entropy(logits, y, reduction="none")).mean()
    assert torch.allclose(classification_loss(logits, y, "dam", class_weights=w), manual)


def test_balanced_softmax_is_ce_on_shifted_logits():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    pri = torch.tensor([0.7, 0.2, 0.1])
    got = classification_loss(logits, y, "balanced_softmax", priors=pri)
    assert torch.allclose(got, F.cross_entropy(logits + pri.log(), y))
    got2 = classification_loss(logits, y, "logit_adjust", priors=pri, tau=2.0)
    assert torch.allclose(got2, F.cross_entropy(logits + 2 * pri.log(), y))


def test_training_learns_and_crt_freezes_backbone(tiny_data):
    torch.manual_seed(0)
    model = create_model("convnet", 3, 1, (8, 8), width=8, depth=2)
    cfg = TrainConfig(epochs=30, lr=0.05, batch_size=8, dsa=False, schedule="constant")
    train_model(model, tiny_data.train_x, tiny_data.train_y, cfg, seed=0)
    acc = (model.eval()(tiny_data.test_x).argmax(1) == tiny_data.test_y).float().mean()
    assert acc > 0.8  # separable classes, chance is 1/3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    crt = TrainConfig(epochs=2, lr=0.5, batch_size=8, dsa=True, dsa_strategy="flip", sampler="class_aware",
                      trainable="classifier", momentum=0.0)
    train_model(model, tiny_data.train_x, tiny_data.train_y, crt, seed=1)
    after = model.state_dict()
    for k in before:
        if k.startswith("classifier."):
            assert not torch.equal(before[k], after[k])
        else:
            assert torch.equal(before[k], after[k]), k


def test_soft_label_training_and_gsam_run(tiny_data):
    model = create_model("convnet", 3, 1, (8, 8), width=4, depth=1)
    soft = F.one_hot(tiny_data.train_y, 3).float() * 4
    cfg = TrainConfig(epochs=2, batch_size=8, dsa=False, sam_rho=0.05, gsam_alpha=0.3)
    train_model(model, tiny_data.train_x, soft, cfg)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_divergence_is_reported(tiny_data):
    model = create_model("convnet", 3, 1, (8, 8), width=4, depth=1)
    with pytest.raises(LtddError, match="diverged"):
        train_model(model, tiny_data.train_x * 1e30, tiny_data.train_y,
                    TrainConfig(epochs=1, lr=1e30, dsa=False, batch_size=64))


# ---------------------------------------------------------------------------------------------------------------
# SAM / GSAM against their formulas.
#
# train._sam_step implements the GSAM optimiser as LAD's experts use it (lad.md §3.1: FTD's GSAM, adaptive=True):
#   e   = rho * w^2 * g / || |w| g ||          (ASAM-style perturbation; ONE norm over all parameters)
#   g_p = grad f(w + e)                          (the SAM gradient)
#   d   = g_p - alpha * (g - <g, g_p>/||g_p||^2 g_p)   (GSAM: minus alpha x the part of g orthogonal to g_p)
# and the base SGD step then uses d. With alpha = 0 it is (adaptive) SAM.


def _quadratic():
    """f(a, b) = 1/2 a'Aa + 1/2 b'Db + (u.a)(v.b) with a in R^3, b in R^4 (held as 2x2): gradients in closed form,
    anisotropic and coupled so that the perturbed gradient is not parallel to the clean one."""
    A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.3]], dtype=torch.float64)
    D = torch.diag(torch.tensor([2.0, 0.1, 1.5, 0.7], dtype=torch.float64))
    u = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    v = torch.tensor([0.3, 1.0, -1.0, 2.0], dtype=torch.float64)

    def f(a, b):
        bf = b.reshape(-1)
        return 0.5 * a @ A @ a + 0.5 * bf @ D @ bf + (u @ a) * (v @ bf)

    def grad(a, b):  # by hand
        bf = b.reshape(-1)
        return A @ a + (v @ bf) * u, (D @ bf + (u @ a) * v).reshape(b.shape)

    return f, grad


def _sam_formula(w, grad, rho, alpha, adaptive=True, global_norm=True):
    g = grad(*w)
    if adaptive:
        norms = [torch.sqrt(((p * q) ** 2).sum()) for p, q in zip(w, g)]
        eps = [rho * p * p * q for p, q in zip(w, g)]
    else:
        norms = [torch.sqrt((q ** 2).sum()) for q in g]
        eps = [rho * q for q in g]
    total = torch.sqrt(sum(n ** 2 for n in norms))
    eps = [e / (total if global_norm else n) for e, n in zip(eps, norms)]
    gp = grad(*[p + e for p, e in zip(w, eps)])
    dot = sum((q * r).sum() for q, r in zip(g, gp))
    nn2 = sum((r * r).sum() for r in gp)
    return [r - alpha * (q - dot / nn2 * r) for q, r in zip(g, gp)]


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_sam_step_matches_the_gsam_formula(alpha):
    from ltdd.train import _sam_step

    f, grad = _quadratic()
    a0 = torch.tensor([0.8, -1.5, 2.0], dtype=torch.float64)
    b0 = torch.tensor([[0.2, -3.0], [1.0, 0.5]], dtype=torch.float64)
    rho = 0.1
    a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
    f(a, b).backward()
    ga, gb = grad(a0, b0)
    assert torch.allclose(a.grad, ga) and torch.allclose(b.grad, gb)  # the closed-form gradient is right
    _sam_step([a, b], lambda: f(a, b).backward(), rho, alpha)
    want = _sam_formula([a0, b0], grad, rho, alpha)
    # parameter by parameter: the update direction, and the weights are back at w
    assert torch.allclose(a.grad, want[0], rtol=0, atol=1e-12), (a.grad, want[0])
    assert torch.allclose(b.grad, want[1], rtol=0, atol=1e-12), (b.grad, want[1])
    assert torch.allclose(a.detach(), a0, rtol=0, atol=1e-14) and torch.allclose(b.detach(), b0, rtol=0, atol=1e-14)
    # the test can tell the variants apart: plain gradient, vanilla SAM (e = rho g/||g||), per-parameter norms,
    # and (for GSAM) plain SAM are all more than 1e-4 away from the implemented direction
    others = [list(grad(a0, b0)), _sam_formula([a0, b0], grad, rho, alpha, adaptive=False),
              _sam_formula([a0, b0], grad, rho, alpha, global_norm=False)]
    if alpha:
        others.append(_sam_formula([a0, b0], grad, rho, 0.0))
    for other in others:
        assert max((x - y).abs().max().item() for x, y in zip(other, want)) > 1e-4


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_train_model_takes_the_gsam_step(tiny_data, one_thread, alpha):
    """One full-batch epoch of train_model with SAM/GSAM = one SGD step along the formula's direction."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = create_model("convnet", 3, 1, (8, 8), width=4, depth=1)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = tiny_data.train_x, tiny_data.train_y
    lr, rho = 0.1, 0.5

    def loss_at(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    names = list(w0)

    def grad(*ws):
        ps = {k: w.clone().requires_grad_(True) for k, w in zip(names, ws)}
        return list(torch.autograd.grad(loss_at(ps), [ps[k] for k in names]))

    w = [w0[k] for k in names]
    d = _sam_formula(w, grad, rho, alpha)
    want = {k: p - lr * q for k, p, q in zip(names, w, d)}
    sgd = {k: p - lr * q for k, p, q in zip(names, w, grad(*w))}
    cfg = TrainConfig(epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, batch_size=len(y), schedule="constant",
                      dsa=False, sam_rho=rho, gsam_alpha=alpha)
    train_model(model, x, y, cfg, seed=0)
    gap = max((want[k] - sgd[k]).abs().max().item() for k in names)
    assert gap > 1e-3  # the sharpness-aware step is far from a plain SGD step on this problem
    if alpha:  # and the GSAM step from the SAM step
        sam = {k: p - lr * q for k, p, q in zip(names, w, _sam_formula(w, grad, rho, 0.0))}
        assert max((want[k] - sam[k]).abs().max().item() for k in names) > 1e-4
    for k, p in model.named_parameters():
        assert torch.allclose(p.detach(), want[k], rtol=0, atol=2e-6), (k, (p.detach() - want[k]).abs().max())
