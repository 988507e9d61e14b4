"""Export of distilled sets: ImageFolder PNGs in pixel space and DD-Ranking tensors."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from ltdd.data.transforms import Preprocessor
from ltdd.errors import LtddError
from ltdd.export import class_folder_names, export_ddranking, export_imagefolder
from ltdd.synset import SyntheticSet


def _pixels_and_pre(channels=3, n=40, size=6, zca=True, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    pre = Preprocessor(normalize=True, zca=zca, zca_eps=0.1).fit(raw)
    return raw, pre


def _synset(pre, raw, labels, soft=False, lr=0.0123):
    x = pre(raw)
    y = torch.as_tensor(labels, dtype=torch.long)
    s = torch.randn(len(y), int(y.max()) + 1, generator=torch.Generator().manual_seed(1)) if soft else None
    return SyntheticSet(x, y, s, lr)


def _read_png(path):
    with Image.open(path) as im:
        return im.mode, np.asarray(im)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("channels,zca", [(3, True), (1, True), (3, False)])
def test_imagefolder_round_trips_pixels(tmp_path, channels, zca):
    raw, pre = _pixels_and_pre(channels, zca=zca)
    labels = [0] * 12 + [1] * 5 + [2] * 3  # 20 images, classes 0..2; class 3 has none
    raw = raw[: len(labels)]
    syn = _synset(pre, raw, labels)
    names = ["plane", "car", "bird", "cat"]
    out = export_imagefolder(syn, pre, tmp_path / "ifolder", names)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # every class, also the empty one
    assert list((out / "cat").iterdir()) == []
    assert sorted(p.name for p in (out / "plane").iterdir()) == [f"{i:02d}.png" for i in range(12)]
    assert sorted(p.name for p in (out / "bird").iterdir()) == ["00.png", "01.png", "02.png"]
    # un-whitened: the PNGs give back the original uint8 pixels (up to float32 rounding of the ZCA round trip)
    by_class = {c: raw[np.asarray(labels) == c] for c in range(3)}
    for c, name in enumerate(names[:3]):
        for i, want in enumerate(by_class[c]):
            mode, got = _read_png(out / name / f"{i:02d}.png")
            assert mode == ("L" if channels == 1 else "RGB")
            got = got.reshape(want.shape)
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert _leftovers(tmp_path) == []


def test_imagefolder_takes_prepared_data_and_its_class_names(tmp_path):
    raw, pre = _pixels_and_pre(1)
    syn = _synset(pre, raw[:4], [0, 1, 1, 0])
    data = types.SimpleNamespace(preprocessor=pre, class_names=["zero", "one"])
    out = export_imagefolder(syn, data, tmp_path / "o", None)
    assert sorted(p.name for p in out.iterdir()) == ["one", "zero"]
    out2 = export_imagefolder(syn, pre, tmp_path / "o2", None)  # no names anywhere: 0..C-1
    assert sorted(p.name for p in out2.iterdir()) == ["0", "1"]


def test_imagefolder_existing_target(tmp_path):
    raw, pre = _pixels_and_pre(3)
    syn = _synset(pre, raw[:4], [0, 1, 0, 1])
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(LtddError, match="not empty"):
        export_imagefolder(syn, pre, target, ["a", "b"])
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    export_imagefolder(syn, pre, target, ["a", "b"], overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["a", "b"]
    assert _leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    export_imagefolder(syn, pre, empty, ["a", "b"])  # an empty folder is fine without overwrite
    assert sorted(p.name for p in empty.iterdir()) == ["a", "b"]


def test_imagefolder_failure_leaves_nothing(tmp_path):
    raw, pre = _pixels_and_pre(3, size=6)
    wrong = SyntheticSet(torch.rand(2, 3, 5, 5), torch.tensor([0, 1]))  # not the size ZCA was fitted on
    with pytest.raises(LtddError, match="ZCA"):
        export_imagefolder(wrong, pre, tmp_path / "x", ["a", "b"])
    four = SyntheticSet(torch.rand(2, 4, 6, 6), torch.tensor([0, 1]))
    with pytest.raises(LtddError, match="4-channel"):
        export_imagefolder(four, pre, tmp_path / "x", ["a", "b"])
    syn = _synset(pre, raw[:3], [0, 1, 2])
    with pytest.raises(LtddError, match="class names"):
        export_imagefolder(syn, pre, tmp_path / "x", ["a", "b"])  # labels go up to 2
    assert list(tmp_path.iterdir()) == []


def test_class_folder_names_are_safe():
    assert class_folder_names(["a/b", "..", "", ".hidden", "ok"], 5) == ["a_b", "class_1", "class_2", "_hidden", "ok"]
    with pytest.raises(LtddError, match="same folder name"):
        class_folder_names(["a/b", "a_b"], 2)


@pytest.mark.parametrize("soft", [True, False])
def test_ddranking_tensors(tmp_path, soft):
    raw, pre = _pixels_and_pre(3)
    syn = _synset(pre, raw[:6], [0, 0, 1, 1, 2, 2], soft=soft)
    paths = export_ddranking(syn, tmp_path / "dd")
    assert set(paths) == {"images", "labels", "lr"}
    images = torch.load(paths["images"], weights_only=True)
    labels = torch.load(paths["labels"], weights_only=True)
    lr = torch.load(paths["lr"], weights_only=True)
    assert type(images) is torch.Tensor and type(labels) is torch.Tensor
    torch.testing.assert_close(images, syn.images, rtol=0, atol=0)  # model space, exactly as distilled
    if soft:
        assert labels.dtype == torch.float32
        torch.testing.assert_close(labels, syn.soft_labels, rtol=0, atol=0)
    else:
        assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert lr.dtype == torch.float32 and lr.ndim == 0 and abs(lr.item() - 0.0123) < 1e-7
    assert _leftovers(tmp_path) == []


def test_ddranking_without_lr_and_views(tmp_path):
    big = torch.randn(1000, 3, 8, 8)
    syn = SyntheticSet(big[:2], torch.tensor([0, 1]))  # a view into a large storage, no lr
    paths = export_ddranking(syn, tmp_path / "dd")
    assert set(paths) == {"images", "labels"} and not (tmp_path / "dd" / "lr.pt").exists()
    assert paths["images"].stat().st_size < 10_000  # only the two images, not the whole storage
    with pytest.raises(LtddError, match="not empty"):
        export_ddranking(syn, tmp_path / "dd")


# ---- the `ltdd export` command (no skip: a missing or renamed command must fail here) -------------------------

@pytest.fixture(scope="module")
def digits_set(tmp_path_factory):
    """A small set cut from the prepared digits split, saved with the metadata a distillation run writes."""
    from ltdd.config import DataConfig, to_dict
    from ltdd.data import prepare_data
    from ltdd.data.fingerprint import split_sha as _split_sha

    root = tmp_path_factory.mktemp("digits_set")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LTDD_CACHE_DIR", str(root / "cache"))
        cfg = DataConfig(dataset="digits", imbalance_factor=10)
        data = prepare_data(cfg)
        idx = torch.cat([torch.nonzero(data.train_y == c).flatten()[:2] for c in range(10)])
        soft = torch.randn(len(idx), 10, generator=torch.Generator().manual_seed(0))
        syn = SyntheticSet(data.train_x[idx], data.train_y[idx], soft, 0.02,
                           meta={"data": to_dict(cfg), "split_sha": _split_sha(data)})
        path = syn.save(root / "set")
        yield path, syn, data  # inside the context: the command rebuilds the data from the same cache


def _invoke(*args):
    from click.testing import CliRunner

    from ltdd.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_export_command_is_registered():
    from ltdd.cli import cli

    assert "export" in cli.commands
    res = _invoke("export", "--help")
    assert res.exit_code == 0 and "imagefolder" in res.output and "ddranking" in res.output


def test_export_command_imagefolder_equals_the_library(tmp_path, digits_set):
    path, syn, data = digits_set
    res = _invoke("export", path, "--format", "imagefolder", "--out", tmp_path / "cli")
    assert res.exit_code == 0, res.output
    export_imagefolder(syn, data, tmp_path / "lib", data.class_names)
    files = sorted(p.relative_to(tmp_path / "lib") for p in (tmp_path / "lib").rglob("*.png"))
    assert [str(f) for f in files] == [f"{c}/{i}.png" for c in range(10) for i in range(2)]
    assert sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*.png")) == files
    for f in files:
        assert (tmp_path / "cli" / f).read_bytes() == (tmp_path / "lib" / f).read_bytes()


def test_export_command_ddranking(tmp_path, digits_set):
    path, syn, _ = digits_set
    res = _invoke("export", path, "--format", "ddranking", "--out", tmp_path / "dd")
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(torch.load(tmp_path / "dd" / "images.pt", weights_only=True), syn.images,
                               rtol=0, atol=0)
    torch.testing.assert_close(torch.load(tmp_path / "dd" / "labels.pt", weights_only=True), syn.soft_labels,
                               rtol=0, atol=0)
    assert torch.load(tmp_path / "dd" / "lr.pt", weights_only=True).item() == pytest.approx(0.02)


def test_export_command_user_errors(tmp_path, digits_set):
    path, syn, _ = digits_set
    other = SyntheticSet(syn.images, syn.labels, meta={**syn.meta, "split_sha": "0" * 16})
    other = other.save(tmp_path / "o.safetensors")
    for args, fragment in (((other, "--format", "imagefolder"), "split"),
                           ((path, "--format", "zip"), "unknown export format"),
                           ((tmp_path / "none.safetensors",), "not found")):
        res = _invoke("export", *args, "--out", tmp_path / "out")
        assert res.exit_code == 2, res.output
        assert fragment in res.output and "Traceback" not in res.output
        assert not (tmp_path / "out").exists()
