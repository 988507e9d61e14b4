"""RLDD's expert losses on tiny problems with hand-computed answers (ltdd.rldd_losses, ltdd.debiased_experts)."""

from __future__ import annotations

import math

import pytest
import torch

from ltdd.config import DebiasedExpertConfig, TrainConfig
from ltdd.debiased_experts import ProjectionHeads, debiased_objective, train_debiased_model
from ltdd.errors import LtddError
from ltdd.models import create_model
from ltdd.rldd_losses import alpha_schedule, debias_loss, mix_batch, reweighting, robust_loss

LN2 = math.log(2.0)


def test_alpha_schedule_endpoints_and_middle():
    assert alpha_schedule(0, 10) == 0.0  # plain CE at the start
    assert alpha_schedule(10, 10) == 1.0  # fully re-weighted at T
    assert alpha_schedule(5, 10) == 0.25
    assert alpha_schedule(3, 200, "none") == 0.0  # the no-debias ablation: CE throughout
    assert alpha_schedule(5, 10, "linear") == 0.5 and alpha_schedule(0, 10, "constant") == 1.0  # study variants
    with pytest.raises(LtddError):
        alpha_schedule(1, 10, "cubic")


def test_reweighting_known_answers():
    # r = (1/2, 1/4, 1/4), q = 1: r^-1 = (2, 4, 4), sum 10
    torch.testing.assert_close(reweighting([2, 1, 1], 1.0), torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64))
    # counts 4:1, q = 1/2: r^-q proportional to (1, 2)
    torch.testing.assert_close(reweighting([4, 1], 0.5), torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    # frequencies or counts: the same weights; q = 0: uniform
    torch.testing.assert_close(reweighting([400, 100], 0.5), reweighting([0.8, 0.2], 0.5))
    torch.testing.assert_close(reweighting([5, 1, 1, 3], 0.0), torch.full((4,), 0.25, dtype=torch.float64))
    # norm "mean": the same weights times C (they average 1); r^-1 = (2, 4, 4) -> 3 x (0.2, 0.4, 0.4)
    torch.testing.assert_close(reweighting([2, 1, 1], 1.0, "mean"), torch.tensor([0.6, 1.2, 1.2], dtype=torch.float64))
    torch.testing.assert_close(reweighting([5, 1, 1, 3], 0.0, "mean"), torch.ones(4, dtype=torch.float64))
    with pytest.raises(LtddError, match="unknown weight normalisation"):
        reweighting([1, 2], 1.0, "max")


def test_debias_loss_hand_computed():
    w = torch.tensor([0.2, 0.4, 0.4])
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    target = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])  # a hard label and a mixed one
    # sample 1: CE = ln 4, re-weighted 0.4 ln 4; sample 2: CE = 1.5 ln 2, re-weighted 0.1 ln 2 + 0.4 ln 2
    ce = torch.tensor([2 * LN2, 1.5 * LN2])
    rw = torch.tensor([0.8 * LN2, 0.5 * LN2])
    torch.testing.assert_close(debias_loss(logits, target, w, 0.0), ce.mean())  # alpha = 0: plain CE
    torch.testing.assert_close(debias_loss(logits, target, w, 1.0), rw.mean())  # alpha = 1: re-weighted only
    # alpha = 1/4: (0.25 * 0.8 + 0.75 * 2) ln 2 and (0.25 * 0.5 + 0.75 * 1.5) ln 2
    torch.testing.assert_close(debias_loss(logits, target, w, 0.25), torch.tensor((1.7 + 1.25) / 2 * LN2))


def test_robust_loss_hand_computed():
    z1, p2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])  # cos = 1/sqrt(2)
    z2, p1 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 2.0]])  # cos = 1
    torch.testing.assert_close(robust_loss(z1, z2, p1, p2), torch.tensor(-(1 / math.sqrt(2) + 1)))


def test_stop_gradient_blocks_the_prediction_branch():
    g = torch.Generator().manual_seed(0)
    z1, z2, p1, p2 = (torch.randn(5, 4, generator=g).requires_grad_(True) for _ in range(4))
    robust_loss(z1, z2, p1, p2).backward()
    assert p1.grad is None and p2.grad is None  # stopped: nothing flows into p
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


@pytest.mark.parametrize("form,predictor_trained", [("spec", False), ("simsiam", True)])
def test_stop_gradient_through_the_heads(form, predictor_trained):
    """Through the real heads: the spec's form gives the encoder and projector gradients but the prediction head
    none; SimSiam's form trains the prediction head and stops the projection."""
    torch.manual_seed(0)
    model = create_model("convnet", 3, 1, 8, width=4, depth=1, norm="batchnorm")
    heads = ProjectionHeads(model.feat_dim, 6, 3)
    v1, v2 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    target = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    d = DebiasedExpertConfig(gamma_robust=1.0, gamma_debias=0.0 + 1e-12, robust_form=form)
    loss, parts = debiased_objective(model, heads, v1, v2, target, torch.ones(3) / 3, 0.0, d)
    assert "robust" in parts
    loss.backward()
    pred_grads = [p.grad for p in heads.predictor.parameters()]
    if predictor_trained:
        assert all(gr is not None and gr.abs().sum() > 0 for gr in pred_grads)
    else:
        assert all(gr is None for gr in pred_grads)
    assert heads.projector.weight.grad.abs().sum() > 0
    assert model.features[0].weight.grad.abs().sum() > 0


def _class_images(y, value_of=lambda c: 10.0 * (c + 1)):
    return torch.stack([torch.full((1, 6, 6), value_of(int(c))) for c in y])


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_targets_match_the_mixed_images(kind):
    """Every image is constant at 10 (c + 1); the mixed target's weights are the images' class proportions."""
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    x = _class_images(y)
    g = torch.Generator().manual_seed(3)
    xm, t = mix_batch(x, y, 3, kind, 1.0, g)
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    values = torch.tensor([10.0, 20.0, 30.0])
    if kind == "mixup":  # the image is the target-weighted combination of the class values
        torch.testing.assert_close(xm.mean((1, 2, 3)), t @ values)
    else:  # the fraction of pixels of each class value is the target weight
        frac = torch.stack([(xm == v).float().mean((1, 2, 3)) for v in values], 1)
        torch.testing.assert_close(frac, t)
    x0, t0 = mix_batch(x, y, 3, "none", 1.0, g)
    assert torch.equal(x0, x) and torch.equal(t0, torch.eye(3)[y])


def test_expert_training_follows_the_schedule_and_learns():
    """The observer/teacher loop: alpha = (epoch / epochs)^2 per epoch, both terms reported, above-chance accuracy on
    separable data."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    means = 2 * torch.randn(3, 1, 8, 8, generator=g)
    y = torch.tensor([0] * 24 + [1] * 8 + [2] * 4)
    x = means[y] + 0.3 * torch.randn(len(y), 1, 8, 8, generator=g)
    model = create_model("convnet", 3, 1, 8, width=8, depth=2, norm="batchnorm")
    seen = []
    train = TrainConfig(epochs=4, lr=0.05, momentum=0.9, weight_decay=0.0, batch_size=12, schedule="constant",
                        dsa=False)
    train_debiased_model(model, x, y, 3, [24, 8, 4], train, DebiasedExpertConfig(mix="none"), seed=0,
                         on_epoch_end=lambda e, m, parts: seen.append(parts))
    assert [p["alpha"] for p in seen] == [0.0, 1 / 16, 4 / 16, 9 / 16]
    assert all("robust" in p and "debias" in p for p in seen)
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).float().mean()
    assert acc > 0.8
    seen.clear()
    train_debiased_model(create_model("convnet", 3, 1, 8, width=8, depth=2, norm="batchnorm"), x, y, 3, [24, 8, 4],
                         train, DebiasedExpertConfig(schedule="none", gamma_robust=0.0), seed=0,
                         on_epoch_end=lambda e, m, parts: seen.append(parts))
    assert [p["alpha"] for p in seen] == [0.0] * 4 and not any("robust" in p for p in seen)  # plain CE experts
