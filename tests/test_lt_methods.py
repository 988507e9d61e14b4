"""Full-data long-tail methods (ltdd.lt_methods) on a tiny problem, each checked against a known consequence.

- cRT: stage two re-initialises only the head, keeps the backbone (parameters and buffers) bit-identical and draws
  classes uniformly; stage one is plain instance-balanced CE.
- class-balanced re-sampling: classes are drawn (near-)uniformly, not in proportion to their counts.
- balanced softmax / logit adjustment: the loss is CE on logits + tau log pi (hand-computed numbers), and training a
  bias-only model converges to the known fixed point b = log(label freq) - tau log pi (+ const).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import ltdd.lt_methods as lt_methods
import ltdd.train as train_mod
from ltdd.config import ModelConfig, TrainConfig
from ltdd.losses import classification_loss

from conftest import make_tiny_data

COUNTS = (12, 6, 3)
BN_MODEL = ModelConfig("convnet", {"width": 4, "depth": 1, "norm": "batchnorm"})


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=8, schedule="constant", dsa=False)
    base.update(kw)
    return TrainConfig(**base)


class _Recorder:
    """Wraps lt_methods.train_model and train.epoch_order: per call, the config, the model state on entry and on
    exit, the class_counts given, and every epoch's index order."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real_train, real_order = lt_methods.train_model, train_mod.epoch_order

        def order(cfg, labels, num_classes, rng):
            out = real_order(cfg, labels, num_classes, rng)
            self.calls[-1]["orders"].append(np.asarray(out).copy())
            return out

        def train(model, x, y, cfg, **kw):
            self.calls.append({"cfg": cfg, "kw": kw, "orders": [], "labels": y.clone(),
                               "before": {k: v.detach().clone() for k, v in model.state_dict().items()}})
            res = real_train(model, x, y, cfg, **kw)
            self.calls[-1]["after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return res

        monkeypatch.setattr(lt_methods, "train_model", train)
        monkeypatch.setattr(train_mod, "epoch_order", order)

    def class_fractions(self, call: int) -> np.ndarray:
        c = self.calls[call]
        drawn = np.concatenate(c["orders"])
        return np.bincount(c["labels"].numpy()[drawn], minlength=len(COUNTS)) / len(drawn)


def _is_head(name: str) -> bool:
    return name.startswith("classifier.")


# ---------------------------------------------------------------------------------------------------------------- cRT


def test_crt_reinitialises_only_the_head_and_retrains_it_class_balanced(monkeypatch, one_thread):
    data = make_tiny_data(counts=COUNTS)
    rec = _Recorder(monkeypatch)
    model, metrics = lt_methods.train_full(data, "crt", BN_MODEL, _cfg(epochs=3), crt_epochs=30, seed=0)
    assert len(rec.calls) == 2
    s1, s2 = rec.calls
    # stage one: ERM (plain CE, instance sampling, every parameter trained)
    assert (s1["cfg"].loss, s1["cfg"].sampler, s1["cfg"].trainable) == ("ce", "instance", "all")
    for order in s1["orders"]:
        assert sorted(order.tolist()) == list(range(sum(COUNTS)))  # each image exactly once per epoch
    # stage two trains the head only, with class-balanced sampling, on the long-tailed counts
    assert s2["cfg"].trainable == "classifier" and s2["cfg"].loss == "ce" and s2["cfg"].epochs == 30
    assert list(s2["kw"]["class_counts"]) == list(COUNTS)
    head = [k for k in s1["after"] if _is_head(k)]
    backbone = [k for k in s1["after"] if not _is_head(k)]
    assert head == ["classifier.weight", "classifier.bias"]
    assert any("running_mean" in k for k in backbone)  # batch norm: its statistics must stay frozen too
    for k in backbone:
        # the backbone enters stage two as stage one left it, and leaves it bit-identical (buffers included)
        assert torch.equal(s2["before"][k], s1["after"][k]), k
        assert torch.equal(s2["after"][k], s2["before"][k]), k
        assert torch.equal(model.state_dict()[k], s1["after"][k]), k
    # the head was re-initialised before stage two (not the stage-one head) - a fresh nn.Linear draw, within
    # its default init bound 1/sqrt(fan_in) - and then trained
    fan_in = s1["after"]["classifier.weight"].shape[1]
    for k in head:
        assert not torch.equal(s2["before"][k], s1["after"][k]), k
        assert s2["before"][k].abs().max() <= 1 / math.sqrt(fan_in)
        assert not torch.equal(s2["after"][k], s2["before"][k]), k
    assert s1["after"]["classifier.weight"].abs().max() > 1 / math.sqrt(fan_in)  # so the bound tells them apart
    # class-balanced: over 30 epochs x 21 draws each class is ~1/3 (instance sampling: 0.57 / 0.29 / 0.14)
    frac = rec.class_fractions(1)
    assert np.allclose(frac, 1 / 3, atol=0.06), frac
    assert metrics.accuracy >= 0 and all(torch.isfinite(p).all() for p in model.parameters())


def test_crt_stage_alone_changes_nothing_but_the_head(one_thread):
    """crt_stage on a given model, with the caller's config asking for everything cRT must override."""
    data = make_tiny_data(counts=COUNTS)
    from ltdd.models import create_model

    torch.manual_seed(0)
    model = create_model("convnet", 3, 1, (8, 8), width=4, depth=1, norm="batchnorm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(sampler="instance", trainable="all", loss="balanced_softmax", weight_decay=0.1)
    lt_methods.crt_stage(model, data, cfg, crt_epochs=2, seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != _is_head(k), k
    assert all(p.requires_grad for p in model.parameters())  # the freeze is undone afterwards


# --------------------------------------------------------------------------------------------------------- resample


def test_resample_draws_classes_uniformly(monkeypatch, one_thread):
    data = make_tiny_data(counts=COUNTS)
    rec = _Recorder(monkeypatch)
    lt_methods.train_full(data, "resample", ModelConfig("convnet", {"width": 4, "depth": 1}), _cfg(epochs=20))
    (call,) = rec.calls
    assert (call["cfg"].loss, call["cfg"].sampler) == ("ce", "class_balanced")
    assert all(len(o) == sum(COUNTS) for o in call["orders"])  # epoch length = N
    frac = rec.class_fractions(0)  # 420 draws: binomial sd of a fraction ~0.023
    assert np.allclose(frac, 1 / 3, atol=0.07), frac
    # with replacement: the 3 tail images are drawn ~7 times per epoch
    tail = np.flatnonzero(data.train_y.numpy() == 2)
    assert np.isin(call["orders"][0], tail).sum() > len(tail)


@pytest.mark.parametrize("method,loss", [("erm", "ce"), ("balanced_softmax", "balanced_softmax"),
                                         ("logit_adjust", "logit_adjust")])
def test_instance_sampled_methods_route_their_loss(monkeypatch, one_thread, method, loss):
    data = make_tiny_data(counts=COUNTS)
    rec = _Recorder(monkeypatch)
    lt_methods.train_full(data, method, ModelConfig("convnet", {"width": 4, "depth": 1}), _cfg(epochs=1, la_tau=1.7))
    (call,) = rec.calls
    assert (call["cfg"].loss, call["cfg"].sampler, call["cfg"].la_tau) == (loss, "instance", 1.7)
    assert list(call["kw"]["class_counts"]) == list(COUNTS)
    assert sorted(call["orders"][0].tolist()) == list(range(sum(COUNTS)))


# ------------------------------------------------------------------------------------------ balanced softmax / LA


PRI = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)


def test_balanced_softmax_known_numbers():
    # zero logits: softmax(log n) = n / N, so the loss of label y is log(N / n_y) = log(21/12), log(21/6), log(21/3)
    y = torch.tensor([0, 1, 2])
    got = classification_loss(torch.zeros(3, 3, dtype=torch.float64), y, "balanced_softmax", priors=PRI)
    assert got.item() == pytest.approx((math.log(21 / 12) + math.log(21 / 6) + math.log(21 / 3)) / 3, abs=1e-12)
    # hand-written logits: loss_i = -(z_iy + log n_y) + log sum_c exp(z_ic + log n_c)
    z = [[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]]
    labels = [2, 0]
    want = sum(-(zi[yi] + math.log(COUNTS[yi])) + math.log(sum(math.exp(zc + math.log(n)) for zc, n in zip(zi, COUNTS)))
               for zi, yi in zip(z, labels)) / 2
    got = classification_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(labels), "balanced_softmax",
                              priors=PRI)
    assert got.item() == pytest.approx(want, abs=1e-12)
    # tau has no effect on balanced softmax
    assert classification_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(labels), "balanced_softmax",
                                priors=PRI, tau=3.0).item() == pytest.approx(want, abs=1e-12)
    # soft targets that are (numerically) one-hot give the same number
    soft = torch.nn.functional.one_hot(torch.tensor(labels), 3).double() * 1000
    assert classification_loss(torch.tensor(z, dtype=torch.float64), soft, "balanced_softmax",
                               priors=PRI).item() == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("tau", [0.0, 0.5, 2.0])
def test_logit_adjustment_known_numbers(tau):
    # zero logits: softmax(tau log pi) = n^tau / sum n^tau, loss of y = log(sum_c n_c^tau / n_y^tau)
    y = torch.tensor([0, 1, 2])
    norm = sum(n ** tau for n in COUNTS)
    want = sum(math.log(norm / n ** tau) for n in COUNTS) / 3
    got = classification_loss(torch.zeros(3, 3, dtype=torch.float64), y, "logit_adjust", priors=PRI, tau=tau)
    assert got.item() == pytest.approx(want, abs=1e-12)
    if tau == 2.0:
        assert want == pytest.approx((math.log(189 / 144) + math.log(189 / 36) + math.log(189 / 9)) / 3)
    # hand-written logits: loss_i = -(z_iy + tau log pi_y) + log sum_c exp(z_ic + tau log pi_c)
    z = [[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]]
    labels = [2, 0]
    pi = [n / sum(COUNTS) for n in COUNTS]
    want = sum(-(zi[yi] + tau * math.log(pi[yi]))
               + math.log(sum(math.exp(zc + tau * math.log(p)) for zc, p in zip(zi, pi)))
               for zi, yi in zip(z, labels)) / 2
    got = classification_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(labels), "logit_adjust",
                              priors=PRI, tau=tau)
    assert got.item() == pytest.approx(want, abs=1e-12)
    soft = torch.nn.functional.one_hot(torch.tensor(labels), 3).double() * 1000
    assert classification_loss(torch.tensor(z, dtype=torch.float64), soft, "logit_adjust", priors=PRI,
                               tau=tau).item() == pytest.approx(want, abs=1e-9)


class _BiasOnly(nn.Module):
    """logits = classifier bias (the input is all zeros): the loss minimiser is known in closed form."""

    def __init__(self, num_classes):
        super().__init__()
        self.classifier = nn.Linear(1, num_classes)

    def forward(self, x):
        return self.classifier(x.flatten(1))


@pytest.mark.parametrize("loss,tau,counts_given,shift", [
    ("ce", 1.0, None, 1.0),                       # ERM: b = log pi
    ("balanced_softmax", 1.0, None, 0.0),          # b = log pi - log pi = const
    ("logit_adjust", 2.0, None, -1.0),             # b = (1 - tau) log pi
    ("logit_adjust", 0.5, None, 0.5),
    ("balanced_softmax", 1.0, (3, 6, 12), 2.0),    # priors come from class_counts: b = log pi - log pi_rev = 2 log pi
])
def test_bias_only_training_reaches_the_known_fixed_point(loss, tau, counts_given, shift, one_thread):
    """CE(b + tau log pi') over labels with frequencies pi is minimised by softmax(b + tau log pi') = pi, i.e.
    b = log pi - tau log pi' + const. With pi' = pi that is (1 - tau) log pi; the test's ``shift`` is its multiple
    of log pi (for reversed counts log pi' = -log pi + const)."""
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(COUNTS)])
    x = torch.zeros(len(y), 1)
    torch.manual_seed(0)
    model = _BiasOnly(3)
    cfg = TrainConfig(epochs=400, lr=2.0, momentum=0.0, weight_decay=0.0, batch_size=len(y), schedule="constant",
                      dsa=False, loss=loss, la_tau=tau)
    train_mod.train_model(model, x, y, cfg, num_classes=3, class_counts=counts_given)
    b = model.classifier.bias.detach().double()
    logpi = PRI.log()
    want = shift * (logpi - logpi.mean())
    assert torch.allclose(b - b.mean(), want, atol=1e-4), (b - b.mean(), want)
