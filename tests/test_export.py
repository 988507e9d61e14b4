"""Export of distilled sets (ImageFolder PNGs in pixel space, DD-Ranking tensors), their manifest, checksums and
atomicity, and reading exports back."""

from __future__ import annotations

import hashlib
import io
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

import ltdd
from ltdd.data.transforms import Preprocessor
from ltdd.errors import LtddError
from ltdd.export import (CHECKSUMS, MANIFEST, PREPROCESSING, class_folder_names, export_ddranking,
                         export_imagefolder, load_export)
from ltdd.synset import SyntheticSet

EXTRA = {MANIFEST, CHECKSUMS, PREPROCESSING}  # written beside the class folders / tensors of every export


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


def _dirs(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _files(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("channels,zca", [(3, True), (1, True), (3, False)])
def test_imagefolder_round_trips_pixels(tmp_path, channels, zca):
    raw, pre = _pixels_and_pre(channels, zca=zca)
    labels = [0] * 12 + [1] * 5 + [2] * 3  # 20 images, classes 0..2; class 3 has none
    raw = raw[: len(labels)]
    syn = _synset(pre, raw, labels)
    names = ["plane", "car", "bird", "cat"]
    out = export_imagefolder(syn, pre, tmp_path / "ifolder", names)
    assert _dirs(out) == sorted(names)  # every class, also the empty one
    assert set(_files(out)) == EXTRA  # no soft labels: no soft_labels.safetensors
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
    assert _dirs(out) == ["one", "zero"]
    out2 = export_imagefolder(syn, pre, tmp_path / "o2", None)  # no names anywhere: 0..C-1
    assert _dirs(out2) == ["0", "1"]


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
    assert _dirs(target) == ["a", "b"] and set(_files(target)) == EXTRA
    assert _leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    export_imagefolder(syn, pre, empty, ["a", "b"])  # an empty folder is fine without overwrite
    assert _dirs(empty) == ["a", "b"]


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
    paths = export_ddranking(syn, pre, tmp_path / "dd")
    assert set(paths) == {"images", "labels", "lr"}
    assert set(_files(tmp_path / "dd")) == EXTRA | {"images.pt", "labels.pt", "lr.pt"}
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
    pre = Preprocessor(normalize=False, zca=False)
    paths = export_ddranking(syn, pre, tmp_path / "dd")
    assert set(paths) == {"images", "labels"} and not (tmp_path / "dd" / "lr.pt").exists()
    assert paths["images"].stat().st_size < 10_000  # only the two images, not the whole storage
    with pytest.raises(LtddError, match="not empty"):
        export_ddranking(syn, pre, tmp_path / "dd")
    with pytest.raises(TypeError):
        export_ddranking(syn, tmp_path / "dd2")  # the old call shape is refused, not misread
    with pytest.raises(TypeError, match="data comes before"):
        export_ddranking(syn, tmp_path / "dd2", tmp_path / "dd3")


# ---- DD-Ranking's layout is enforced ------------------------------------------------------------------------

def test_ddranking_refuses_unequal_counts_and_non_class_major_order(tmp_path):
    raw, pre = _pixels_and_pre(3)
    names = ["plane", "car", "bird"]
    cases = [([0, 0, 1, 1, 2], "exactly 2 images per class: class 2 ('bird') has 1"),
             ([0, 0, 1, 1, 1, 2, 2], "exactly 3 images per class: class 0 ('plane') has 2"),
             ([0, 1, 0, 1, 2, 2], "class-major order: image 1 is of class 1 ('car') where class 0 was expected")]
    for labels, fragment in cases:
        syn = _synset(pre, raw[: len(labels)], labels)
        with pytest.raises(LtddError) as e:
            export_ddranking(syn, pre, tmp_path / "dd", class_names=names)
        assert fragment in str(e.value) and "\n" not in str(e.value)
    # a class without any image (the data has 4 classes) is a class with 0 images
    syn = _synset(pre, raw[:6], [0, 0, 1, 1, 2, 2])
    with pytest.raises(LtddError, match=r"class 3 \('cat'\) has 0"):
        export_ddranking(syn, pre, tmp_path / "dd", class_names=names + ["cat"])
    # the recorded IPC counts, not only equality
    syn.meta = {"ipc": 3}
    with pytest.raises(LtddError, match=r"exactly 3 images per class: class 0 \('plane'\) has 2"):
        export_ddranking(syn, pre, tmp_path / "dd", class_names=names)
    assert list(tmp_path.iterdir()) == []


# ---- reading back ---------------------------------------------------------------------------------------------

def _model_space_bound(pre) -> float:
    """The largest model-space change that half a grey level per pixel value can cause: model = (p / std - m) @ W
    elementwise, so |d model_j| <= 0.5 / 255 * sum_i |W_ij| / std_i."""
    d = pre.whitener.mean.numel()
    c = pre.normalizer.std.numel()
    inv_std = (1.0 / pre.normalizer.std.double()).repeat_interleave(d // c)  # (C*H*W,) in CHW order
    return float(0.5 / 255 * (pre.whitener.matrix.double().abs() * inv_std[:, None]).sum(0).max())


@pytest.mark.parametrize("channels", [3, 1])
def test_imagefolder_reads_back_within_png_quantisation(tmp_path, channels):
    raw, pre = _pixels_and_pre(channels, size=6)
    pixels = torch.rand(9, channels, 6, 6, generator=torch.Generator().manual_seed(2)) * 0.96 + 0.02  # not on 1/255
    syn = SyntheticSet(pre.to_model_space(pixels), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]),
                       torch.randn(9, 3, generator=torch.Generator().manual_seed(3)), 0.0123,
                       meta={"method": "tm", "ipc": 3, "note": "kept"})
    syn.labels = syn.labels[[3, 0, 6, 1, 4, 7, 2, 5, 8]]  # not class-major: the set's order must come back
    out = export_imagefolder(syn, pre, tmp_path / "if", ["a", "b", "c"])
    back = SyntheticSet.load(out)
    assert back.labels.tolist() == syn.labels.tolist()
    torch.testing.assert_close(back.soft_labels, syn.soft_labels, rtol=0, atol=0)
    assert back.lr == syn.lr and back.meta == syn.meta
    err = float((back.images - syn.images).abs().max())
    bound = _model_space_bound(pre)
    assert err <= bound * 1.001 + 1e-5, (err, bound)
    assert err > bound / 100  # the PNGs really are 8-bit: the round trip is not exact
    px_err = float((pre.to_pixels(back.images, clamp=False) - pixels).abs().max())
    assert px_err <= 0.5 / 255 + 1e-5
    m = json.loads((out / MANIFEST).read_text())["imagefolder"]
    assert m["clamped_values"] == 0 and m["roundtrip_max_abs_error"]["model_space"] == pytest.approx(err, abs=1e-6)


def test_imagefolder_records_clamped_values(tmp_path):
    _, pre = _pixels_and_pre(3, size=6)
    pixels = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(5)) * 1.4 - 0.2  # partly outside [0, 1]
    syn = SyntheticSet(pre.to_model_space(pixels), torch.tensor([0, 0, 1, 1]))
    out = export_imagefolder(syn, pre, tmp_path / "if", ["a", "b"])
    rec = json.loads((out / MANIFEST).read_text())["imagefolder"]
    assert rec["clamped_values"] == int(((pixels < 0) | (pixels > 1)).sum()) > 0
    assert rec["total_values"] == pixels.numel()
    back = SyntheticSet.load(out / MANIFEST)  # the manifest's path works too
    torch.testing.assert_close(pre.to_pixels(back.images), pixels.clamp(0, 1), rtol=0, atol=0.5 / 255 + 1e-5)


@pytest.mark.parametrize("soft", [True, False])
def test_ddranking_reads_back_exactly(tmp_path, soft):
    raw, pre = _pixels_and_pre(3)
    syn = _synset(pre, raw[:6], [0, 0, 1, 1, 2, 2], soft=soft)
    syn.meta = {"method": "dm", "ipc": 2, "nested": {"a": [1, 2]}}
    export_ddranking(syn, pre, tmp_path / "dd")
    back = SyntheticSet.load(tmp_path / "dd")
    torch.testing.assert_close(back.images, syn.images, rtol=0, atol=0)
    assert back.labels.tolist() == syn.labels.tolist()
    if soft:
        torch.testing.assert_close(back.soft_labels, syn.soft_labels, rtol=0, atol=0)
    else:
        assert back.soft_labels is None
    assert back.lr == syn.lr and back.meta == syn.meta


def test_tampered_or_missing_files_are_refused(tmp_path):
    raw, pre = _pixels_and_pre(3)
    syn = _synset(pre, raw[:6], [0, 0, 1, 1, 2, 2], soft=True)
    export_imagefolder(syn, pre, tmp_path / "if", ["a", "b", "c"])
    export_ddranking(syn, pre, tmp_path / "dd")
    SyntheticSet.load(tmp_path / "if")
    SyntheticSet.load(tmp_path / "dd")  # untouched exports load

    def tamper(path):
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        path.write_bytes(bytes(blob))

    for folder, rel in (("if", "b/0.png"), ("if", PREPROCESSING), ("if", "soft_labels.safetensors"),
                        ("dd", "images.pt"), ("dd", "labels.pt"), ("dd", "lr.pt")):
        target = tmp_path / f"{folder}-{rel.replace('/', '_')}"
        __import__("shutil").copytree(tmp_path / folder, target)
        tamper(target / rel)
        with pytest.raises(LtddError, match=f"{rel} was changed after export"):
            SyntheticSet.load(target)
    # the manifest itself is covered by SHA256SUMS
    target = tmp_path / "if-manifest"
    __import__("shutil").copytree(tmp_path / "if", target)
    m = json.loads((target / MANIFEST).read_text())
    m["lr"]["value"] = 1.0
    (target / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
    with pytest.raises(LtddError, match="manifest.json was changed after export"):
        SyntheticSet.load(target)
    (target / "a" / "0.png").unlink()
    (target / CHECKSUMS).unlink()
    with pytest.raises(LtddError, match="a/0.png is missing"):
        SyntheticSet.load(target)


def test_reading_never_unpickles(tmp_path):
    """An images.pt holding a pickled object (checksums made to fit) is refused without running it."""
    raw, pre = _pixels_and_pre(3)
    export_ddranking(_synset(pre, raw[:2], [0, 1]), pre, tmp_path / "dd")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    torch.save(Payload(), buf)
    (tmp_path / "dd" / "images.pt").write_bytes(buf.getvalue())
    m = json.loads((tmp_path / "dd" / MANIFEST).read_text())
    m["files"]["images.pt"]["sha256"] = _sha(tmp_path / "dd" / "images.pt")
    (tmp_path / "dd" / MANIFEST).write_text(json.dumps(m))
    (tmp_path / "dd" / CHECKSUMS).unlink()
    with pytest.raises(LtddError, match="images.pt is not a plain tensor file"):
        SyntheticSet.load(tmp_path / "dd")
    assert not marker.exists()


def test_preprocessing_mismatch_is_refused(tmp_path):
    """A preprocessing.safetensors that is not the one the manifest describes (checksums made to fit) is refused:
    the PNGs would be mapped into another model space."""
    from ltdd.export.staging import _st_bytes

    raw, pre = _pixels_and_pre(3)
    export_imagefolder(_synset(pre, raw[:2], [0, 1]), pre, tmp_path / "if", ["a", "b"])
    _, other = _pixels_and_pre(3, seed=9)
    (tmp_path / "if" / PREPROCESSING).write_bytes(_st_bytes(other.state_dict()))
    m = json.loads((tmp_path / "if" / MANIFEST).read_text())
    m["files"][PREPROCESSING]["sha256"] = _sha(tmp_path / "if" / PREPROCESSING)
    (tmp_path / "if" / MANIFEST).write_text(json.dumps(m))
    (tmp_path / "if" / CHECKSUMS).unlink()
    with pytest.raises(LtddError, match="does not hold the preprocessing its manifest describes"):
        SyntheticSet.load(tmp_path / "if")


# ---- atomicity ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["imagefolder", "ddranking"])
@pytest.mark.parametrize("fail_at", [1, 3, "last"])
def test_a_failure_mid_export_leaves_no_folder(tmp_path, monkeypatch, fmt, fail_at):
    import ltdd.export as E

    raw, pre = _pixels_and_pre(3)
    syn = _synset(pre, raw[:6], [0, 0, 1, 1, 2, 2], soft=True)
    real = E.staging._fsync_write
    calls = []

    def count(path, data):
        calls.append(path.name)
        return real(path, data)

    export = (lambda out: export_imagefolder(syn, pre, out, ["a", "b", "c"])) if fmt == "imagefolder" else \
        (lambda out: export_ddranking(syn, pre, out))
    monkeypatch.setattr(E.staging, "_fsync_write", count)
    export(tmp_path / "probe")
    total = len(calls)
    assert calls[-1] == CHECKSUMS and total >= 5
    n = total if fail_at == "last" else fail_at

    def failing(path, data):
        calls.append(path.name)
        if len(calls) == n:
            real(path, data[: len(data) // 2])  # half a file on disk, then the process "dies"
            raise KeyboardInterrupt
        return real(path, data)

    calls.clear()
    monkeypatch.setattr(E.staging, "_fsync_write", failing)
    with pytest.raises(KeyboardInterrupt):
        export(tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    # an existing export is not damaged by a failed overwrite
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        E.export_ddranking(syn, pre, tmp_path / "probe", overwrite=True) if fmt == "ddranking" else \
            E.export_imagefolder(syn, pre, tmp_path / "probe", ["a", "b", "c"], overwrite=True)
    monkeypatch.setattr(E.staging, "_fsync_write", real)
    SyntheticSet.load(tmp_path / "probe")
    assert _leftovers(tmp_path) == []


# ---- the manifest on a small digits set -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A digits run folder as `ltdd distill` leaves it (distilled.safetensors with its metadata, config.yaml) plus
    a teacher. IF 10 with n_max 20 gives tail classes with 2 images, fewer than IPC 3 (duplicated cyclically)."""
    from ltdd.config import DataConfig, DistillConfig, ModelConfig, RunConfig, save_yaml, to_dict
    from ltdd.data import prepare_data
    from ltdd.data.fingerprint import fingerprint, split_sha
    from ltdd.labels import save_teacher
    from ltdd.models import create_model

    root = tmp_path_factory.mktemp("digits_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LTDD_CACHE_DIR", str(root / "cache"))
        cfg = DataConfig(dataset="digits", imbalance_factor=10, max_per_class=20, seed=3)
        data = prepare_data(cfg)
        ipc = 3
        idx = torch.cat([torch.nonzero(data.train_y == c).flatten()[torch.arange(ipc) % int((data.train_y == c).sum())]
                         for c in range(10)])
        soft = torch.randn(len(idx), 10, generator=torch.Generator().manual_seed(0))
        meta = {"method": "tm", "data": to_dict(cfg), "ipc": ipc, "dataset": data.name, "split_sha": split_sha(data),
                "preprocessor": data.preprocessor.config(), "fingerprint": fingerprint(data), "iterations": 7,
                "class_names": list(data.class_names), "train_counts": list(data.train_counts)}
        syn = SyntheticSet(data.train_x[idx], data.train_y[idx], soft, 0.0234, meta=meta)
        run = root / "run"
        path = syn.save(run / "distilled.safetensors")
        syn = SyntheticSet.load(path)  # as the command sees it (lr and metadata after the file round trip)
        run_cfg = RunConfig(data=cfg, distill=DistillConfig(method="tm", ipc=ipc, duplicate=False, temperature=2.0),
                            protocol="dc", protocol_overrides={"train": {"temperature": 1.5}})
        save_yaml(run / "config.yaml", run_cfg)
        torch.manual_seed(0)
        net = create_model("convnet", 10, data.channels, data.im_size, width=8).eval()
        save_teacher(run / "teacher.safetensors", net, ModelConfig("convnet", {"width": 8}), data,
                     description="test teacher")
        teacher = {k: v.detach().clone() for k, v in net.state_dict().items()}
        yield types.SimpleNamespace(path=path, run=run, syn=syn, data=data, cfg=cfg, run_cfg=to_dict(run_cfg),
                                    teacher=teacher, net=net, ipc=ipc, root=root)


@pytest.mark.parametrize("fmt", ["imagefolder", "ddranking"])
def test_manifest_fields_on_digits(tmp_path, digits_run, fmt):
    from ltdd.data.sources import load_source

    d = digits_run
    res = _invoke("export", d.path, "--format", fmt, "--out", tmp_path / "x")
    assert res.exit_code == 0, res.output
    out = tmp_path / "x"
    m = json.loads((out / MANIFEST).read_text())
    assert m["format"] == "ltdd-export" and m["layout"] == fmt and m["ltdd_version"] == ltdd.__version__

    # dataset and split, computed here from the labels of the long-tailed split
    counts = np.bincount(d.data.train_y.numpy(), minlength=10).tolist()
    assert max(counts) == 20 and max(counts) / min(counts) == pytest.approx(10.0)
    ds = m["dataset"]
    assert (ds["name"], ds["imbalance_factor"], ds["split_seed"], ds["train_counts"]) == ("digits", 10.0, 3, counts)
    assert ds["split_sha"] == hashlib.sha256(np.asarray(d.data.split.indices, np.int64).tobytes()).hexdigest()[:16]
    assert ds["config"] == d.syn.meta["data"]

    # IPC, class order and names, the n_c < IPC policy (duplicate=False in the run config: noise)
    assert m["set"]["ipc"] == 3 and m["set"]["images_per_class"] == [3] * 10
    assert [c["name"] for c in m["classes"]] == [str(c) for c in range(10)]
    assert [c["index"] for c in m["classes"]] == list(range(10))
    assert [c["real_train_count"] for c in m["classes"]] == counts
    below = [c for c in range(10) if counts[c] < 3]
    assert below and m["small_class_policy"]["rule"] == "noise"
    assert m["small_class_policy"]["classes_below_ipc"] == below
    assert [c["below_ipc"] for c in m["classes"]] == [n < 3 for n in counts]

    # preprocessing: mean/std from the raw pixels of the split, the ZCA matrix whitens their covariance
    src = load_source("digits", None, test_per_class=d.cfg.test_per_class, seed=d.cfg.seed)
    px = src.train.images[d.data.split.indices].astype(np.float64) / 255.0  # (N, H, W, C)
    px = px.reshape(len(px), -1, px.shape[-1]) if px.ndim == 4 else px.reshape(len(px), -1, 1)
    mean, std = px.mean(axis=(0, 1)), px.std(axis=(0, 1))
    p = m["preprocessing"]
    np.testing.assert_allclose(p["mean"], mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(p["std"], std, rtol=0, atol=1e-6)
    assert p["zca"] is True and p["zca_eps"] == pytest.approx(0.1) and p["file"] == PREPROCESSING
    from safetensors.torch import load_file

    st = load_file(str(out / PREPROCESSING))
    w = st["zca.matrix"].double().numpy()
    z = ((px - mean) / std).reshape(len(px), -1)  # digits have one channel: flat order = CHW order
    cov = np.cov(z, rowvar=False)
    np.testing.assert_allclose(w @ (cov + 0.1 * np.eye(len(cov))) @ w, np.eye(len(cov)), atol=2e-3)
    assert p["fitted_on"]["num_images"] == len(px) and p["fitted_on"]["train_counts"] == counts
    assert "long-tailed" in p["fitted_on"]["split"]
    assert p["fitted_on"]["fingerprint"] == d.syn.meta["fingerprint"] == ds["fingerprint"]

    # labels, lr, protocol, method
    assert m["labels"]["type"] == "soft_logits" and m["labels"]["temperature"] == 1.5
    assert m["labels"]["distill_temperature"] == 2.0
    assert m["lr"] == {"learned": True, "value": pytest.approx(0.0234, rel=1e-6), "use": m["lr"]["use"]}
    ep = m["evaluation_protocol"]
    assert ep["name"] == "dc" and ep["config"]["train"]["epochs"] == 300 and ep["config"]["train"]["temperature"] == 1.5
    assert m["method"]["name"] == "tm" and m["method"]["config"] == d.run_cfg["distill"]
    assert m["method"]["run_config"]["protocol"] == "dc"
    assert m["set_meta"] == d.syn.meta

    # the teacher ships with it, with its description (the ltdd.labels teacher format)
    assert m["teacher"]["info"]["model"] == {"name": "convnet", "args": {"width": 8}}
    assert m["teacher"]["info"]["description"] == "test teacher"
    assert json.loads((out / "teacher.json").read_text()) == m["teacher"]["info"]
    assert (out / "teacher.safetensors").read_bytes() == (d.run / "teacher.safetensors").read_bytes()

    # sha256 of every file written; SHA256SUMS covers them and the manifest
    on_disk = sorted(str(q.relative_to(out)) for q in out.rglob("*") if q.is_file())
    assert sorted(m["files"]) == sorted(set(on_disk) - {MANIFEST, CHECKSUMS})
    for rel, rec in m["files"].items():
        assert rec == {"sha256": _sha(out / rel), "bytes": (out / rel).stat().st_size}
    sums = dict(reversed(ln.split("  ", 1)) for ln in (out / CHECKSUMS).read_text().splitlines())
    assert sums == {rel: _sha(out / rel) for rel in set(on_disk) - {CHECKSUMS}}


def test_ddranking_export_of_digits_with_teacher(tmp_path, digits_run):
    d = digits_run
    res = _invoke("export", d.path, "--format", "ddranking", "--out", tmp_path / "dd")
    assert res.exit_code == 0, res.output
    out = tmp_path / "dd"
    m = json.loads((out / MANIFEST).read_text())
    pt = torch.load(out / "teacher_model.pt", weights_only=True)
    assert type(pt) is dict and set(pt) == set(d.teacher)
    for k, v in d.teacher.items():
        torch.testing.assert_close(pt[k], v, rtol=0, atol=0)
    assert "teacher_model.pt" in m["teacher"]["pt_note"] and ".pt" in m["teacher"]["pt_note"]
    # both teacher files are teachers ltdd itself reads (the .pt through teacher_model.json beside it)
    from ltdd.labels import load_teacher

    x = d.data.train_x[:5]
    with torch.no_grad():
        want = d.net(x)
        for name in ("teacher_model.pt", "teacher.safetensors"):
            torch.testing.assert_close(load_teacher(out / name, d.data).model(x), want, rtol=0, atol=0)
    assert m["ddranking"]["files"]["teacher"] == "teacher_model.pt"
    notes = " ".join(m["ddranking"]["notes"])
    assert "fits its ZCA on the balanced train set" in notes and "long-tailed" in notes
    assert "class-major" in m["ddranking"]["order"]
    back = SyntheticSet.load(out)
    torch.testing.assert_close(back.images, d.syn.images, rtol=0, atol=0)
    torch.testing.assert_close(back.soft_labels, d.syn.soft_labels, rtol=0, atol=0)
    assert back.labels.tolist() == d.syn.labels.tolist() and back.lr == d.syn.lr and back.meta == d.syn.meta


def test_teacher_named_by_the_set_with_its_description_in_the_file(tmp_path, digits_run):
    """RLDD's way: the set's metadata names the teacher file, whose safetensors metadata describes the network."""
    from safetensors.torch import save_file

    d = digits_run
    run = tmp_path / "run"
    path = SyntheticSet(d.syn.images, d.syn.labels, d.syn.soft_labels, None,
                        meta={**d.syn.meta, "teacher": "net.safetensors"}).save(run / "distilled.safetensors")
    info = {"model": {"name": "convnet", "args": {"width": 8}}, "num_classes": 10, "role": "teacher"}
    save_file(d.teacher, str(run / "net.safetensors"), metadata={"ltdd_network": json.dumps(info)})
    (run / "teacher.safetensors").write_bytes(b"not this one")
    res = _invoke("export", path, "--format", "ddranking", "--out", tmp_path / "dd")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "dd" / MANIFEST).read_text())
    assert m["teacher"]["info"] == info and json.loads((tmp_path / "dd" / "teacher.json").read_text()) == info
    assert (tmp_path / "dd" / "teacher.safetensors").read_bytes() == (run / "net.safetensors").read_bytes()
    assert "lr" not in m["ddranking"]["files"] and m["lr"]["learned"] is False
    (run / "net.safetensors").unlink()
    res = _invoke("export", path, "--format", "ddranking", "--out", tmp_path / "dd2")
    assert res.exit_code == 2 and "names its teacher net.safetensors" in res.output
    assert not (tmp_path / "dd2").exists()


def test_imagefolder_export_of_digits_reads_back(tmp_path, digits_run):
    d = digits_run
    res = _invoke("export", d.path, "--format", "imagefolder", "--out", tmp_path / "if")
    assert res.exit_code == 0, res.output
    back = SyntheticSet.load(tmp_path / "if")
    assert back.labels.tolist() == d.syn.labels.tolist() and back.lr == d.syn.lr and back.meta == d.syn.meta
    torch.testing.assert_close(back.soft_labels, d.syn.soft_labels, rtol=0, atol=0)
    assert float((back.images - d.syn.images).abs().max()) <= _model_space_bound(d.data.preprocessor) + 1e-5
    back.check_compatible(d.data)  # same data contract as the original
    # an export exports again (the run config and the teacher travel inside it)
    res = _invoke("export", tmp_path / "if", "--format", "imagefolder", "--out", tmp_path / "again")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "again" / MANIFEST).read_text())
    assert m["method"]["run_config"]["protocol"] == "dc" and m["teacher"] is not None


def test_eval_reads_an_export(tmp_path, digits_run):
    d = digits_run
    assert _invoke("export", d.path, "--format", "ddranking", "--out", tmp_path / "dd").exit_code == 0
    res = _invoke("eval", tmp_path / "dd", "--protocol", "cpu", "--runs", "1", "--set", "train.epochs=1",
                  "--set", "model.args.width=8", "--out", tmp_path / "ev", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["protocol_name"] == "cpu"
    # without --out the export stays untouched (its SHA256SUMS still hold): the result goes beside the folder
    before = sorted(p.name for p in (tmp_path / "dd").iterdir())
    res = _invoke("eval", tmp_path / "dd", "--protocol", "cpu", "--runs", "1", "--set", "train.epochs=1",
                  "--set", "model.args.width=8")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "dd").iterdir()) == before
    assert json.loads((tmp_path / "dd.eval.json").read_text())["protocol_name"] == "cpu"
    tampered = tmp_path / "dd" / "labels.pt"
    blob = bytearray(tampered.read_bytes())
    blob[-1] ^= 0xFF
    tampered.write_bytes(bytes(blob))
    res = _invoke("eval", tmp_path / "dd", "--protocol", "cpu", "--out", tmp_path / "ev2")
    assert res.exit_code == 2 and "labels.pt was changed after export" in res.output
    assert "Traceback" not in res.output


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
    assert "manifest.json" in res.output


def test_export_command_imagefolder_equals_the_library(tmp_path, digits_set):
    path, syn, data = digits_set
    res = _invoke("export", path, "--format", "imagefolder", "--out", tmp_path / "cli")
    assert res.exit_code == 0, res.output
    export_imagefolder(SyntheticSet.load(path), data, tmp_path / "lib", data.class_names)
    files = sorted(p.relative_to(tmp_path / "lib") for p in (tmp_path / "lib").rglob("*.png"))
    assert [str(f) for f in files] == [f"{c}/{i}.png" for c in range(10) for i in range(2)]
    assert sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*.png")) == files
    for f in files:
        assert (tmp_path / "cli" / f).read_bytes() == (tmp_path / "lib" / f).read_bytes()
    a, b = (json.loads((tmp_path / x / MANIFEST).read_text()) for x in ("cli", "lib"))
    a.pop("created_utc"), b.pop("created_utc")
    assert a == b
    # no run config beside the set: the manifest says what it does not know instead of guessing
    assert a["small_class_policy"]["rule"] is None and a["evaluation_protocol"] is None and a["teacher"] is None


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
    shuffled = SyntheticSet(syn.images.flip(0), syn.labels.flip(0), meta=syn.meta).save(tmp_path / "s.safetensors")
    from ltdd.config import DataConfig, RunConfig, save_yaml

    save_yaml(tmp_path / "cfg.yaml", RunConfig(data=DataConfig(dataset="digits", imbalance_factor=20)))
    for args, fragment in (((other, "--format", "imagefolder"), "split"),
                           ((path, "--run-config", tmp_path / "cfg.yaml"), "describes other data"),
                           ((other, "--format", "ddranking"), "split"),
                           ((shuffled, "--format", "ddranking"), "class-major order"),
                           ((path, "--format", "zip"), "unknown export format"),
                           ((path, "--teacher", tmp_path / "nope.safetensors"), "teacher file not found"),
                           ((path, "--run-config", tmp_path / "nope.yaml"), "config file not found"),
                           ((tmp_path / "none.safetensors",), "not found")):
        res = _invoke("export", *args, "--out", tmp_path / "out")
        assert res.exit_code == 2, res.output
        assert fragment in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()
