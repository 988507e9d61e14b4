"""Every packaged preset under every profile resolves to what it says.

The expected values below are a known-answer table typed from LAD's released configurations (the per-(dataset, IF,
IPC) table of the paper's code release), not computed by the code under test. A profile may only scale (experts,
iterations, width, student steps, start epochs); everything that defines the method must be the released value
under every profile.
"""

from __future__ import annotations

import math

import pytest
import yaml

from ltdd.config import PRESET_DIR, list_presets, load_preset, preset_profiles
from ltdd.errors import LtddError

# CIFAR-10-LT: (IF, IPC) -> N_rep, N_cls, lr_img, start window [lo, hi), sequential generation (from, end) or None,
# lambda_rep, lambda_cls. Common: ConvNet-3, images the classifier expert classifies correctly, soft labels averaged
# over the correct classifier experts, lr_y 2, lr_lr 1e-5, batch_syn 500, M = 2, 10000 iterations.
CIFAR10 = {
    (10, 10): (80, 80, 100, (0, 20), (10, 1000), 1.0, 0.2),
    (10, 20): (80, 80, 100, (0, 40), None, 1.0, 0.2),
    (10, 50): (80, 80, 1000, (0, 40), None, 1.0, 0.2),
    (50, 10): (80, 80, 100, (0, 20), None, 1.0, 0.5),
    (50, 20): (80, 80, 100, (0, 20), (10, 2000), 0.5, 1.0),
    (50, 50): (80, 80, 100, (0, 40), (20, 2000), 0.5, 1.0),
    (100, 10): (80, 80, 100, (0, 20), None, 0.5, 1.0),
    (100, 20): (80, 80, 100, (0, 20), (10, 2000), 0.5, 1.0),
    (100, 50): (80, 60, 1000, (0, 40), None, 1.0, 0.5),
    (200, 10): (80, 80, 100, (0, 20), None, 0.1, 1.0),
    (200, 20): (80, 80, 1000, (0, 40), None, 0.1, 1.0),
    (200, 50): (80, 80, 1000, (0, 40), None, 0.1, 1.0),
}
# CIFAR-100-LT: ConvNet-3, random real images, one classifier expert's logits, batch_syn 1000, lr_img 1000,
# lr_lr 1e-5, lr_y 10, N 40 / 20, lambda 1.0 / 0.1; the start window depends on (IF, IPC).
CIFAR100_WINDOW = {(10, 10): (30, 50), (10, 20): (20, 70), (10, 50): (20, 70),
                   (20, 10): (20, 70), (20, 20): (20, 70), (20, 50): (20, 70)}
# Tiny-ImageNet-LT (64x64, ConvNet-D4): IPC -> N (both phases), batch_syn, lr_lr, window; lr_img 100, lr_y 10,
# lambda 1.0 / 0.1; 10000 iterations except IF 20 IPC 50 (1500).
TINY = {10: (25, 500, 1e-4, (10, 50)), 20: (20, 500, 1e-4, (10, 50)), 50: (10, 1000, 1e-5, (40, 70))}


def _expected(name: str) -> dict:
    parts = name.split("-")  # lad-<dataset>-if<IF>-ipc<IPC>
    ds, IF, ipc = parts[1], int(parts[2][2:]), int(parts[3][3:])
    common = dict(ipc=ipc, IF=float(IF), M=(2, 2), match=("backbone", "all"), inner=("dam", "soft_ce"),
                  update=("all", "classifier"), stores=("representation", "classifier"), cls_window=(0, 1),
                  soft_labels=True, label_store="classifier", gradient="constant_memory")
    if ds == "cifar10":
        n1, n2, lr_img, win, seq, lr, lc = CIFAR10[(IF, ipc)]
        return dict(common, dataset="cifar10", model="convnet", depth=3, N=(n1, n2), lr_img=lr_img, window=win,
                    seq=seq, lam=(lr, lc), lr_y=2.0, lr_lr=1e-5, batch_syn=(500, 500), image_init="correct",
                    label_init="experts_correct", iterations=10000)
    if ds == "cifar100":
        return dict(common, dataset="cifar100", model="convnet", depth=3, N=(40, 20), lr_img=1000.0,
                    window=CIFAR100_WINDOW[(IF, ipc)], seq=None, lam=(1.0, 0.1), lr_y=10.0, lr_lr=1e-5,
                    batch_syn=(1000, 1000), image_init="real", label_init="expert", iterations=10000)
    n, bs, lr_lr, win = TINY[ipc]
    return dict(common, dataset="tiny_imagenet", model="convnet_d4", depth=4, N=(n, n), lr_img=100.0, window=win,
                seq=None, lam=(1.0, 0.1), lr_y=10.0, lr_lr=lr_lr, batch_syn=(bs, bs), image_init="real",
                label_init="expert", iterations=1500 if (IF, ipc) == (20, 50) else 10000)


RELEASED = [n for n in list_presets() if n.startswith("lad-") and "-if" in n]


def test_the_released_table_is_complete():
    assert len(RELEASED) == 12 + 6 + 6
    cifar10 = [n.split("-") for n in RELEASED if n.startswith("lad-cifar10-")]
    assert {(int(p[2][2:]), int(p[3][3:])) for p in cifar10} == set(CIFAR10)


def _model_depth(cfg) -> int:
    if cfg.experts.model.name == "convnet_d4":
        return cfg.experts.model.args.get("depth", 4)
    return cfg.experts.model.args.get("depth", 3)


@pytest.mark.parametrize("profile", [None, "cpu"])
@pytest.mark.parametrize("name", RELEASED)
def test_released_preset_defines_the_released_method(name, profile):
    cfg = load_preset(name, profile)
    e = _expected(name)
    d = cfg.distill
    rep, cls = d.phases
    assert cfg.data.dataset == e["dataset"]
    assert cfg.data.imbalance_factor == e["IF"]
    assert d.ipc == e["ipc"]
    assert (cfg.experts.model.name, _model_depth(cfg)) == (e["model"], e["depth"])
    assert (rep.weight, cls.weight) == e["lam"]  # lambda_rep / lambda_cls of this setting, under every profile
    assert (rep.store, cls.store) == e["stores"]
    assert (rep.match, cls.match) == e["match"]
    assert (rep.inner_loss, cls.inner_loss) == e["inner"]
    assert (rep.student_update, cls.student_update) == e["update"]
    assert (rep.expert_epochs, cls.expert_epochs) == e["M"]
    assert (rep.batch_syn, cls.batch_syn) == e["batch_syn"]
    assert (cls.min_start_epoch, cls.max_start_epoch) == e["cls_window"]
    assert d.lr_img == e["lr_img"] and d.lr_y == e["lr_y"] and d.lr_lr == pytest.approx(e["lr_lr"])
    assert d.lr_init == 0.01 and d.momentum_y == 0.9
    assert (d.image_init, d.label_init, d.label_store) == (e["image_init"], e["label_init"], e["label_store"])
    assert d.soft_labels is e["soft_labels"] and d.gradient == e["gradient"]
    assert d.dam_epsilon == 0.0 and d.dam_normalise is False and d.duplicate is True and d.dsa is True
    lo, hi = e["window"]
    if profile is None:
        assert (rep.syn_steps, cls.syn_steps) == e["N"]
        assert (rep.min_start_epoch, rep.max_start_epoch) == (lo, hi)
        if e["seq"]:
            assert (rep.current_max_start_epoch, rep.expansion_end_iteration) == e["seq"]
        else:
            assert rep.expansion_end_iteration == 0
        assert d.iterations == e["iterations"]
        assert cfg.experts.num_experts == 100 and cfg.experts.train.epochs == 100
        assert cfg.experts.model.args.get("width", 128) == 128
    else:
        # the cpu profile scales: N / 8 (rounded up), start epochs / 2, 60 iterations (pro rata), 4 experts of
        # width 32 trained only as far as the start window needs
        assert (rep.syn_steps, cls.syn_steps) == tuple(math.ceil(n / 8) for n in e["N"])
        assert (rep.min_start_epoch, rep.max_start_epoch) == (lo // 2, hi // 2)
        if e["seq"]:
            assert (rep.current_max_start_epoch, rep.expansion_end_iteration) == (
                e["seq"][0] // 2, round(e["seq"][1] * 60 / 10000))
        else:
            assert rep.expansion_end_iteration == 0
        assert d.iterations == round(e["iterations"] * 60 / 10000)
        assert cfg.experts.num_experts == 4 and cfg.experts.model.args["width"] == 32
        assert cfg.experts.train.epochs >= hi // 2 - 1 + 2  # the last start epoch plus M
        assert cfg.protocol == "cpu"


def test_printed_resolution_of_if200_under_cpu_keeps_its_lambda():
    """The bug this file exists for: the base's profile used to be applied after the derived preset's values."""
    cfg = load_preset("lad-cifar10-if200-ipc10", "cpu")
    assert [ph.weight for ph in cfg.distill.phases] == [0.1, 1.0]
    assert load_preset("lad-tiny-if10-ipc10", "cpu").experts.model.name == "convnet_d4"
    assert load_preset("lad-cifar10-if10-ipc10", "cpu").distill.phases[0].current_max_start_epoch == 5


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_resolves_under_every_profile(name):
    load_preset(name)
    raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    if raw.get("base"):  # a derived preset states its own version of every profile its base has
        assert set(preset_profiles(raw["base"])) <= set(preset_profiles(name)), name
    for profile in preset_profiles(name):
        load_preset(name, profile)


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_composition_order(tmp_path):
    """base -> base's profile -> derived -> derived's profile -> overrides."""
    base = _write(tmp_path / "b.yaml", {
        "distill": {"ipc": 3, "iterations": 100, "lr_img": 1.0},
        "profiles": {"cpu": {"distill": {"iterations": 7, "lr_img": 2.0, "ipc": 4}}}})
    derived = _write(tmp_path / "d.yaml", {
        "base": base, "distill": {"lr_img": 5.0},
        "profiles": {"cpu": {"distill": {"ipc": 9}}}})
    cfg = load_preset(derived, "cpu")
    assert cfg.distill.iterations == 7  # the base's profile scales what the derived preset leaves alone
    assert cfg.distill.lr_img == 5.0  # the derived value wins over the base's profile
    assert cfg.distill.ipc == 9  # the derived profile wins over everything but overrides
    assert load_preset(derived, "cpu", ["distill.ipc=11"]).distill.ipc == 11
    assert load_preset(derived).distill.iterations == 100
    lonely = _write(tmp_path / "e.yaml", {"base": base, "distill": {"lr_img": 5.0}})
    with pytest.raises(LtddError, match="no profile 'cpu'"):
        load_preset(lonely, "cpu")  # nothing of the base's profile is applied behind the derived preset's back
    loop = tmp_path / "loop.yaml"
    _write(loop, {"base": str(loop)})
    with pytest.raises(LtddError, match="its own base"):
        load_preset(str(loop))


@pytest.mark.parametrize("preset,override,key", [
    ("lad", "distill.options.foo=1", "distill.options.foo"),
    ("dm", "distill.options.foo=1", "distill.options.foo"),
    ("random", "distill.options.model.name=convnet", "distill.options.model"),
    ("lad", "distill.phases.0.foo=1", "distill.phases[0].foo"),
    ("lad", "experts.epochs=5", "experts.epochs"),
    ("lad", "experts.classifier_epochs=5", "experts.classifier_epochs"),
    ("mtt", "distill.lr_y=5", "distill.lr_y"),  # hard labels: no label optimiser
    ("mtt", "distill.temperature=2", "distill.temperature"),
    ("lad", "distill.onehot_scale=3", "distill.onehot_scale"),  # soft labels come from experts, not one-hot
    ("datm", "distill.dam_epsilon=0.1", "distill.dam_epsilon"),  # no phase uses the DAM loss
    ("dm", "distill.lr_y=5", "distill.lr_y"),
    ("dm", "distill.phases=[{syn_steps: 3}]", "distill.phases.0.syn_steps"),
    ("dm", "experts.num_experts=3", "experts.num_experts"),
    ("random", "distill.iterations=5", "distill.iterations"),
    ("random", "distill.lr_img=5", "distill.lr_img"),
    ("dc", "distill.soft_labels=false", "distill.soft_labels"),
])
def test_unknown_and_ignored_keys_are_errors_naming_the_key(preset, override, key):
    with pytest.raises(LtddError) as err:
        load_preset(preset, None, [override])
    assert key in str(err.value)


@pytest.mark.parametrize("preset,override", [
    ("lad", "distill.options.expert_cache=4"),
    ("lad", "distill.lr_y=5"),
    ("mtt", "distill.soft_labels=true"),  # turning soft labels on makes lr_y meaningful again
    ("dm", "distill.options.batch_real=64"),
    ("lad", "experts.train.epochs=30"),
])
def test_keys_the_method_reads_are_accepted(preset, override):
    load_preset(preset, None, [override])


def test_one_place_for_the_number_of_expert_epochs():
    cfg = load_preset("mtt")
    assert cfg.experts.train.epochs == 50  # MTT's CIFAR-10 buffers: 50 epochs
    assert not hasattr(cfg.experts, "epochs") and not hasattr(cfg.experts, "classifier_epochs")
    lad = load_preset("lad")
    assert (lad.experts.train.epochs, lad.experts.classifier_train.epochs) == (100, 10)


def test_presets_command_prints_the_resolution():
    from click.testing import CliRunner

    from ltdd.cli import cli

    res = CliRunner().invoke(cli, ["presets", "lad-cifar10-if200-ipc10", "--profile", "cpu"])
    assert res.exit_code == 0, res.output
    resolved = yaml.safe_load(res.output)
    assert [ph["weight"] for ph in resolved["distill"]["phases"]] == [0.1, 1.0]
    assert resolved["data"]["imbalance_factor"] == 200.0 and resolved["distill"]["iterations"] == 60
    listing = CliRunner().invoke(cli, ["presets"])
    assert listing.exit_code == 0 and "lad-cifar10-if200-ipc10" in listing.output
    bad = CliRunner().invoke(cli, ["presets", "lad", "--set", "distill.options.foo=1"])
    assert bad.exit_code == 2 and "distill.options.foo" in bad.output


def test_dataset_roots_come_from_the_environment(monkeypatch):
    from ltdd.data.pipeline import expand_root

    for name in list_presets():
        root = load_preset(name).data.root
        assert root is None or root.startswith("${LTDD_DATA}/"), (name, root)  # no working-directory paths
    monkeypatch.setenv("LTDD_DATA", "/data/sets/")
    assert expand_root("${LTDD_DATA}/cifar10-jpeg.tar.gz") == "/data/sets/cifar10-jpeg.tar.gz"
    assert expand_root("$LTDD_DATA/x") == "/data/sets/x"
    assert expand_root("plain/path") == "plain/path" and expand_root(None) is None
    monkeypatch.delenv("LTDD_DATA")
    with pytest.raises(LtddError, match="needs the environment variable LTDD_DATA"):
        expand_root("${LTDD_DATA}/cifar10-jpeg.tar.gz")


def test_a_preset_without_its_data_variable_is_one_clear_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from ltdd.cli import cli

    monkeypatch.delenv("LTDD_DATA", raising=False)
    res = CliRunner().invoke(cli, ["distill", "--preset", "random", "--profile", "cpu", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "LTDD_DATA" in res.output, res.output
