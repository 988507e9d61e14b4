"""Label modes of evaluation (hard / own / teacher), the relabel loop, teachers on disk, the fair random baseline
and ``ltdd eval`` / ``ltdd teacher`` with them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from ltdd import config as C
from ltdd import evaluate as E
from ltdd import labels as L
from ltdd.config import ModelConfig, ProtocolConfig, RelabelConfig, RelabelProtocolConfig, TrainConfig
from ltdd.errors import LtddError
from ltdd.models import create_model
from ltdd.synset import SyntheticSet
from ltdd.train import train_model

TINY = ModelConfig("convnet", {"width": 8, "depth": 1})


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _sgd(epochs=30, runs=1):
    return ProtocolConfig(model=TINY, train=TrainConfig(epochs=epochs, batch_size=16, dsa=False, lr=0.05), runs=runs,
                          use_learned_lr=False)


def _relabel(epochs=30, runs=1, **kw):
    return RelabelProtocolConfig(model=TINY, train=TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, weight_decay=0.01,
                                                               schedule="constant", dsa=False),
                                 runs=runs, use_learned_lr=False, relabel=RelabelConfig(**kw))


def _subset(data, idx):
    idx = torch.tensor(idx)
    return data.train_x[idx], data.train_y[idx]


def _wrong_soft(labels, k=3, scale=8.0):
    """Soft labels that point at the next class: a network trained on them predicts (y + 1) mod k."""
    return torch.nn.functional.one_hot((labels + 1) % k, k).float() * scale


# ----------------------------------------------------------------------------------------------------------------
# the label mode decides the training targets


def test_label_mode_sets_the_training_targets(tiny_data, monkeypatch):
    x, y = _subset(tiny_data, [0, 1, 12, 13, 18, 19])
    soft = _wrong_soft(y)
    syn = SyntheticSet(x, y, soft, None)
    seen = []
    monkeypatch.setattr(E, "train_model", lambda model, xx, yy, *a, **k: seen.append(yy.clone()) or model)
    E.evaluate_set(syn, tiny_data, _sgd(), "hard")
    E.evaluate_set(syn, tiny_data, _sgd(), "own")
    E.evaluate_set(syn, tiny_data, _sgd())  # default: the set's own soft labels
    assert seen[0].dtype == torch.int64 and torch.equal(seen[0], y)
    assert seen[1].dtype == torch.float32 and torch.equal(seen[1], soft)
    assert torch.equal(seen[2], soft)


def test_own_soft_labels_change_what_is_learned(tiny_data):
    x, y = _subset(tiny_data, list(range(0, 12, 2)) + [12, 13, 14, 15, 18, 19, 20])
    syn = SyntheticSet(x, y, _wrong_soft(y), None)
    hard = E.evaluate_set(syn, tiny_data, _sgd(), "hard")
    own = E.evaluate_set(syn, tiny_data, _sgd(), "own")
    assert hard["label_mode"] == "hard" and own["label_mode"] == "own"
    assert hard["summary"]["accuracy"]["mean"] > 0.8
    assert own["summary"]["accuracy"]["mean"] < 0.2  # it learned the shifted classes


def test_label_mode_rules(tiny_data):
    x, y = _subset(tiny_data, [0, 12, 18])
    hard_only = SyntheticSet(x, y)
    with pytest.raises(LtddError, match="no"):
        E.evaluate_set(hard_only, tiny_data, _sgd(1), "own")
    with pytest.raises(LtddError, match="needs a teacher"):
        E.evaluate_set(hard_only, tiny_data, _relabel(1), "teacher")
    teacher = L.Teacher(create_model("convnet", 3, 1, 8, width=4, depth=1), TINY)
    with pytest.raises(LtddError, match="relabel protocol"):
        E.evaluate_set(hard_only, tiny_data, _sgd(1), "teacher", teacher=teacher)
    with pytest.raises(LtddError, match="only with label mode 'teacher'"):
        E.evaluate_set(hard_only, tiny_data, _relabel(1), "hard", teacher=teacher)
    with pytest.raises(LtddError, match="calibration"):
        E.evaluate_set(hard_only, tiny_data, _sgd(1), "hard", calibrate=True)
    with pytest.raises(LtddError, match="unknown label mode"):
        E.evaluate_set(hard_only, tiny_data, _sgd(1), "soft")


# ----------------------------------------------------------------------------------------------------------------
# the relabel loop


class RecordingTeacher(L.Teacher):
    def __init__(self, model):
        super().__init__(model, TINY, {}, {"path": "memory", "sha256": "0"})
        self.inputs = []

    def logits(self, x):
        self.inputs.append(x.detach().clone())
        return super().logits(x)


def test_teacher_relabels_the_augmented_image(tiny_data, monkeypatch):
    x, y = tiny_data.train_x, tiny_data.train_y
    proto = _relabel(epochs=3, cutmix=1.0)
    proto.train.dsa, proto.train.dsa_strategy = True, "crop_flip_scale"
    teacher = RecordingTeacher(create_model("convnet", 3, 1, 8, width=4, depth=1))
    student = create_model("convnet", 3, 1, 8, width=4, depth=1)
    student_inputs, targets = [], []
    student.register_forward_pre_hook(lambda m, a: student_inputs.append(a[0].detach().clone()))
    real_loss = L.relabel_loss
    monkeypatch.setattr(L, "relabel_loss", lambda s, oh, t, *a: targets.append(t.detach().clone()) or
                        real_loss(s, oh, t, *a))
    L.train_relabel(student, x, y, proto, num_classes=3, teacher=teacher, seed=1)
    assert len(teacher.inputs) == len(student_inputs) == len(targets) == 3 * 3  # 21 images, batch 8, 3 epochs
    clean = {tuple(v.flatten().tolist()) for v in x}
    for t_in, s_in, tgt in zip(teacher.inputs, student_inputs, targets):
        assert torch.equal(t_in, s_in)  # the teacher saw exactly what the student saw
        assert torch.allclose(tgt, teacher.model(t_in), atol=1e-6)  # the teacher's raw logits
    changed = sum(tuple(v.flatten().tolist()) not in clean for b in teacher.inputs for v in b)
    assert changed >= 0.9 * sum(len(b) for b in teacher.inputs)  # relabelled images are augmented / mixed ones


def test_relabel_loss_is_edc_mse_gt_on_raw_logits():
    # a known answer by hand: s = [0, 0], t = [2, 0], y = class 0; MSE over the 2 classes = (4 + 0) / 2 = 2,
    # CE = log 2; loss = 0.025 log 2 + 2 (no temperature, no softmax on the targets)
    s, t, oh = torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    assert L.relabel_loss(s, oh, t, 0.025, 1.0).item() == pytest.approx(0.025 * math.log(2) + 2.0, rel=1e-6)
    # against the formula in plain torch on a batch: mean over batch x classes + 0.025 CE with the hard labels
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), 5 * torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ref = torch.nn.functional.mse_loss(s, t) + 0.025 * torch.nn.functional.cross_entropy(s, y)
    got = L.relabel_loss(s, torch.nn.functional.one_hot(y, 5).float(), t, 0.025, 1.0)
    assert torch.allclose(got, ref, atol=1e-6)
    # the older temperature-20 probability form is tiny next to it (what made the teacher barely matter)
    probs = L.relabel_loss(s, torch.nn.functional.one_hot(y, 5).float(), t, 0.0, 1.0, "probs", 20.0)
    assert probs < 0.01 * torch.nn.functional.mse_loss(s, t)


def test_own_labels_are_mixed_with_the_cutmix_weight(tiny_data, monkeypatch):
    x, y = tiny_data.train_x, tiny_data.train_y
    soft = torch.randn(len(y), 3)
    targets, onehots = [], []
    real_loss = L.relabel_loss
    monkeypatch.setattr(L, "relabel_loss", lambda s, oh, t, *a: targets.append(t) or onehots.append(oh) or
                        real_loss(s, oh, t, *a))
    L.train_relabel(create_model("convnet", 3, 1, 8, width=4, depth=1), x, y, _relabel(epochs=1, cutmix=1.0),
                    num_classes=3, soft_logits=soft, seed=0)
    checked = 0
    for t, oh in zip(targets, onehots):
        # the one-hot mix carries the batch's lam (rows that mix two images of one class show 1)
        lams = {float(v) for v in oh.flatten() if 0 < v < 1}
        if not lams:  # every row mixed two images of one class: lam cannot be read off the labels
            continue
        # each target row is lam * (own logits of one image) + (1 - lam) * (those of another): find the pair
        for row in t:
            pairs = [(a, b) for a in range(len(y)) for b in range(len(y)) for lam in lams
                     if torch.allclose(row, lam * soft[a] + (1 - lam) * soft[b], atol=1e-5)]
            assert pairs, "a target is not a lam-mix of two images' own logits"
            checked += 1
    assert checked
    targets.clear()
    L.train_relabel(create_model("convnet", 3, 1, 8, width=4, depth=1), x, y, _relabel(epochs=1), num_classes=3,
                    seed=0)
    assert targets and all(t is None for t in targets)  # hard labels: CE only


def test_teacher_targets_drive_the_student(tiny_data):
    # a teacher trained to call every class "the next one"; with the CE weight at 0, only the teacher teaches
    net = create_model("convnet", 3, 1, 8, width=8, depth=1)
    torch.manual_seed(0)
    train_model(net, tiny_data.train_x, (tiny_data.train_y + 1) % 3, TrainConfig(epochs=40, batch_size=8, lr=0.05,
                                                                                    dsa=False), num_classes=3)
    teacher = L.Teacher(net.eval(), TINY, {}, {"path": "memory"})
    x, y = tiny_data.train_x, tiny_data.train_y
    syn = SyntheticSet(x, y)
    proto = _relabel(epochs=40, ce_weight=0.0, mse_weight=1.0, temperature=1.0, cutmix=0.0, ema=0.0)
    res = E.evaluate_set(syn, tiny_data, proto, "teacher", teacher=teacher, protocol_name="tiny")
    hard = E.evaluate_set(syn, tiny_data, proto, "hard")
    assert res["teacher"] == {"path": "memory"} and res["label_mode"] == "teacher"
    assert hard["summary"]["accuracy"]["mean"] > 0.8
    assert res["summary"]["accuracy"]["mean"] < 0.2


# ----------------------------------------------------------------------------------------------------------------
# teachers on disk


def test_teacher_round_trip(tmp_path, tiny_data):
    from tests.conftest import make_tiny_data

    net = create_model("convnet", 3, 1, 8, width=4, depth=1)
    path = L.save_teacher(tmp_path / "t", net, ModelConfig("convnet", {"width": 4, "depth": 1}), tiny_data,
                          description="test")
    assert path.name == "teacher.safetensors"
    t = L.load_teacher(tmp_path / "t", tiny_data)
    assert torch.allclose(t.logits(tiny_data.test_x), net.eval()(tiny_data.test_x))
    assert t.identity["model"] == {"name": "convnet", "args": {"width": 4, "depth": 1}}
    assert len(t.identity["sha256"]) == 16 and t.identity["description"] == "test"
    with pytest.raises(LtddError, match="different data"):
        L.load_teacher(path, make_tiny_data(counts=(10, 6, 3)))
    with pytest.raises(LtddError, match="num_classes"):
        L.load_teacher(path, make_tiny_data(num_classes=4, counts=(12, 6, 3, 2)))
    with pytest.raises(LtddError, match="not found"):
        L.load_teacher(tmp_path / "nothing", tiny_data)


def test_teacher_files_without_a_model_name_or_pickles(tmp_path, tiny_data):
    from safetensors.torch import save_file

    net = create_model("convnet", 3, 1, 8, width=4, depth=1)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(bare))
    with pytest.raises(LtddError, match="names no model"):
        L.load_teacher(bare, tiny_data)
    # a .pt state_dict with a JSON beside it is read with weights_only=True
    pt = tmp_path / "net.pt"
    torch.save(net.state_dict(), pt)
    with pytest.raises(LtddError, match="net.json"):
        L.load_teacher(pt, tiny_data)
    (tmp_path / "net.json").write_text(json.dumps({"model": {"name": "convnet", "args": {"width": 4, "depth": 1}}}))
    assert torch.allclose(L.load_teacher(pt, tiny_data).logits(tiny_data.test_x), net.eval()(tiny_data.test_x))
    # anything that needs unpickling beyond tensors is refused
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": net.state_dict(), "obj": Exception("x")}, evil)
    (tmp_path / "evil.json").write_text((tmp_path / "net.json").read_text())
    with pytest.raises(LtddError, match="not a plain state_dict"):
        L.load_teacher(evil, tiny_data)
    # the wrong architecture
    (tmp_path / "net.json").write_text(json.dumps({"model": {"name": "convnet", "args": {"width": 8, "depth": 1}}}))
    with pytest.raises(LtddError, match="does not fit"):
        L.load_teacher(pt, tiny_data)


# ----------------------------------------------------------------------------------------------------------------
# the fair baseline


def test_random_subset_is_init_images_real(tiny_data):
    from ltdd.distill.init import init_images

    syn = SyntheticSet(torch.zeros(15, 1, 8, 8), torch.arange(3).repeat_interleave(5))
    rnd = E.random_subset(syn, tiny_data, seed=4)
    g = torch.Generator().manual_seed(4)
    images, labels, sources = init_images(tiny_data, 5, "real", generator=g, duplicate=True)
    assert torch.equal(rnd.images, images) and torch.equal(rnd.labels, labels) and rnd.meta["sources"] == sources
    # class 2 has 3 training images: repeated cyclically to 5
    assert sources[10:] == sources[10:13] + sources[10:12] and -1 not in sources
    with pytest.raises(LtddError, match="unequal class counts"):
        E.random_subset(SyntheticSet(torch.zeros(3, 1, 8, 8), torch.tensor([0, 0, 1])), tiny_data)


def test_baseline_under_each_label_mode(tiny_data, monkeypatch):
    syn = SyntheticSet(torch.zeros(6, 1, 8, 8), torch.arange(3).repeat_interleave(2), torch.randn(6, 3))
    seen = []
    monkeypatch.setattr(E, "train_model", lambda model, xx, yy, *a, **k: seen.append(yy.clone()) or model)
    na = E.evaluate_baseline(syn, tiny_data, _sgd(1), "own")
    assert na["status"] == "n/a" and "no way" in na["reason"] and not seen
    fn, how = L.method_soft_labeller({"method": "tm", "soft_labels": True, "label_init": "onehot",
                                      "onehot_scale": 3.0}, tiny_data)
    ok = E.evaluate_baseline(syn, tiny_data, _sgd(1), "own", own_labeller=(fn, how), protocol_name="sgd")
    assert ok["status"] == "ok" and ok["ipc"] == 2 and ok["label_mode"] == "own" and "one-hot" in ok["soft_labels_from"]
    assert torch.equal(seen[-1], torch.nn.functional.one_hot(torch.arange(3).repeat_interleave(2), 3).float() * 3)
    hard = E.evaluate_baseline(syn, tiny_data, _sgd(1), "hard")
    assert hard["status"] == "ok" and seen[-1].dtype == torch.int64
    assert L.method_soft_labeller(None, tiny_data)[0] is None
    fn2, why = L.method_soft_labeller({"method": "tm", "label_init": "experts_correct"}, tiny_data)
    assert fn2 is None and "--experts" in why


def test_baseline_in_teacher_mode_uses_the_same_teacher(tiny_data):
    teacher = RecordingTeacher(create_model("convnet", 3, 1, 8, width=4, depth=1))
    syn = SyntheticSet(torch.randn(6, 1, 8, 8), torch.arange(3).repeat_interleave(2))
    res = E.evaluate_baseline(syn, tiny_data, _relabel(epochs=1, cutmix=0.0), "teacher", teacher=teacher)
    assert res["status"] == "ok" and res["teacher"]["path"] == "memory"
    real = {tuple(v.flatten().tolist()) for v in tiny_data.train_x}
    assert all(tuple(v.flatten().tolist()) in real for b in teacher.inputs for v in b)  # no aug: real images


def test_full_data_reference(tiny_data):
    ref = E.full_data_reference(tiny_data, _sgd(epochs=5), crt_epochs=2, protocol_name="tiny")
    assert set(ref) == {"erm", "crt"} and ref["erm"]["images"] == 21 and ref["crt"]["crt_epochs"] == 2
    ref2 = E.full_data_reference(tiny_data, _relabel(epochs=1), crt=False)
    assert set(ref2) == {"erm"} and ref2["erm"]["label_mode"] == "hard"


def test_relabel_presets():
    p = C.protocol_preset("relabel")
    assert isinstance(p, RelabelProtocolConfig)
    assert (p.train.epochs, p.train.batch_size, p.train.lr, p.train.weight_decay, p.runs) == (1000, 25, 1e-3, 0.01, 5)
    r = p.relabel
    assert (r.ce_weight, r.temperature, r.ema, r.optimizer, r.cutmix) == (0.025, 20.0, 0.99, "adamw", 1.0)
    q = C.protocol_preset("relabel_cpu")
    assert q.train.epochs == 300 and q.model.args == {"width": 32} and q.relabel == r
    assert C.apply_overrides(q, ["relabel.ce_weight=0.1"]).relabel.ce_weight == 0.1
    with pytest.raises(LtddError, match="relabel_cpu"):
        C.protocol_preset("nope")


# ----------------------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LTDD_CACHE_DIR", str(tmp_path / "cache"))


def invoke(*args):
    from ltdd.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def _digits_set(tmp_path, soft=True):
    meta = {"data": C.to_dict(C.DataConfig(dataset="digits", imbalance_factor=10)), "method": "test"}
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(2)
    s = torch.randn(20, 10, generator=g) if soft else None
    return SyntheticSet(torch.randn(20, 1, 16, 16, generator=g), labels, s, 0.01, meta).save(tmp_path / "set")


def _user_error(res, fragment):
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ltdd: error:") and fragment in lines[0], res.stderr


def test_eval_labels_and_baseline_cli(tmp_path, cli_env):
    path = _digits_set(tmp_path)
    res = invoke("eval", path, "--labels", "hard", "--baseline", "--protocol", "dc", "--runs", 1, "--set",
                 "train.epochs=2", "--set", "model.args={width: 8}", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    saved = json.loads((path.parent / "eval.json").read_text())
    assert saved["label_mode"] == out["label_mode"] == "hard" and saved["protocol_name"] == "dc"
    assert saved["baseline"]["status"] == "ok" and saved["baseline"]["ipc"] == 2
    assert saved["baseline"]["label_mode"] == "hard" and saved["teacher"] is None
    # own mode: no way to give the random subset soft labels here -> n/a, said so
    res = invoke("eval", path, "--baseline", "--protocol", "dc", "--runs", 1, "--set", "train.epochs=1", "--set",
                 "model.args={width: 8}")
    assert res.exit_code == 0, res.output
    assert "labels own" in res.output and "random real subset (2/class): n/a" in res.output
    res = invoke("eval", path, "--labels", "own", "--calibrate", "--protocol", "dc", "--runs", 1, "--set",
                 "train.epochs=1", "--set", "model.args={width: 8}", "--json")
    assert res.exit_code == 0, res.output
    assert "tau" in json.loads(res.stdout)["calibration"]


def test_eval_label_errors_cli(tmp_path, cli_env):
    path = _digits_set(tmp_path, soft=False)
    _user_error(invoke("eval", path, "--labels", "own"), "label mode 'own' needs")
    _user_error(invoke("eval", path, "--labels", "teacher"), "needs a teacher")
    _user_error(invoke("eval", path, "--labels", "hard", "--teacher", tmp_path / "t"), "only with label mode")
    _user_error(invoke("eval", path, "--labels", "soft"), "unknown label mode 'soft'")
    _user_error(invoke("eval", path, "--calibrate"), "calibration")
    _user_error(invoke("eval", path, "--labels", "teacher", "--teacher", tmp_path / "t", "--protocol", "lad"),
                "relabel protocol")
    _user_error(invoke("eval", path, "--labels", "teacher", "--teacher", tmp_path / "missing"), "teacher not found")
    assert not (path.parent / "eval.json").exists()


def test_teacher_command_and_teacher_eval_cli(tmp_path, cli_env):
    tpath = tmp_path / "teacher.safetensors"
    res = invoke("teacher", "--dataset", "digits", "--imbalance-factor", 10, "--out", tpath, "--epochs", 1,
                 "--width", 8, "--no-dsa", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert tpath.is_file() and "wrote" in res.output
    path = _digits_set(tmp_path, soft=False)
    res = invoke("eval", path, "--labels", "teacher", "--teacher", tpath, "--protocol", "relabel_cpu", "--runs", 1,
                 "--set", "train.epochs=1", "--set", "model.args={width: 8}", "--baseline")
    assert res.exit_code == 0, res.output
    assert "relabel_cpu protocol, labels teacher (teacher.safetensors" in res.output
    saved = json.loads((path.parent / "eval.json").read_text())
    assert saved["label_mode"] == "teacher" and saved["protocol_name"] == "relabel_cpu"
    assert saved["teacher"]["path"] == str(tpath) and len(saved["teacher"]["sha256"]) == 16
    assert saved["baseline"]["teacher"] == saved["teacher"]
    # a teacher made on other data is refused
    other = tmp_path / "other.safetensors"
    assert invoke("teacher", "--dataset", "digits", "--imbalance-factor", 20, "--out", other, "--epochs", 1,
                  "--width", 8, "--no-dsa").exit_code == 0
    _user_error(invoke("eval", path, "--labels", "teacher", "--teacher", other, "--protocol", "relabel_cpu"),
                "different data")


def test_method_soft_labels_from_the_run_folder(tmp_path, tiny_data):
    """A set distilled by `ltdd run` sits in run/distilled with its config.yaml; the experts in run/experts. The
    random subset then gets the method's own initial soft labels (experts_correct over the classifier experts)."""
    from ltdd.distill.init import init_soft_labels
    from tests.conftest import make_store

    run = tmp_path / "run"
    store = make_store(run / "experts", tiny_data)
    (run / "distilled").mkdir(parents=True)
    C.save_yaml(run / "distilled" / "config.yaml", {"distill": {"method": "tm", "soft_labels": True,
                                                                "label_init": "experts_correct",
                                                                "label_store": "classifier"}})
    set_path = run / "distilled" / "distilled.safetensors"
    cfg = L.run_distill_config(set_path)
    assert cfg["label_init"] == "experts_correct"
    assert L.find_expert_store(set_path) == run / "experts"
    fn, how = L.method_soft_labeller(cfg, tiny_data, L.find_expert_store(set_path))
    assert "2 classifier experts" in how
    x, y = tiny_data.train_x[:6], tiny_data.train_y[:6]
    nets = [L.teacher_from_expert(store.root, tiny_data, "classifier", i)[0].eval() for i in (0, 1)]
    with torch.no_grad():
        want = init_soft_labels(x, y, 3, "experts_correct", [lambda v, n=n: n(v) for n in nets])
    assert torch.allclose(fn(x, y), want)
    assert L.run_distill_config(tmp_path / "nowhere" / "distilled.safetensors") is None


def test_score_set_assembles_lrs_and_ars(tiny_data, monkeypatch):
    from ltdd.scores import score_set

    x, y = _subset(tiny_data, [0, 1, 12, 13, 18, 19])
    syn = SyntheticSet(x, y, torch.nn.functional.one_hot(y, 3).float() * 4, None)
    calls = []
    real = E.evaluate_set

    def spy(s, data, protocol, mode=None, **kw):
        calls.append((len(s.images), mode, protocol.train.dsa))
        return real(s, data, protocol, mode, **kw)

    monkeypatch.setattr(E, "evaluate_set", spy)
    fn = L.method_soft_labeller({"method": "tm", "label_init": "onehot", "onehot_scale": 4.0}, tiny_data)
    proto = _sgd(epochs=3)
    proto.train.dsa = True
    out = score_set(syn, tiny_data, proto, "own", own_labeller=fn, protocol_name="tiny")
    s = out["scores"]
    acc = {k: v["overall"] for k, v in out["inputs"].items()}
    hlr = acc["full_hard"] - acc["syn_hard"]
    ior = acc["syn_own"] - acc["rnd_own"]
    assert s["lrs"]["overall"]["hlr"] == pytest.approx(hlr) and s["lrs"]["overall"]["ior"] == pytest.approx(ior)
    assert s["lrs"]["overall"]["a"] == pytest.approx(0.5 * ior - 0.5 * hlr)
    assert len(s["lrs"]["per_class"]["lrs"]) == 3 and set(s["lrs"]["groups"]) == {"head", "medium", "tail"}
    assert "lrs_crt" in s and "ars" in s
    b = 0.5 * (acc["syn_aug"] - acc["rnd_aug"]) + 0.5 * (acc["syn_noaug"] - acc["rnd_noaug"])
    assert s["ars"]["overall"]["b"] == pytest.approx(b)
    # distilled: own with aug, hard with aug, own without aug; random: own with and without aug
    assert sorted(calls) == sorted([(6, "own", True), (6, "hard", True), (6, "own", False), (6, "own", True),
                                    (6, "own", False)])


def test_eval_scores_cli(tmp_path, cli_env):
    path = _digits_set(tmp_path, soft=False)
    res = invoke("eval", path, "--scores", "--protocol", "dc", "--runs", 1, "--set", "train.epochs=1", "--set",
                 "model.args={width: 8}")
    assert res.exit_code == 0, res.output
    assert "LRS" in res.output and "ARS" in res.output and "full data, ERM" in res.output
    saved = json.loads((path.parent / "eval.json").read_text())
    assert set(saved["scores"]["scores"]) == {"lrs", "lrs_crt", "ars"}
    assert saved["full_data"]["erm"]["label_mode"] == "hard"


def test_the_ema_copy_is_what_gets_tested(tiny_data):
    import copy

    x, y = tiny_data.train_x, tiny_data.train_y
    student = create_model("convnet", 3, 1, 8, width=4, depth=1)
    init = copy.deepcopy(student)
    proto = _relabel(epochs=1, ema=0.5, cutmix=0.0)
    proto.train.batch_size = len(y)  # one step
    tested = L.train_relabel(student, x, y, proto, num_classes=3, seed=0)
    assert tested is not student
    for pe, p0, p1 in zip(tested.parameters(), init.parameters(), student.parameters()):
        assert torch.allclose(pe, 0.5 * p0 + 0.5 * p1, atol=1e-6)
    proto.relabel.ema = 0.0
    assert L.train_relabel(student, x, y, proto, num_classes=3, seed=0) is student


def test_relabel_lr_milestones(tiny_data, monkeypatch):
    lrs = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    proto = _relabel(epochs=8, cutmix=0.0, ema=0.0)
    proto.train.batch_size = 32  # one step per epoch
    L.train_relabel(create_model("convnet", 3, 1, 8, width=4, depth=1), tiny_data.train_x, tiny_data.train_y, proto,
                    num_classes=3)
    assert lrs == pytest.approx([3e-3] * 4 + [3e-4] * 2 + [3e-5] * 2)  # x0.1 at 50 % and 75 % of the epochs


def test_a_network_file_of_the_debiased_store_is_a_teacher(tmp_path, tiny_data):
    from safetensors.torch import save

    net = create_model("convnet", 3, 1, 8, width=4, depth=1)
    info = {"model": {"name": "convnet", "args": {"width": 4, "depth": 1}}, "num_classes": 3, "channels": 1,
            "im_size": [8, 8], "role": "teacher"}
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "teacher.safetensors").write_bytes(
        save({k: v.contiguous() for k, v in net.state_dict().items()}, metadata={"ltdd_network": json.dumps(info)}))
    t = L.load_teacher(tmp_path / "store", tiny_data)
    assert torch.allclose(t.logits(tiny_data.test_x), net.eval()(tiny_data.test_x))
