"""RLDD as an ltdd method: end to end on digits, recovery, relabelling, the ablations' switches, configuration."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ltdd.config import DebiasedExpertConfig, DistillConfig, ExpertConfig, ModelConfig, RunConfig, TrainConfig, \
    load_preset
from ltdd.debiased_experts import DebiasedStore
from ltdd.distill import distill, make_distiller
from ltdd.distill.bn_stats import capture_bn_inputs, running_targets
from ltdd.errors import LtddError
from ltdd.experts import TrajectoryStore, train_experts
from ltdd.labels import load_teacher
from ltdd.synset import SyntheticSet

from conftest import make_tiny_data

BN_MODEL = ModelConfig("convnet", {"width": 4, "depth": 2, "norm": "batchnorm"})
RLDD_PRESETS = ["rldd", "rldd-no-debias", "rldd-no-bnfair", "rldd-no-crop-init"]


def _expert_cfg(**kw):
    base = dict(kind="debiased", model=BN_MODEL,
                train=TrainConfig(epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=8,
                                  schedule="cosine", dsa=True, dsa_strategy="flip"))
    base.update(kw)
    return ExpertConfig(**base)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_data(counts=(20, 8, 3))


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rldd") / "experts"
    res = train_experts(_expert_cfg(), tiny, root, progress=False)
    assert res["trained"] == {"observer": 1, "teacher": 1}
    return root


def _distiller(tiny, store, **options):
    opts = {"batch_syn": 6, "clip": False, **options}
    cfg = DistillConfig(method="rldd", ipc=4, iterations=6, lr_img=0.1, dsa=False, options=opts)
    d = make_distiller(cfg, tiny, experts_dir=store)
    d.initialise()
    return d


# ---- end to end ------------------------------------------------------------------------------------------------


def test_rldd_pipeline_on_digits(tmp_path):
    from ltdd.workflow import run_pipeline

    torch.set_num_threads(1)
    cfg = load_preset("rldd", "cpu", [
        "data.dataset=digits", "data.root=null", "data.image_size=8", "data.imbalance_factor=10",
        "experts.model.args.width=8", "experts.train.epochs=8", "experts.train.batch_size=32",
        "distill.ipc=3", "distill.iterations=4", "distill.options.batch_syn=30", "distill.log_every=1",
        "protocol_overrides.train.epochs=150", "protocol_overrides.runs=1"])
    out = tmp_path / "run"
    run_pipeline(cfg, out, echo=lambda *_: None, full_data=False, baselines=False)
    store = DebiasedStore(out / "experts")
    assert store.available() == {"observer": 1, "teacher": 1}
    assert [r["expert"] for r in store.read_log()] == ["observer", "teacher"]
    syn = SyntheticSet.load(out / "distilled")
    assert syn.images.shape == (30, 1, 8, 8) and syn.lr is None
    assert syn.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert syn.meta["method"] == "rldd" and syn.meta["teacher"] == "teacher.safetensors"
    from ltdd.data import prepare_data

    data = prepare_data(cfg.data)
    teacher = load_teacher(out / "distilled", data)  # the teacher beside the set, in the project's format
    with torch.no_grad():
        torch.testing.assert_close(syn.soft_labels, teacher.logits(syn.images))  # relabel: the teacher's logits
    ev = json.loads((out / "distilled" / "eval.json").read_text())
    assert ev["summary"]["accuracy"]["mean"] > 0.15  # chance is 0.1 (tiny experts: about 0.37 test accuracy)
    log = [json.loads(line) for line in (out / "distilled" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and {"loss", "ce", "bn", "bn_class", "lr"} <= log[0].keys()


# ---- recovery ----------------------------------------------------------------------------------------------------


def test_batches_are_class_balanced(tiny, store):
    d = _distiller(tiny, store)  # 3 classes, IPC 4, batch_syn 6: 2 images of every class per batch
    batches = d.batches()
    assert [b.tolist() for b in batches] == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]
    assert all(d.labels[b].bincount().tolist() == [2, 2, 2] for b in batches)


def test_recovery_loss_equals_an_independent_computation(tiny, store):
    """ce_weight * CE + r_loss * (global + class_loss_weight * class-wise), with the targets computed directly from
    all of the observer's activations on the train set (no running moments involved)."""
    d = _distiller(tiny, store, r_loss=0.3, class_loss_weight=0.7, ce_weight=0.5)
    obs = d.observer
    with torch.no_grad(), capture_bn_inputs(obs) as acts:
        obs(tiny.train_x)
    real = {n: a.double() for n, a in acts.items()}
    y = tiny.train_y
    cls_mean = {n: torch.stack([a[y == c].mean((0, 2, 3)) for c in range(3)]) for n, a in real.items()}
    cls_var = {n: torch.stack([a[y == c].var((0, 2, 3), unbiased=False) for c in range(3)]) for n, a in real.items()}
    x, lab = d.images[:6].detach(), d.labels[:6]
    with torch.no_grad(), capture_bn_inputs(obs) as sacts:
        logits = obs(x)
    glob = sum(torch.linalg.vector_norm(a.double().mean((0, 2, 3)) - cls_mean[n].mean(0))
               + torch.linalg.vector_norm(a.double().var((0, 2, 3), unbiased=False) - cls_var[n].mean(0))
               for n, a in sacts.items())
    per = []
    for c in lab.unique().tolist():
        s = lab == c
        per.append(sum(torch.linalg.vector_norm(a[s].double().mean((0, 2, 3)) - cls_mean[n][c])
                       + torch.linalg.vector_norm(a[s].double().var((0, 2, 3), unbiased=False) - cls_var[n][c])
                       for n, a in sacts.items()))
    expected = 0.5 * F.cross_entropy(logits, lab).double() + 0.3 * (glob + 0.7 * sum(per) / len(per))
    loss, parts = d.batch_loss(x, lab)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["bn_class"] > 0 and parts["bn"] > 0


def test_recovery_moves_the_images_toward_the_targets(tiny, store):
    d = _distiller(tiny, store, ce_weight=0.0, r_loss=1.0)
    before = d.tensors()["images"].clone()
    first = d.step(0)
    for it in range(1, 6):
        last = d.step(it)
    assert last["loss"] < first["loss"]
    assert not torch.equal(d.tensors()["images"], before)
    assert last["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))  # cosine over the iterations


def test_synthetic_set_soft_labels_are_the_teacher_logits(tiny, store):
    d = _distiller(tiny, store)
    d.step(0)
    syn = d.synthetic_set()
    with torch.no_grad():
        torch.testing.assert_close(syn.soft_labels, d.teacher(syn.images))
    assert syn.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and syn.lr is None


def test_no_bnfair_targets_are_the_running_statistics(tiny, store):
    d = _distiller(tiny, store, bn_target="running", class_loss_weight=0.0)
    glob, per_class = d.targets()
    assert per_class is None
    for n, (mu, var) in running_targets(d.observer).items():
        assert torch.equal(glob[n][0], mu) and torch.equal(glob[n][1], var)
    assert d.step(0)["bn_class"] == 0.0


def test_initialisations(tiny, store):
    crops = _distiller(tiny, store)
    real = _distiller(tiny, store, init="real")
    for d in (crops, real):
        assert all(int(tiny.train_y[s]) == c for c, s in zip(d.labels.tolist(), d.sources))
    # random real init: the images are the train images themselves; crops are (resized) crops, not the images
    torch.testing.assert_close(real.images.detach(), tiny.train_x[torch.tensor(real.sources)])
    assert not torch.allclose(crops.images.detach(), tiny.train_x[torch.tensor(crops.sources)])


def test_resume_gives_the_uninterrupted_result(tiny, store, tmp_path):
    cfg = RunConfig(experts=_expert_cfg(), distill=DistillConfig(method="rldd", ipc=2, iterations=6, lr_img=0.1,
                                                                 dsa=True, dsa_strategy="flip", checkpoint_every=2,
                                                                 options={"batch_syn": 3, "clip": False}))
    full = distill(cfg, tiny, tmp_path / "a", experts_dir=store, progress=False, evaluate=False)
    assert full["iterations"] == 6
    distill(cfg, tiny, tmp_path / "b", experts_dir=store, progress=False, evaluate=False, stop_after=3)
    distill(cfg, tiny, tmp_path / "b", experts_dir=store, progress=False, evaluate=False, resume=True)
    a, b = SyntheticSet.load(tmp_path / "a"), SyntheticSet.load(tmp_path / "b")
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    torch.testing.assert_close(a.soft_labels, b.soft_labels, rtol=0, atol=0)
    assert (tmp_path / "b" / "teacher.safetensors").is_file()


# ---- experts and configuration -----------------------------------------------------------------------------------


def test_stores_refuse_each_other_and_other_data(tiny, store, tmp_path):
    with pytest.raises(LtddError, match="not expert\\s+trajectories|debiased"):
        TrajectoryStore(store).meta()
    with pytest.raises(LtddError, match="different data"):
        DebiasedStore(store).load("teacher", make_tiny_data(counts=(12, 6, 4)))
    with pytest.raises(LtddError, match="another expert configuration"):
        train_experts(_expert_cfg(debiased=DebiasedExpertConfig(q=0.5)), tiny, store, progress=False)
    with pytest.raises(LtddError, match="another expert configuration"):
        train_experts(_expert_cfg(debiased=DebiasedExpertConfig(weight_norm="mean")), tiny, store, progress=False)
    with pytest.raises(LtddError, match="no batch norm"):
        train_experts(_expert_cfg(model=ModelConfig("convnet", {"width": 4, "depth": 1})), tiny, tmp_path / "x",
                      progress=False)


def test_a_store_written_before_a_debiased_field_existed_still_matches(tiny, store, tmp_path):
    """A new field at its default keeps the old behaviour, so a store recorded without it is still the same
    configuration; set to another value, it is not."""
    import json

    from ltdd.debiased_experts import DebiasedStore, expert_material

    import shutil

    store = shutil.copytree(store, tmp_path / "old")  # the shared store stays as it is
    meta_path = DebiasedStore(store).meta_path
    meta = json.loads(meta_path.read_text())
    del meta["config"]["debiased"]["weight_norm"]  # as written before the field was added
    meta_path.write_text(json.dumps(meta))
    DebiasedStore(store).check(tiny, _expert_cfg())
    assert "weight_norm" in expert_material(_expert_cfg())["debiased"]
    with pytest.raises(LtddError, match="another expert configuration"):
        DebiasedStore(store).check(tiny, _expert_cfg(debiased=DebiasedExpertConfig(weight_norm="mean")))


@pytest.mark.parametrize("profile", [None, "cpu"])
@pytest.mark.parametrize("name", RLDD_PRESETS)
def test_presets_define_rldd_and_its_ablations(name, profile):
    cfg = load_preset(name, profile)
    e, d, o = cfg.experts, cfg.distill, cfg.distill.options
    assert (cfg.data.dataset, cfg.data.imbalance_factor, d.ipc, d.method) == ("cifar10", 100.0, 10, "rldd")
    assert e.kind == "debiased" and (e.train.epochs, e.train.batch_size, e.debiased.q) == (
        200 if profile is None else 25, 64, 0.8)
    assert (d.iterations, d.lr_img, o["r_loss"], o["batch_syn"]) == (75, 0.05, 0.01, 100)  # the spec's [code] values
    assert e.model.name == ("resnet32" if profile is None else "convnet")
    assert e.model.args.get("norm", "batchnorm") == "batchnorm"
    debias = name != "rldd-no-debias"
    assert (e.debiased.gamma_robust, e.debiased.schedule) == ((1.0, "quadratic") if debias else (0.0, "none"))
    fair = name != "rldd-no-bnfair"
    assert (o["bn_target"], o["class_loss_weight"]) == (("class_fair", 1.0) if fair else ("running", 0.0))
    assert o["init"] == ("real" if name == "rldd-no-crop-init" else "crops")
    assert cfg.protocol == ("relabel" if profile is None else "relabel_cpu")


def test_presets_are_listed():
    from click.testing import CliRunner

    from ltdd.cli import cli

    res = CliRunner().invoke(cli, ["presets"])
    assert res.exit_code == 0
    listed = {line.split()[0] for line in res.output.splitlines() if line.strip()}
    assert set(RLDD_PRESETS) <= listed


@pytest.mark.parametrize("override,key", [
    ("experts.kind=trajectory", "experts.kind"),
    ("experts.num_experts=3", "experts.num_experts"),
    ("experts.train.sampler=class_aware", "experts.train.sampler"),
    ("distill.lr_y=3", "distill.lr_y"),
    ("distill.options.foo=1", "distill.options.foo"),
    ("distill.options.bn_target=running", "class_loss_weight"),
    ("distill.options.init=noise", "distill.options.init"),
    ("experts.debiased.mix=mosaic", "experts.debiased.mix"),
])
def test_settings_rldd_does_not_read_are_errors(override, key):
    with pytest.raises(LtddError) as err:
        cfg = load_preset("rldd", None, [override])
        from ltdd.debiased_experts import check_debiased_config

        check_debiased_config(cfg.experts.debiased)
    assert key in str(err.value)


def test_mode_specific_options_are_errors_in_the_other_mode():
    with pytest.raises(LtddError, match="crops_per_image"):
        load_preset("rldd-no-crop-init", None, ["distill.options.crops_per_image=7"])
    with pytest.raises(LtddError, match="bn_variance"):
        load_preset("rldd-no-bnfair", None, ["distill.options.bn_variance=mixture"])
    load_preset("rldd", None, ["distill.options.bn_variance=mixture"])


def test_trajectory_methods_refuse_debiased_settings():
    with pytest.raises(LtddError, match="experts.debiased"):
        load_preset("lad", None, ["experts.debiased.q=0.5"])
    with pytest.raises(LtddError, match="experts.kind"):
        load_preset("lad", None, ["experts.kind=debiased"])


def test_a_table_fills_a_debiased_store_and_returns(tiny, tmp_path):
    # the tables' store filler knows a debiased store is complete once its observer and teacher exist (it used to
    # wait for trajectory experts such a store never has)
    from ltdd.experiments.cells import Cell, CellTable
    from ltdd.experiments.kinds import fill_experts

    table = CellTable("t", tmp_path / "w", tmp_path / "r")
    cell = Cell("store", {"kind": "experts"})
    cfg = _expert_cfg(train=TrainConfig(epochs=1, lr=0.05, batch_size=8, dsa=False))
    trained = fill_experts(cfg, tiny, tmp_path / "w" / "s", table, cell, poll_s=0.01)
    assert trained == {"observer": 1, "teacher": 1} and table.fresh(cell) is not None
    assert not any(fill_experts(cfg, tiny, tmp_path / "w" / "s", table, cell, poll_s=0.01).values())
