"""Representation and classifier experts, and the trajectory store."""

from __future__ import annotations

import pytest
import torch

from ltdd.config import ExpertConfig, ModelConfig, TrainConfig
from ltdd.errors import LtddError
from ltdd.experts import TrajectoryStore, train_experts
from ltdd.models import create_model
from ltdd.models.functional import ParamLayout

from conftest import TINY_MODEL, make_tiny_data


def _cfg(**kw):
    base = dict(model=TINY_MODEL, num_experts=2,
                train=TrainConfig(epochs=3, lr=0.01, momentum=0.0, weight_decay=5e-3, batch_size=8, schedule="constant",
                                  dsa=True, dsa_strategy="flip"),
                classifier_train=TrainConfig(epochs=2, lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=8, dsa=False,
                                             sampler="class_aware", trainable="classifier", schedule="constant"))
    base.update(kw)
    return ExpertConfig(**base)


def test_experts_store_trajectories_and_append(tmp_path, tiny_data):
    res = train_experts(_cfg(), tiny_data, tmp_path / "s", progress=False)
    assert res["trained"] == {"representation": 2, "classifier": 2}
    store = TrajectoryStore(tmp_path / "s")
    rep = store.load("representation", 0)
    assert rep.epochs == [0, 1, 2, 3] and rep.params.shape[0] == 4
    assert torch.equal(rep.params[-1], rep.final)
    cls = store.load("classifier", 0)
    assert torch.equal(cls.at(0), rep.final)  # snapshot 0 of the classifier expert is the representation final
    layout = ParamLayout(create_model(TINY_MODEL.name, 3, 1, (8, 8), **TINY_MODEL.args))
    bb = layout.mask("backbone")
    assert torch.equal(cls.params[:, bb], cls.params[:1, bb].expand(3, -1))  # backbone constant
    assert not torch.equal(cls.params[1, ~bb], cls.params[0, ~bb])  # classifier moves
    assert not torch.equal(store.load("representation", 1).at(0), rep.at(0))  # independent inits
    # append: nothing to redo; more experts: only the new ones
    assert train_experts(_cfg(), tiny_data, tmp_path / "s", progress=False)["trained"] == {"representation": 0,
                                                                                           "classifier": 0}
    again = train_experts(_cfg(num_experts=3), tiny_data, tmp_path / "s", progress=False)
    assert again["trained"] == {"representation": 1, "classifier": 1}
    assert store.indices("representation") == [0, 1, 2]
    # the store's training log: one line per trained expert, in training order, appended across runs
    log = store.read_log()
    assert [(r["kind"], r["expert"]) for r in log] == [("representation", 0), ("classifier", 0),
                                                        ("representation", 1), ("classifier", 1),
                                                        ("representation", 2), ("classifier", 2)]
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["seconds"] >= 0 for r in log)


def test_training_log_survives_a_cut_line(tmp_path):
    store = TrajectoryStore(tmp_path / "s")
    store.root.mkdir(parents=True)
    store.append_log({"expert": 0, "kind": "representation", "test_acc": 0.5})
    with open(store.log_path, "a") as f:
        f.write('{"expert": 1, "ki')  # a process killed mid-line
    store.append_log({"expert": 2, "kind": "representation", "test_acc": 0.25})
    assert [r["expert"] for r in store.read_log()] == [0, 2]  # only the cut line is lost


def test_sharded_fill_and_keep_epochs(tmp_path, tiny_data):
    cfg = _cfg(num_experts=4, keep_epochs=[0, 2, 3], classifier_experts=False, fp16=True)
    r0 = train_experts(cfg, tiny_data, tmp_path / "s", rank=0, world=2, progress=False)
    r1 = train_experts(cfg, tiny_data, tmp_path / "s", rank=1, world=2, progress=False)
    assert r0["trained"]["representation"] == 2 and r1["trained"]["representation"] == 2
    store = TrajectoryStore(tmp_path / "s")
    t = store.load("representation", 3)
    assert t.epochs == [0, 2, 3]
    with pytest.raises(LtddError, match="not stored"):
        t.at(1)


def test_store_refuses_other_data_and_model(tmp_path, tiny_data):
    train_experts(_cfg(num_experts=1, classifier_experts=False), tiny_data, tmp_path / "s", progress=False)
    other = make_tiny_data(counts=(12, 6, 4))
    with pytest.raises(LtddError, match="different data"):
        train_experts(_cfg(num_experts=1), other, tmp_path / "s", progress=False)
    with pytest.raises(LtddError, match="holds model"):
        train_experts(_cfg(num_experts=1, model=ModelConfig("convnet", {"width": 8, "depth": 1})), tiny_data,
                      tmp_path / "s", progress=False)
    with pytest.raises(LtddError, match="not an expert store"):
        TrajectoryStore(tmp_path / "nothing").meta()


def test_claims_are_exclusive(tmp_path, tiny_data):
    store = TrajectoryStore(tmp_path / "s")
    assert store.claim("representation", 5)
    assert not store.claim("representation", 5)
    store.release("representation", 5)
    assert store.claim("representation", 5)


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket
    import subprocess

    store = TrajectoryStore(tmp_path / "s")
    proc = subprocess.Popen(["true"])
    proc.wait()
    lock = store.path("representation", 1).with_suffix(".lock")
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{socket.gethostname()}:{proc.pid}")  # a killed rank left its lock behind
    assert store.claim("representation", 1)
