"""Metrics against hand-made confusion matrices; the protocol on a tiny set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ltdd.config import ModelConfig, ProtocolConfig, TrainConfig, protocol_preset
from ltdd.errors import LtddError
from ltdd.evaluate import Metrics, run_protocol, summarise


def test_metrics_from_a_hand_made_confusion():
    # class 0: 4/4 right; class 1: 1/2 right; class 2: 0/2 right
    y = [0, 0, 0, 0, 1, 1, 2, 2]
    p = [0, 0, 0, 0, 1, 0, 1, 0]
    m = Metrics.from_predictions(y, p, 3, {"head": [0], "medium": [1], "tail": [2], "few": []})
    assert m.accuracy == pytest.approx(5 / 8)
    assert m.per_class == pytest.approx([1.0, 0.5, 0.0])
    assert m.class_std == pytest.approx(np.std([1.0, 0.5, 0.0]))  # population std
    assert (m.worst_class, m.worst_accuracy) == (2, 0.0)
    assert m.groups == {"head": 1.0, "medium": 0.5, "tail": 0.0, "few": None}
    assert m.confusion == [[4, 0, 0], [1, 1, 0], [1, 1, 0]]
    json.dumps(m.to_dict())


def test_class_std_reproduces_the_two_stage_paper():
    # Table 1 "GM" row of the two-stage paper: these per-class accuracies (%) are reported with std 11.8.
    # By hand: mean 36.23, sum of squared deviations 1381.401, so the population std is sqrt(138.1401) = 11.7533
    # (the sample std, sqrt(1381.401 / 9) = 12.389, would not round to the paper's 11.8).
    pc = [47.3, 63.0, 32.4, 36.9, 31.2, 33.1, 29.8, 35.4, 38.1, 15.1]
    y, p = [], []
    for c, acc in enumerate(pc):  # 1000 test images per class, round(10 * acc) of them right
        right = round(10 * acc)
        y += [c] * 1000
        p += [c] * right + [(c + 1) % 10] * (1000 - right)
    m = Metrics.from_predictions(y, p, 10)
    assert m.per_class == pytest.approx([a / 100 for a in pc])
    assert m.class_std == pytest.approx(0.117533, abs=1e-6)
    assert round(100 * m.class_std, 1) == 11.8
    assert (m.worst_class, m.worst_accuracy) == (9, pytest.approx(0.151))
    # a class without test images does not count; over runs, summarise's std is the population std as well
    m2 = Metrics.from_predictions([0, 0, 1, 1], [0, 0, 1, 0], 3)
    assert m2.class_std == pytest.approx(0.25)  # classes 0 and 1: 1.0 and 0.5
    s = summarise([Metrics.from_predictions([0, 1], [0, p_], 2) for p_ in (1, 1, 0, 0, 0)])
    assert s["accuracy"]["std"] == pytest.approx(0.2449490, abs=1e-6)  # accuracies 1, 1, .5, .5, .5


def test_summarise_mean_std():
    a = Metrics.from_predictions([0, 1], [0, 1], 2, {"head": [0]})
    b = Metrics.from_predictions([0, 1], [0, 0], 2, {"head": [0]})
    s = summarise([a, b])
    assert s["accuracy"] == {"mean": 0.75, "std": 0.25}
    assert s["per_class"] == [1.0, 0.5]
    assert s["runs"] == 2


def test_protocol_presets():
    assert protocol_preset("lad").train.epochs == 1000
    dc = protocol_preset("dc")
    assert (dc.train.epochs, dc.train.schedule, dc.train.dsa) == (300, "constant", False)
    with pytest.raises(LtddError):
        protocol_preset("nope")


def test_run_protocol_uses_soft_labels_and_learned_lr(tiny_data):
    proto = ProtocolConfig(model=ModelConfig("convnet", {"width": 8, "depth": 1}),
                           train=TrainConfig(epochs=20, batch_size=16, dsa=False, lr=0.01), runs=2)
    idx = torch.tensor([0, 1, 12, 13, 18, 19])
    soft = torch.nn.functional.one_hot(tiny_data.train_y[idx], 3).float() * 5
    res = run_protocol(tiny_data.train_x[idx], tiny_data.train_y[idx], tiny_data, proto, soft_labels=soft, lr=0.05)
    assert res.lr == 0.05 and len(res.runs) == 2
    assert res.summary["accuracy"]["mean"] > 0.5
    with pytest.raises(LtddError, match="shape"):
        run_protocol(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), tiny_data, proto)
