"""Resumable training: a run stopped after a checkpoint and resumed ends bit-identical to the run never stopped
(weights, BN buffers, momentum, sampler and augmentation states all restored); the file goes once the run ends; a
checkpoint of another training or a foreign file is one clear error; the two-stage table's networks resume."""

from __future__ import annotations

import pytest
import torch

from ltdd.config import ModelConfig, TrainConfig
from ltdd.errors import LtddError
from ltdd.models import create_model
from ltdd.train import train_model

CFG = TrainConfig(epochs=4, lr=0.05, batch_size=8, schedule="cosine", dsa=True, sampler="class_balanced",
                  weight_decay=5e-4, momentum=0.9)


class Stop(Exception):
    pass


def _data(n: int = 40, classes: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.arange(n) % classes
    y[: n // 2] = 0  # imbalanced: the class-balanced sampler draws from the numpy generator
    return x, y


def _net(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("convnet", 4, 3, 16, width=8, depth=2)


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _stopped_then_resumed(tmp_path, stop_after: int, cfg=CFG):
    x, y = _data()
    ck = tmp_path / "run.ckpt.safetensors"

    def stop(epoch, model):
        if epoch == stop_after - 1:
            raise Stop

    with pytest.raises(Stop):
        train_model(_net(), x, y, cfg, seed=3, checkpoint=ck, checkpoint_every_s=0, on_epoch_end=stop)
    assert ck.is_file()  # the state after stop_after - 1 epochs (saved after each finished epoch's callback)
    resumed = train_model(_net(seed=99), x, y, cfg, seed=3, checkpoint=ck, checkpoint_every_s=0)
    return resumed, ck


@pytest.mark.parametrize("stop_after", [2, 3])
def test_a_resumed_run_ends_identical_to_the_uninterrupted_one(tmp_path, stop_after, one_thread):
    x, y = _data()
    straight = train_model(_net(), x, y, CFG, seed=3)
    resumed, ck = _stopped_then_resumed(tmp_path, stop_after)
    assert _same(straight, resumed)  # a fresh, differently initialised net took everything from the checkpoint
    assert not ck.exists()  # removed once the training ended


def test_a_checkpoint_of_another_training_is_refused(tmp_path, one_thread):
    x, y = _data()
    ck = tmp_path / "run.ckpt.safetensors"

    def stop(epoch, model):
        raise Stop

    with pytest.raises(Stop):
        train_model(_net(), x, y, CFG, seed=3, checkpoint=ck, checkpoint_every_s=0, on_epoch_end=stop)
    # the callback raised before the first save: nothing written yet
    assert not ck.exists()
    with pytest.raises(Stop):
        train_model(_net(), x, y, CFG, seed=3, checkpoint=ck, checkpoint_every_s=0,
                    on_epoch_end=lambda e, m: (_ for _ in ()).throw(Stop) if e == 1 else None)
    assert ck.is_file()
    for change in (dict(seed=4), dict(cfg=TrainConfig(**{**CFG.__dict__, "epochs": 5})), dict(y=y.roll(1))):
        kw = dict(seed=3, cfg=CFG, y=y) | change
        with pytest.raises(LtddError, match="a checkpoint of another training") as e:
            train_model(_net(), x, kw["y"], kw["cfg"], seed=kw["seed"], checkpoint=ck)
        assert "\n" not in str(e.value)
    assert ck.is_file()  # a refused checkpoint is left as it was


def test_a_checkpoint_of_another_model_is_refused_and_seconds_accumulate(tmp_path, one_thread):
    x, y = _data()
    ck = tmp_path / "run.ckpt.safetensors"
    with pytest.raises(Stop):
        train_model(_net(), x, y, CFG, seed=3, checkpoint=ck, checkpoint_every_s=0,
                    on_epoch_end=lambda e, m: (_ for _ in ()).throw(Stop) if e == 1 else None)
    wider = create_model("convnet", 4, 3, 16, width=12, depth=2)
    with pytest.raises(LtddError, match="a checkpoint of another training") as e:
        train_model(wider, x, y, CFG, seed=3, checkpoint=ck)
    assert "\n" not in str(e.value)
    timing: dict = {}
    train_model(_net(), x, y, CFG, seed=3, checkpoint=ck, timing=timing)
    assert timing["resumed_from"] == 1 and 0 < timing["seconds_before"] < timing["seconds"]


def test_a_foreign_file_is_one_clear_line(tmp_path):
    x, y = _data()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(LtddError, match="not a readable training checkpoint"):
        train_model(_net(), x, y, CFG, checkpoint=bad)
    from safetensors.torch import save_file

    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(LtddError, match="not an ltdd training checkpoint"):
        train_model(_net(), x, y, CFG, checkpoint=other)


def test_the_interval_limits_how_often_it_is_written(tmp_path, monkeypatch, one_thread):
    import ltdd.train_checkpoint as tc

    calls = []
    real = tc.save_training_checkpoint
    monkeypatch.setattr(tc, "save_training_checkpoint", lambda *a, **k: (calls.append(k["next_epoch"]), real(*a, **k)))
    x, y = _data()
    train_model(_net(), x, y, CFG, checkpoint=tmp_path / "a.ckpt", checkpoint_every_s=0)
    assert calls == [1, 2, 3]  # after every epoch but the last
    calls.clear()
    train_model(_net(), x, y, CFG, checkpoint=tmp_path / "b.ckpt", checkpoint_every_s=3600)
    assert calls == []


def test_the_two_stage_networks_resume_where_they_stopped(tmp_path, monkeypatch, one_thread):
    """A network of the two-stage table killed mid-training (after a checkpoint) continues from it, and ends as the
    network trained in one go."""
    import types

    import ltdd.train_checkpoint as tc
    from ltdd.experiments.netstore import NetStore

    x, y = _data()
    data = types.SimpleNamespace(channels=3, im_size=16, num_classes=4, test_x=x[:8], test_y=y[:8])

    def store(root):
        s = NetStore(root, ModelConfig("convnet", {"width": 8, "depth": 2}), CFG, {"d": 1}, {"real": "r"},
                     {"real": 4})
        s.data = data
        return s

    straight = store(tmp_path / "a").get("flat", "real", x, y, 4, seed=0)
    real = tc.save_training_checkpoint
    saved = []

    def save_then_die(*a, **k):
        real(*a, **k)
        saved.append(k["next_epoch"])
        if k["next_epoch"] == 2:
            raise KeyboardInterrupt  # killed right after the checkpoint of epoch 2

    monkeypatch.setattr(tc, "save_training_checkpoint", save_then_die)
    s = store(tmp_path / "b")
    monkeypatch.setattr("ltdd.experiments.netstore.CHECKPOINT_EVERY_S", 0)
    with pytest.raises(KeyboardInterrupt):
        s.get("flat", "real", x, y, 4, seed=0)
    assert list((tmp_path / "b").glob("*.ckpt.safetensors"))
    monkeypatch.setattr(tc, "save_training_checkpoint", real)
    resumed = s.get("flat", "real", x, y, 4, seed=0)
    assert torch.equal(straight["test_logits"], resumed["test_logits"])
    assert straight["resumed_from"] == 0 and resumed["resumed_from"] == 2  # its seconds: extrapolated to 4 epochs
    assert not list((tmp_path / "b").glob("*.ckpt.safetensors"))


# ---- full-data rows: cRT's two stages and several runs ---------------------------------------------------------------

def _digits():
    from ltdd.config import DataConfig
    from ltdd.data import prepare_data

    return prepare_data(DataConfig(dataset="digits", imbalance_factor=10, max_per_class=30, seed=3))


FULL = TrainConfig(epochs=3, lr=0.05, batch_size=32, schedule="cosine", dsa=True)
SMALL = ModelConfig("convnet", {"width": 8, "depth": 2})


@pytest.mark.parametrize("die_in", ["stage1", "stage2"])
def test_crt_killed_in_either_stage_resumes_to_the_same_network(tmp_path, monkeypatch, one_thread, die_in):
    import ltdd.train_checkpoint as tc
    from ltdd.lt_methods import train_full

    data = _digits()
    straight, m0 = train_full(data, "crt", SMALL, FULL, crt_epochs=3, seed=5)
    real = tc.save_training_checkpoint

    def save_then_die(path, **k):
        real(path, **k)
        if die_in in str(path) and 0 < k["next_epoch"] < 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(tc, "save_training_checkpoint", save_then_die)
    clock = iter(range(0, 10**9, 1000))  # 1000 s per reading: a checkpoint after every epoch
    monkeypatch.setattr("ltdd.train.time.monotonic", lambda: next(clock))
    with pytest.raises(KeyboardInterrupt):
        train_full(data, "crt", SMALL, FULL, crt_epochs=3, seed=5, checkpoint_dir=tmp_path)
    left = sorted(p.name for p in tmp_path.glob("*.ckpt.safetensors"))
    assert left == (["crt-seed5-stage1.ckpt.safetensors"] if die_in == "stage1" else
                    ["crt-seed5-stage1.ckpt.safetensors", "crt-seed5-stage2.ckpt.safetensors"])
    monkeypatch.setattr(tc, "save_training_checkpoint", real)
    import ltdd.train as tr

    epochs = []
    order = tr.epoch_order
    monkeypatch.setattr(tr, "epoch_order", lambda *a: (epochs.append(1), order(*a))[1])
    resumed, m1 = train_full(data, "crt", SMALL, FULL, crt_epochs=3, seed=5, checkpoint_dir=tmp_path)
    # killed after epoch 1 of its stage: stage 1 then runs 2 more epochs + stage 2's 3, or stage 2 its last 2 only
    assert len(epochs) == (5 if die_in == "stage1" else 2)
    assert _same(straight, resumed) and m0.accuracy == m1.accuracy
    # the files stay, holding the finished state, until the caller saved its result: a call now trains nothing
    assert len(list(tmp_path.glob("*.ckpt.safetensors"))) == 2
    epochs.clear()
    again, _ = train_full(data, "crt", SMALL, FULL, crt_epochs=3, seed=5, checkpoint_dir=tmp_path)
    assert not epochs and _same(straight, again)
    from ltdd.lt_methods import remove_checkpoints

    remove_checkpoints(tmp_path, "crt", 5)
    assert not list(tmp_path.glob("*.ckpt.safetensors"))


def test_run_full_keeps_finished_runs_and_resumes_the_one_in_progress(tmp_path, monkeypatch, one_thread):
    import ltdd.lt_methods as lm

    data = _digits()
    straight = lm.run_full(data, "erm", SMALL, FULL, runs=3, seed=1)
    real = lm.train_full
    calls = []

    def counted(*a, **k):
        calls.append(k["seed"])
        if len(calls) == 3 and k.get("checkpoint_dir") is not None and not getattr(counted, "resumed", False):
            raise KeyboardInterrupt  # killed at the start of the third run
        return real(*a, **k)

    monkeypatch.setattr(lm, "train_full", counted)
    with pytest.raises(KeyboardInterrupt):
        lm.run_full(data, "erm", SMALL, FULL, runs=3, seed=1, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["erm-run0.json", "erm-run1.json"]
    counted.resumed = True
    calls.clear()
    again = lm.run_full(data, "erm", SMALL, FULL, runs=3, seed=1, checkpoint_dir=tmp_path)
    assert calls == [1002]  # runs 0 and 1 were reused, only run 2 trained
    assert again["summary"]["accuracy"] == straight["summary"]["accuracy"]
    assert [r["per_class"] for r in again["runs"]] == [r["per_class"] for r in straight["runs"]]
    # a kept run of another configuration is not reused
    calls.clear()
    lm.run_full(data, "erm", SMALL, TrainConfig(**{**FULL.__dict__, "lr": 0.02}), runs=3, seed=1,
                checkpoint_dir=tmp_path)
    assert calls == [1000, 1001, 1002]


def test_a_network_killed_after_training_but_before_saving_is_not_retrained(tmp_path, monkeypatch, one_thread):
    import types

    import ltdd.experiments.netstore as ns
    import ltdd.train as tr

    x, y = _data()
    data = types.SimpleNamespace(channels=3, im_size=16, num_classes=4, test_x=x[:8], test_y=y[:8])
    s = ns.NetStore(tmp_path, ModelConfig("convnet", {"width": 8, "depth": 2}), CFG, {"d": 1}, {"real": "r"},
                    {"real": 4})
    s.data = data
    real_write = ns.atomic_write_bytes
    monkeypatch.setattr(ns, "atomic_write_bytes", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        s.get("flat", "real", x, y, 4, seed=0)
    assert list(tmp_path.glob("*.ckpt.safetensors"))  # the finished state survived the kill
    monkeypatch.setattr(ns, "atomic_write_bytes", real_write)
    epochs = []
    order = tr.epoch_order
    monkeypatch.setattr(tr, "epoch_order", lambda *a: (epochs.append(1), order(*a))[1])
    rec = s.get("flat", "real", x, y, 4, seed=0)
    assert not epochs and rec["resumed_from"] == 4  # nothing retrained
    assert list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.ckpt.safetensors"))
