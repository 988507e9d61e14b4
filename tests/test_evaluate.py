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


def test_two_stage_paper_std_matches_numpy():
    # Table 1 "GM" row of the two-stage paper: per-class accuracies give std 11.8
    pc = [47.3, 63.0, 32.4, 36.9, 31.2, 33.1, 29.8, 35.4, 38.1, 15.1]
    assert np.std(pc) == pytest.approx(11.8, abs=0.05)


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
