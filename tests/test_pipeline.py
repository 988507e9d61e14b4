"""prepare_data: DataConfig -> long-tailed, preprocessed train / test / probe tensors."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ltdd.config import DataConfig
from ltdd.data import PreparedData, load_source, longtail_counts, make_longtail, prepare_data
from ltdd.data.transforms import Preprocessor
from ltdd.errors import LtddError


@pytest.fixture(scope="module")
def digits_plain() -> PreparedData:
    # max_per_class below the ~125 available per class leaves unused images of every class for the probe split
    cfg = DataConfig(dataset="digits", imbalance_factor=10, max_per_class=100, normalize=True, zca=False,
                     probe_per_class=5)
    return prepare_data(cfg)


def test_digits_split_shapes_and_counts(digits_plain):
    d = digits_plain
    src = load_source("digits")
    expected = make_longtail(src.train.labels, 10, 10, max_per_class=100, seed=0)
    assert expected.counts == longtail_counts(100, 10, 10)
    assert d.name == "digits" and d.num_classes == 10 and d.class_names == [str(i) for i in range(10)]
    assert d.channels == 1 and d.im_size == (16, 16)
    assert d.train_counts == expected.counts and d.split.counts == expected.counts
    np.testing.assert_array_equal(d.split.indices, expected.indices)
    assert tuple(d.train_x.shape) == (sum(expected.counts), 1, 16, 16)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert torch.bincount(d.train_y, minlength=10).tolist() == d.train_counts
    assert d.test_counts == [50] * 10 and tuple(d.test_x.shape) == (500, 1, 16, 16)
    torch.testing.assert_close(d.class_priors().sum(), torch.tensor(1.0))
    assert d.class_priors()[0] > d.class_priors()[9]
    assert d.groups["head"] == [0, 1, 2] and d.groups["tail"] == [7, 8, 9]


def test_preprocessing_fitted_on_lt_train_and_shared_with_test(digits_plain):
    d = digits_plain
    assert abs(d.train_x.mean().item()) < 1e-4 and abs(d.train_x.std(unbiased=False).item() - 1) < 1e-3
    src = load_source("digits")
    refit = Preprocessor(normalize=True, zca=False).fit(src.train.images[d.split.indices])
    torch.testing.assert_close(d.test_x, refit(src.test.images))
    torch.testing.assert_close(d.test_x, d.preprocessor(src.test.images))
    torch.testing.assert_close(d.train_x, d.preprocessor(src.train.images[d.split.indices]))


def test_probe_split_is_held_out(digits_plain):
    d = digits_plain
    assert d.probe_x is not None and d.probe_y is not None
    assert torch.bincount(d.probe_y, minlength=10).tolist() == [5] * 10
    assert tuple(d.probe_x.shape[1:]) == (1, 16, 16)
    # no probe image is a training image: compare against the LT split's own pixels
    train_set = {t.numpy().tobytes() for t in d.train_x}
    assert not any(p.numpy().tobytes() in train_set for p in d.probe_x)


def test_describe_is_json(digits_plain):
    info = json.loads(json.dumps(digits_plain.describe()))
    for key in ("name", "class_names", "train_counts", "test_counts", "groups", "imbalance_factor", "n_max",
                "num_train", "num_test", "transform"):
        assert key in info
    assert info["num_train"] == sum(info["train_counts"]) and info["num_test"] == 500
    assert info["transform"]["normalize"] is True and info["transform"]["zca"] is False


def test_zca_pipeline_and_ratio_alias():
    cfg = DataConfig(dataset="digits", imbalance_ratio=0.1, image_size=8, normalize=True, zca=True, zca_eps=0.1)
    d = prepare_data(cfg)
    assert d.split.imbalance_factor == pytest.approx(10.0)
    assert d.im_size == (8, 8) and tuple(d.train_x.shape[1:]) == (1, 8, 8)
    assert d.preprocessor.zca and d.describe()["transform"]["zca"] is True
    src = load_source("digits", image_size=8)
    pixels = d.preprocessor.to_pixels(d.test_x, clamp=False)
    torch.testing.assert_close(pixels * 255, torch.from_numpy(src.test.images).permute(0, 3, 1, 2).float(),
                               atol=1e-2, rtol=0)
    via_if = prepare_data(DataConfig(dataset="digits", imbalance_factor=10, image_size=8, zca=True))
    assert via_if.train_counts == d.train_counts


def test_class_order_max_per_class_and_step_profile():
    d = prepare_data(DataConfig(dataset="digits", imbalance_factor=5, max_per_class=100, zca=False,
                                class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]))
    targets = longtail_counts(100, 10, 5)
    assert d.train_counts == targets[::-1] and d.split.n_max == 100
    assert d.groups["head"] == [7, 8, 9] and d.groups["tail"] == [0, 1, 2]
    s = prepare_data(DataConfig(dataset="digits", imbalance_factor=4, max_per_class=80, profile="step",
                                normalize=False, zca=False))
    assert s.train_counts == [80] * 5 + [20] * 5
    assert 0.0 <= s.train_x.min().item() and s.train_x.max().item() <= 1.0  # pixels only


def test_config_errors():
    with pytest.raises(LtddError, match="imbalance_factor"):
        prepare_data(DataConfig(dataset="digits", imbalance_factor=0.5))
    with pytest.raises(LtddError, match="unknown dataset"):
        prepare_data(DataConfig(dataset="svhn"))
    with pytest.raises(LtddError, match="would have no training images"):
        prepare_data(DataConfig(dataset="digits", imbalance_factor=1000, zca=False))
    with pytest.raises(LtddError, match="permutation"):
        prepare_data(DataConfig(dataset="digits", class_order=[0, 1, 2]))
    with pytest.raises(LtddError, match="profile"):
        prepare_data(DataConfig(dataset="digits", profile="linear"))


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_imagefolder_pipeline_uses_cache_dir(tmp_path):
    root = tmp_path / "tree"
    for k, cls in enumerate(["a", "b", "c"]):
        for split, n in (("train", 12), ("test", 3)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.png").write_bytes(_png((20 * k + i, 5 * i, 100)))
    cfg = DataConfig(dataset="imagefolder", root=str(root), imbalance_factor=4, zca=True, probe_per_class=2)
    d = prepare_data(cfg, cache_dir=tmp_path / "cache")
    assert d.class_names == ["a", "b", "c"] and d.channels == 3 and d.im_size == (6, 6)
    assert d.train_counts == [12, 6, 3] and d.test_counts == [3, 3, 3]
    assert d.probe_y is not None and torch.bincount(d.probe_y, minlength=3).tolist() == [0, 2, 2]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = prepare_data(cfg, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(again.train_x, d.train_x)


def test_cifar10_pickles_pipeline(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        labels = np.repeat(np.arange(10), 4)
        d = {b"data": rng.randint(0, 256, (40, 3072)).astype(np.uint8), b"labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(d))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    d = prepare_data(DataConfig(dataset="cifar10", root=str(tmp_path), imbalance_factor=10, zca=False),
                     cache_dir=False)
    assert d.train_counts == longtail_counts(20, 10, 10) and d.test_counts == [4] * 10
    assert d.channels == 3 and d.im_size == (32, 32) and d.class_names[0] == "c0"


# ---- ltdd run: the distilled set beside its initial set, random real images and the full data ----------------


def test_run_pipeline_compares_with_initial_random_and_full_data(tmp_path, one_thread):
    from ltdd.config import load_preset
    from ltdd.synset import SyntheticSet
    from ltdd.workflow import run_pipeline

    cfg = load_preset("quickstart", overrides=[
        "data.image_size=8", "distill.ipc=3", "experts.num_experts=2", "experts.train.epochs=4",
        "experts.classifier_train.epochs=2", "distill.iterations=3", "distill.phases.0.max_start_epoch=3",
        "protocol_overrides.train.epochs=20", "protocol_overrides.runs=2"])
    out = tmp_path / "run"
    printed: list[str] = []
    summary = run_pipeline(cfg, out, echo=printed.append)
    comp = json.loads((out / "comparison.json").read_text())
    assert [r["key"] for r in comp["rows"]] == ["distilled", "initial", "random", "full"]
    rows = {r["key"]: r for r in comp["rows"]}
    assert rows["distilled"]["name"] == "distilled (LAD)"
    assert rows["distilled"]["labels"] == "learned soft labels, learned step size"
    assert rows["initial"]["labels"].startswith("expert soft labels") and rows["random"]["labels"] == "hard labels"
    assert all(r["summary"]["runs"] == 2 for r in comp["rows"])  # one protocol for every row
    data = prepare_data(cfg.data)
    assert rows["full"]["images"] == len(data.train_y) and rows["random"]["images"] == 3 * data.num_classes
    # random real images: hard labels, real training images, classes with fewer than IPC images repeated
    rnd = SyntheticSet.load(out / "random_real")
    assert rnd.soft_labels is None and rnd.lr is None
    assert rnd.labels.tolist() == [c for c in range(10) for _ in range(3)]
    train = {t.numpy().tobytes(): int(y) for t, y in zip(data.train_x, data.train_y)}
    assert all(train.get(x.numpy().tobytes()) == int(y) for x, y in zip(rnd.images, rnd.labels))
    tail = data.num_classes - 1
    assert data.train_counts[tail] < 3  # IF 50: the last class has fewer images than IPC ...
    block = rnd.images[rnd.labels == tail]
    assert len({b.numpy().tobytes() for b in block}) == data.train_counts[tail]  # ... so they repeat
    # the initial set is the distilled run before its first iteration: real images, expert soft labels, lr_init
    from ltdd.distill import make_distiller

    init, dist = SyntheticSet.load(out / "initial"), SyntheticSet.load(out / "distilled")
    eng = make_distiller(cfg.distill, data, experts_dir=out / "experts")
    eng.initialise()
    start = eng.synthetic_set()
    assert torch.equal(init.images, start.images) and torch.equal(init.soft_labels, start.soft_labels)
    assert init.lr == pytest.approx(cfg.distill.lr_init)
    assert not torch.equal(init.images, dist.images) and torch.equal(init.labels, dist.labels)
    # the reading: printed last, recorded in the run folder and the report
    assert printed[-1] == comp["reading"][0] == summary["reading"][0]
    assert printed[-1].startswith("distilled 3 images/class: ") and " vs random real " in printed[-1]
    assert printed[-1].endswith("(test accuracy, mean of 2 runs)")
    assert "which is what the 3 iterations added" in printed[-2]
    md = (out / "report.md").read_text()
    assert "| distilled (LAD) | learned soft labels, learned step size | 30 |" in md
    assert "| random real images | hard labels | 30 |" in md and f"**{comp['reading'][0]}**" in md
    assert "| set | 0 (" in md  # the per-class table


def test_comparison_configs_and_label_modes():
    from ltdd.config import load_preset
    from ltdd.workflow import initial_config, label_mode, method_label, random_config

    names = {p: method_label(load_preset(p, "cpu").distill) for p in ("lad", "datm", "mtt")}
    assert names == {"lad": "LAD", "datm": "DATM", "mtt": "MTT"}
    cfg = load_preset("quickstart", overrides=["distill.seed=4", "distill.ipc=2"])
    rnd = random_config(cfg).distill
    assert (rnd.method, rnd.ipc, rnd.seed, rnd.duplicate) == ("random", 2, 4, cfg.distill.duplicate)
    assert initial_config(cfg).distill.iterations == 0 and initial_config(cfg).distill.phases == cfg.distill.phases
    mtt = load_preset("mtt", "cpu").distill
    assert label_mode(mtt, "distilled") == "hard labels, learned step size"
    assert label_mode(mtt, "initial") == "hard labels, step size 0.01"
    rldd = load_preset("rldd", "cpu").distill  # RLDD's sets carry its teacher's logits, not hard labels
    assert label_mode(rldd, "distilled") == "teacher soft labels"
    assert label_mode(load_preset("dm", "cpu").distill, "distilled") == "hard labels"


def test_small_images_run_on_one_thread(monkeypatch, digits_plain):
    from ltdd.workflow import cpu_threads_for

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads_for(digits_plain, "cpu") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads_for(digits_plain, "cpu") is None  # the user's choice wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    import types

    big = types.SimpleNamespace(channels=3, im_size=(32, 32))
    assert cpu_threads_for(big, "cpu") is None
