"""The tiny_imagenet source reads Tiny-ImageNet-200 in its official layout (folder or zip) - built here in miniature:
train/<wnid>/images/*.JPEG (with the <wnid>_boxes.txt files that sit beside them), val/images/*.JPEG labelled by
val/val_annotations.txt, an unlabelled test/images/, wnids.txt and words.txt."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltdd.data.sources import load_source
from ltdd.errors import LtddError

WNIDS = ["n02", "n01", "n03"]  # wnids.txt order differs from the sorted order on purpose
WORDS = {"n01": "goldfish, Carassius auratus", "n02": "tabby, tabby cat", "n03": "goldfish, another synset"}


def _jpeg(value: int, grey: bool = False) -> bytes:
    arr = np.full((16, 16, 3), value, dtype=np.uint8)
    im = Image.fromarray(arr).convert("L") if grey else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _files(prefix="tiny-imagenet-200/", n_train=(3, 2, 4), n_val=2, val_folders=False) -> dict[str, bytes]:
    """Class k of the sorted wnids has pixels ~ 60 k + 5 i in train and ~ 60 k + 30 in val."""
    f = {prefix + "wnids.txt": "\n".join(WNIDS).encode(),
         prefix + "words.txt": "\n".join(f"{k}\t{v}" for k, v in WORDS.items()).encode()}
    ann = []
    for k, wnid in enumerate(sorted(WNIDS)):
        f[f"{prefix}train/{wnid}/{wnid}_boxes.txt"] = b"bounding boxes, not an image"
        for i in range(n_train[k]):
            f[f"{prefix}train/{wnid}/images/{wnid}_{i}.JPEG"] = _jpeg(60 * k + 5 * i, grey=(k == 1 and i == 0))
        for i in range(n_val):
            name = f"val_{k}_{i}.JPEG"
            if val_folders:
                f[f"{prefix}val/{wnid}/images/{name}"] = _jpeg(60 * k + 30)
            else:
                f[f"{prefix}val/images/{name}"] = _jpeg(60 * k + 30)
                ann.append(f"{name}\t{wnid}\t0\t0\t15\t15")
    if not val_folders:
        f[prefix + "val/val_annotations.txt"] = "\n".join(reversed(ann)).encode()
    f[prefix + "test/images/test_0.JPEG"] = _jpeg(255)  # unlabelled: ignored
    return f


def _write(root: Path, files: dict[str, bytes], as_zip: bool) -> Path:
    if as_zip:
        path = root / "tiny-imagenet-200.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for rel, data in files.items():
                zf.writestr(rel, data)
        return path
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root / "tiny-imagenet-200"


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_official_layout_loads_with_labels_from_annotations(tmp_path, as_zip):
    root = _write(tmp_path, _files(), as_zip)
    d = load_source("tiny_imagenet", root, cache_dir=False)
    assert d.train.counts() == [3, 2, 4] and d.test.counts() == [2, 2, 2]
    assert d.train.images.shape[1:] == (16, 16, 3)  # the grey JPEG is broadcast to RGB
    # labels follow the sorted wnids; names come from words.txt, duplicates kept apart by their wnid
    assert d.class_names == ["goldfish (n01)", "tabby", "goldfish (n03)"]
    for split, base in ((d.train, None), (d.test, 30)):
        for k in range(3):
            px = split.images[split.labels == k].reshape(-1, 16 * 16 * 3).mean(1)
            expect = 60 * k + (base if base is not None else 5 * np.arange(len(px)))
            np.testing.assert_allclose(px, expect, atol=3)


def test_val_reorganised_into_class_folders_loads_too(tmp_path):
    d = load_source("tiny_imagenet", _write(tmp_path, _files(prefix="", val_folders=True), False).parent,
                    cache_dir=False)
    assert d.test.counts() == [2, 2, 2]
    assert np.allclose(d.test.images[d.test.labels == 2].mean(), 150, atol=3)


def test_cached_second_load_is_identical(tmp_path):
    root = _write(tmp_path, _files(), True)
    a = load_source("tiny_imagenet", root, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").rglob("*.npz"))
    b = load_source("tiny_imagenet", root, cache_dir=tmp_path / "cache")
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    assert a.class_names == b.class_names


@pytest.mark.parametrize("breakage,message", [
    ("unlabelled_val", "has no line in"),
    ("unknown_wnid", "which has no train/n09/ folder"),
    ("missing_val_file", "missing from val/images/"),
    ("wnids_disagree", "disagree"),
    ("no_train", "no train/<wnid>/images/"),
    ("bad_annotation_line", "expected '<file>"),
])
def test_broken_trees_give_one_clear_line(tmp_path, breakage, message):
    f = _files()
    p = "tiny-imagenet-200/"
    ann = p + "val/val_annotations.txt"
    if breakage == "unlabelled_val":
        f[p + "val/images/extra.JPEG"] = _jpeg(1)
    elif breakage == "unknown_wnid":
        f[ann] += b"\nval_0_0.JPEG\tn09\t0\t0\t1\t1"
    elif breakage == "missing_val_file":
        del f[p + "val/images/val_2_1.JPEG"]
    elif breakage == "wnids_disagree":
        f[p + "wnids.txt"] += b"\nn04"
    elif breakage == "no_train":
        f = {k: v for k, v in f.items() if "/train/" not in k}
    elif breakage == "bad_annotation_line":
        f[ann] += b"\njust-one-field"
    with pytest.raises(LtddError) as e:
        load_source("tiny_imagenet", _write(tmp_path, f, True), cache_dir=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_long_tailed_tiny_split_through_the_pipeline(tmp_path):
    from ltdd.config import DataConfig
    from ltdd.data import prepare_data

    root = _write(tmp_path, _files(n_train=(4, 4, 4)), True)
    data = prepare_data(DataConfig(dataset="tiny_imagenet", root=str(root), imbalance_factor=4.0, zca=False),
                        cache_dir=False)
    assert data.train_counts == [4, 2, 1]  # n_c = 4 * (1/4)^(c/2)
    assert data.num_classes == 3 and data.im_size == (16, 16)
