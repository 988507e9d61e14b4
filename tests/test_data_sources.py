"""Raw sources: CIFAR pickles (restricted unpickler), ImageFolder folders and archives, digits, the cache."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltdd.data import sources
from ltdd.data.sources import ImageSet, SourceData, list_sources, load_source
from ltdd.errors import LtddError

CLASSES = ["cat", "dog", "frog"]


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _img(color, size=(8, 8), mode="RGB"):
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[...] = color
    im = Image.fromarray(arr, "RGB")
    return im.convert(mode) if mode != "RGB" else im


def _png_bytes(im: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _tree_files(n_train=(3, 2, 4), n_test=2, size=(8, 8), prefix="") -> dict[str, bytes]:
    """{relative path: PNG bytes}; class k images are filled with a colour that encodes (k, index)."""
    files = {}
    for k, c in enumerate(CLASSES):
        for i in range(n_train[k]):
            files[f"{prefix}train/{c}/{i:03d}.png"] = _png_bytes(_img((40 * k, 10 * i, 7), size))
        for i in range(n_test):
            files[f"{prefix}test/{c}/{i:03d}.png"] = _png_bytes(_img((40 * k, 10 * i, 200), size))
    return files


def _write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _write_tar(path: Path, files: dict[str, bytes], mode="w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for rel, data in files.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    return path


def _cifar_batch(n, num_classes, seed, label_key="labels", extra=None):
    rng = np.random.RandomState(seed)
    d = {
        b"batch_label": b"training batch",
        label_key.encode(): [int(v) for v in rng.randint(0, num_classes, size=n)],
        b"data": rng.randint(0, 256, size=(n, 3072)).astype(np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if extra:
        d.update(extra)
    return d


def _write_cifar10(folder: Path, n=6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(n, 10, i)))
    (folder / "test_batch").write_bytes(pickle.dumps(_cifar_batch(n, 10, 99)))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": names, b"num_cases_per_batch": n, b"num_vis": 3072})
    )
    return folder


def _write_cifar100(folder: Path, n=20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in (("train", 1), ("test", 2)):
        d = _cifar_batch(n, 100, seed, "fine_labels")
        d[b"coarse_labels"] = [v // 5 for v in d[b"fine_labels"]]
        (folder / name).write_bytes(pickle.dumps(d))
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return folder


class _Evil:
    """Pickles to a call of ``fn(*args)``: what a booby-trapped dataset file does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


# ----------------------------------------------------------------------------------------------------------------
# registry


def test_list_sources_and_unknown_name():
    assert list_sources() == ["cifar10", "cifar100", "digits", "imagefolder", "tiny_imagenet"]
    with pytest.raises(LtddError) as e:
        load_source("mnist")
    msg = str(e.value)
    assert "mnist" in msg and "cifar10" in msg and "imagefolder" in msg and "\n" not in msg


def test_imageset_validates_shapes():
    with pytest.raises(ValueError):
        ImageSet(np.zeros((2, 4, 4, 2), np.uint8), np.zeros(2), ["a"])
    with pytest.raises(ValueError):
        ImageSet(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2), ["a"])
    s = ImageSet(np.zeros((2, 4, 4, 3), np.uint8), [0, 1], ["a", "b"])
    assert s.labels.dtype == np.int64 and s.counts() == [1, 1] and len(s) == 2


# ----------------------------------------------------------------------------------------------------------------
# CIFAR pickles


def test_cifar10_batches_load(tmp_path):
    folder = _write_cifar10(tmp_path / "data" / "cifar-10-batches-py")
    for root in (tmp_path / "data", folder):  # the parent or the batches folder itself
        src = load_source("cifar10", root, cache_dir=tmp_path / "cache")
        assert src.name == "cifar10"
        assert src.train.images.shape == (30, 32, 32, 3) and src.train.images.dtype == np.uint8
        assert src.test.images.shape == (6, 32, 32, 3)
        assert src.class_names[0] == "airplane" and len(src.class_names) == 10
    # pixel layout: row of 3072 = R plane, G plane, B plane
    raw = _cifar_batch(6, 10, 1)[b"data"]
    np.testing.assert_array_equal(src.train.images[0, :, :, 0], raw[0, :1024].reshape(32, 32))
    np.testing.assert_array_equal(src.train.images[0, :, :, 2], raw[0, 2048:].reshape(32, 32))
    np.testing.assert_array_equal(src.train.labels[:6], _cifar_batch(6, 10, 1)[b"labels"])


def test_cifar10_image_size_resizes(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py", n=2)
    src = load_source("cifar10", tmp_path, image_size=16, cache_dir=False)
    assert src.train.images.shape == (10, 16, 16, 3)


def test_cifar100_fine_and_coarse(tmp_path):
    _write_cifar100(tmp_path / "cifar-100-python")
    fine = load_source("cifar100", tmp_path, cache_dir=tmp_path / "c")
    coarse = load_source("cifar100", tmp_path, label_kind="coarse", cache_dir=tmp_path / "c")
    assert len(fine.class_names) == 100 and fine.class_names[3] == "fine3"
    assert len(coarse.class_names) == 20 and coarse.class_names[0] == "coarse0"
    np.testing.assert_array_equal(coarse.train.labels, fine.train.labels // 5)
    with pytest.raises(LtddError, match="label_kind"):
        load_source("cifar100", tmp_path, label_kind="medium", cache_dir=False)


def _legacy_numpy_pickle(obj) -> bytes:
    """pickle.dumps(obj) as numpy 1.x writes it: arrays reconstructed via ``numpy.core.multiarray``
    (the module path inside the official CIFAR batches)."""
    data = pickle.dumps(obj, protocol=4)
    old, new = b"numpy._core.multiarray", b"numpy.core.multiarray"
    op_old, op_new = b"\x8c" + bytes([len(old)]) + old, b"\x8c" + bytes([len(new)]) + new
    if op_old not in data:  # numpy 1.x already writes the legacy path
        return data
    assert data.count(op_old) == 1 and data[2] == 0x95  # one protocol-4 frame: shrink its length by one
    data = data.replace(op_old, op_new)
    return data[:3] + (int.from_bytes(data[3:11], "little") - 1).to_bytes(8, "little") + data[11:]


def test_cifar_pickle_with_numpy_arrays_loads(tmp_path):
    # labels stored as a real numpy array (pickle.dumps of an np.ndarray) rather than a list
    folder = _write_cifar10(tmp_path / "cifar-10-batches-py", n=4)
    d = _cifar_batch(4, 10, 1)
    d[b"labels"] = np.array(d[b"labels"], dtype=np.int64)
    (folder / "data_batch_1").write_bytes(pickle.dumps(d))
    d2 = _cifar_batch(4, 10, 2)
    legacy = _legacy_numpy_pickle(d2)
    assert b"numpy.core.multiarray" in legacy or b"numpy._core" not in pickle.dumps(d2)
    (folder / "data_batch_2").write_bytes(legacy)
    src = load_source("cifar10", tmp_path, cache_dir=False)
    np.testing.assert_array_equal(src.train.labels[:4], d[b"labels"])
    np.testing.assert_array_equal(src.train.images[4:8], d2[b"data"].reshape(4, 3, 32, 32).transpose(0, 2, 3, 1))


def test_restricted_unpickler_accepts_plain_data():
    obj = {b"a": [1, 2, b"x", "y"], "arr": np.arange(6, dtype=np.uint8).reshape(2, 3), "f": 1.5}
    out = sources.restricted_pickle_load(pickle.dumps(obj), "mem")
    np.testing.assert_array_equal(out["arr"], obj["arr"])
    assert out[b"a"] == [1, 2, b"x", "y"]


@pytest.mark.parametrize("kind", ["os.system", "eval", "exec_write"])
def test_malicious_cifar_pickle_is_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        evil = _Evil(os.system, f"touch {marker}")
    elif kind == "eval":
        evil = _Evil(eval, f"open({str(marker)!r}, 'w').write('x')")
    else:
        evil = _Evil(exec, f"open({str(marker)!r}, 'w').write('x')")
    folder = _write_cifar10(tmp_path / "cifar-10-batches-py", n=2)
    d = _cifar_batch(2, 10, 1, extra={b"payload": evil})
    (folder / "data_batch_3").write_bytes(pickle.dumps(d))
    with pytest.raises(LtddError) as e:
        load_source("cifar10", tmp_path, cache_dir=False)
    msg = str(e.value)
    assert "refuses to load" in msg and "data_batch_3" in msg and "\n" not in msg
    expected = {"os.system": ("posix.system", "os.system", "nt.system"), "eval": ("builtins.eval",),
                "exec_write": ("builtins.exec",)}[kind]
    assert any(name in msg for name in expected), msg
    assert not marker.exists()


def test_corrupt_cifar_batch_names_file(tmp_path):
    folder = _write_cifar10(tmp_path / "cifar-10-batches-py", n=2)
    (folder / "test_batch").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(LtddError, match="test_batch"):
        load_source("cifar10", tmp_path, cache_dir=False)


def test_cifar_missing_root_and_missing_batch(tmp_path):
    with pytest.raises(LtddError, match="does not exist"):
        load_source("cifar10", tmp_path / "nope")
    with pytest.raises(LtddError, match="needs a root"):
        load_source("cifar10", None)
    folder = _write_cifar10(tmp_path / "cifar-10-batches-py", n=2)
    (folder / "data_batch_4").unlink()
    with pytest.raises(LtddError, match="data_batch_4"):
        load_source("cifar10", tmp_path, cache_dir=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LtddError, match="cifar-10-batches-py"):
        load_source("cifar10", empty, cache_dir=False)


def test_cifar_batches_inside_archive(tmp_path):
    folder = _write_cifar10(tmp_path / "src" / "cifar-10-batches-py", n=3)
    files = {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in folder.iterdir()}
    arch = _write_tar(tmp_path / "cifar-10-python.tar.gz", files)
    a = load_source("cifar10", arch, cache_dir=False)
    b = load_source("cifar10", tmp_path / "src", cache_dir=False)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)


def test_cifar10_falls_back_to_imagefolder(tmp_path):
    arch = _write_tar(tmp_path / "c10.tar.gz", _tree_files())
    src = load_source("cifar10", arch, cache_dir=tmp_path / "cache")
    assert src.name == "cifar10" and src.class_names == CLASSES
    d = _write_dir(tmp_path / "tree", _tree_files())
    assert load_source("cifar10", d, cache_dir=False).train.images.shape == (9, 8, 8, 3)
    with pytest.raises(LtddError, match="label_kind"):
        load_source("cifar100", d, label_kind="coarse", cache_dir=False)


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder


def _check_tree_source(src: SourceData):
    assert src.class_names == CLASSES
    assert src.train.images.shape == (9, 8, 8, 3) and src.test.images.shape == (6, 8, 8, 3)
    assert src.train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert src.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # sorted file order within a class; pixel values survive PNG exactly
    assert src.train.images[3, 0, 0].tolist() == [40, 0, 7]
    assert src.train.images[4, 0, 0].tolist() == [40, 10, 7]
    assert src.test.images[5, 0, 0].tolist() == [80, 10, 200]


def test_imagefolder_dir(tmp_path):
    files = _tree_files()
    files["train/.DS_Store"] = b"junk"
    files["train/dog/.hidden.png"] = b"not an image"
    files[".git/config"] = b"junk"
    _check_tree_source(load_source("imagefolder", _write_dir(tmp_path / "d", files), cache_dir=tmp_path / "c"))


@pytest.mark.parametrize("fmt", ["tar.gz", "tar", "tgz", "zip"])
def test_imagefolder_archives(tmp_path, fmt):
    files = _tree_files(prefix="CIFAR-10-images/")
    files["CIFAR-10-images/train/cat/._000.png"] = b"mac junk"
    files["__MACOSX/CIFAR-10-images/train/cat/._000.png"] = b"mac junk"
    path = tmp_path / f"data.{fmt}"
    if fmt == "zip":
        _write_zip(path, files)
    else:
        _write_tar(path, files, "w:gz" if fmt != "tar" else "w")
    _check_tree_source(load_source("imagefolder", path, cache_dir=False))


def test_imagefolder_val_dir_and_nested_files(tmp_path):
    files = {k.replace("test/", "val/"): v for k, v in _tree_files().items()}
    files["train/cat/sub/extra.png"] = _png_bytes(_img((1, 2, 3)))
    src = load_source("imagefolder", _write_dir(tmp_path / "d", files), cache_dir=False)
    assert src.train.counts() == [4, 2, 4] and src.test.counts() == [2, 2, 2]


def test_imagefolder_grayscale_keeps_one_channel_and_mixed_becomes_rgb(tmp_path):
    gray = {}
    for c in ("a", "b"):
        for s in ("train", "test"):
            gray[f"{s}/{c}/0.png"] = _png_bytes(_img((100, 100, 100), mode="L"))
    src = load_source("imagefolder", _write_dir(tmp_path / "g", gray), cache_dir=False)
    assert src.train.images.shape == (2, 8, 8, 1) and src.train.images[0, 0, 0, 0] == 100
    gray["train/a/1.jpg"] = _png_bytes(_img((10, 200, 30)), fmt="JPEG")
    src = load_source("imagefolder", _write_dir(tmp_path / "m", gray), cache_dir=False)
    assert src.train.images.shape == (3, 8, 8, 3)
    assert src.train.images[0, 0, 0].tolist() == [100, 100, 100]


def test_imagefolder_size_mismatch_and_resize(tmp_path):
    files = _tree_files()
    files["train/dog/009.png"] = _png_bytes(_img((1, 2, 3), size=(10, 6)))
    root = _write_dir(tmp_path / "d", files)
    with pytest.raises(LtddError) as e:
        load_source("imagefolder", root, cache_dir=False)
    assert "009.png" in str(e.value) and "10x6" in str(e.value) and "image_size" in str(e.value)
    src = load_source("imagefolder", root, image_size=5, cache_dir=False)
    assert src.train.images.shape == (10, 5, 5, 3)


def test_imagefolder_corrupt_image_names_file(tmp_path):
    files = _tree_files()
    files["test/frog/001.png"] = b"\x89PNG\r\n\x1a\n truncated"
    with pytest.raises(LtddError) as e:
        load_source("imagefolder", _write_dir(tmp_path / "d", files), cache_dir=False)
    assert "test/frog/001.png" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LtddError, match="test/frog/001.png"):
        load_source("imagefolder", _write_tar(tmp_path / "a.tar.gz", files), cache_dir=False)


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(LtddError, match="does not exist"):
        load_source("imagefolder", tmp_path / "missing")
    flat = _write_dir(tmp_path / "flat", {"cat/0.png": _png_bytes(_img(0))})
    with pytest.raises(LtddError) as e:
        load_source("imagefolder", flat, cache_dir=False)
    assert str(flat) in str(e.value) and "train/" in str(e.value)
    no_test = _write_dir(tmp_path / "nt", {k: v for k, v in _tree_files().items() if k.startswith("train/")})
    with pytest.raises(LtddError, match="test/"):
        load_source("imagefolder", no_test, cache_dir=False)
    files = _tree_files()
    files["test/horse/0.png"] = _png_bytes(_img(0))
    with pytest.raises(LtddError, match="horse"):
        load_source("imagefolder", _write_dir(tmp_path / "mismatch", files), cache_dir=False)
    not_archive = tmp_path / "x.rar"
    not_archive.write_bytes(b"x")
    with pytest.raises(LtddError, match="x.rar"):
        load_source("imagefolder", not_archive, cache_dir=False)
    bad_tar = tmp_path / "bad.tar.gz"
    bad_tar.write_bytes(b"this is not gzip")
    with pytest.raises(LtddError, match="bad.tar.gz"):
        load_source("imagefolder", bad_tar, cache_dir=False)


# ----------------------------------------------------------------------------------------------------------------
# cache


def test_cache_hit_skips_decoding_and_invalidates_on_change(tmp_path, monkeypatch):
    arch = _write_tar(tmp_path / "data.tar.gz", _tree_files())
    cache = tmp_path / "cache"
    first = load_source("imagefolder", arch, cache_dir=cache)
    written = list(cache.glob("*.npz"))
    assert len(written) == 1 and not list(cache.glob("*.tmp"))
    with np.load(written[0], allow_pickle=False) as z:  # plain arrays, no pickled objects
        assert z["train_images"].dtype == np.uint8

    calls = []
    real = sources.images._decode_image  # called by images._decode_splits, so patched where it lives
    monkeypatch.setattr(sources.images, "_decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = load_source("imagefolder", arch, cache_dir=cache)
    assert calls == []
    np.testing.assert_array_equal(first.train.images, second.train.images)
    assert second.class_names == CLASSES and second.train.labels.dtype == np.int64

    # other options -> other entry
    load_source("imagefolder", arch, image_size=4, cache_dir=cache)
    assert len(calls) == 15 and len(list(cache.glob("*.npz"))) == 2

    # a changed archive (new mtime/size) is decoded again
    files = _tree_files(n_train=(1, 1, 1))
    _write_tar(arch, files)
    os.utime(arch, ns=(1, 1))
    third = load_source("imagefolder", arch, cache_dir=cache)
    assert third.train.counts() == [1, 1, 1]


def test_cache_dir_tree_fingerprint(tmp_path):
    root = _write_dir(tmp_path / "d", _tree_files())
    cache = tmp_path / "cache"
    assert load_source("imagefolder", root, cache_dir=cache).train.counts() == [3, 2, 4]
    (root / "train" / "dog" / "100.png").write_bytes(_png_bytes(_img((1, 1, 1))))
    assert load_source("imagefolder", root, cache_dir=cache).train.counts() == [3, 3, 4]


def test_cache_env_var_and_corrupt_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LTDD_CACHE_DIR", str(tmp_path / "envcache"))
    root = _write_dir(tmp_path / "d", _tree_files())
    load_source("imagefolder", root)
    files = list((tmp_path / "envcache").glob("*.npz"))
    assert len(files) == 1
    files[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable data cache"):
        src = load_source("imagefolder", root)
    assert src.train.counts() == [3, 2, 4]


# ----------------------------------------------------------------------------------------------------------------
# digits


def test_digits_split():
    src = load_source("digits", test_per_class=20, seed=3)
    assert src.class_names == [str(i) for i in range(10)]
    assert src.train.images.shape[1:] == (16, 16, 1) and src.train.images.dtype == np.uint8
    assert src.test.counts() == [20] * 10
    assert len(src.train) + len(src.test) == 1797
    assert src.train.images.max() == 255
    again = load_source("digits", test_per_class=20, seed=3)
    np.testing.assert_array_equal(src.test.images, again.test.images)
    other = load_source("digits", test_per_class=20, seed=4)
    assert not np.array_equal(src.test.images, other.test.images)
    assert load_source("digits", image_size=8).train.images.shape[1:] == (8, 8, 1)
    with pytest.raises(LtddError, match="test_per_class"):
        load_source("digits", test_per_class=1000)
