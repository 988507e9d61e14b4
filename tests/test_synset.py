"""The distilled-set file: round trip, validation, refusal of bad files; the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ltdd.errors import LtddError
from ltdd.report import write_report
from ltdd.synset import SyntheticSet, image_grid


def test_round_trip_and_metadata(tmp_path):
    syn = SyntheticSet(torch.randn(6, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2]), torch.randn(6, 3), 0.0123,
                       {"method": "tm", "data": {"dataset": "digits"}})
    path = syn.save(tmp_path)
    assert path.name == "distilled.safetensors"
    back = SyntheticSet.load(tmp_path)
    assert torch.equal(back.images, syn.images) and torch.equal(back.labels, syn.labels)
    assert torch.equal(back.soft_labels, syn.soft_labels)
    assert back.lr == pytest.approx(0.0123) and back.meta["data"]["dataset"] == "digits"
    hard = SyntheticSet(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]))
    hard.save(tmp_path / "h.safetensors")
    b2 = SyntheticSet.load(tmp_path / "h.safetensors")
    assert b2.soft_labels is None and b2.lr is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(LtddError, match="not found"):
        SyntheticSet.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "distilled.safetensors"
    bad.write_bytes(b"\x80\x04definitely not safetensors")
    with pytest.raises(LtddError, match="not a valid safetensors"):
        SyntheticSet.load(bad)
    with pytest.raises(LtddError, match="labels"):
        SyntheticSet(torch.randn(3, 1, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(LtddError, match="images"):
        SyntheticSet(torch.randn(3, 4, 4), torch.tensor([0, 1, 2]))


def test_grid_has_one_row_per_class():
    # 7 images of 4x4 pixels, out of class order; image i has the pixel values 16 i + 4 y + x (out of 255)
    labels = torch.tensor([2, 0, 1, 0, 2, 0, 2])
    pixels = (16 * torch.arange(7)[:, None, None, None] + torch.arange(16).reshape(1, 1, 4, 4)).float() / 255
    im = image_grid(pixels, labels, 4)  # class 3 has no image
    # 4 rows (classes) x 3 columns (the most images of a class), 1-pixel white borders, enlarged 256 // 4 // 2 = 32x
    assert (im.width, im.height) == ((3 * 5 + 1) * 32, (4 * 5 + 1) * 32)
    arr = np.asarray(im)
    assert arr.shape == (im.height, im.width, 3)
    canvas = arr[::32, ::32]  # undo the nearest-neighbour enlargement
    assert np.array_equal(arr, canvas.repeat(32, 0).repeat(32, 1))
    rows = {0: [1, 3, 5], 1: [2], 2: [0, 4, 6], 3: []}  # each class's images, in the order they come
    for c in range(4):
        for j in range(3):
            cell = canvas[1 + 5 * c:5 + 5 * c, 1 + 5 * j:5 + 5 * j]
            if j < len(rows[c]):
                want = 16 * rows[c][j] + np.arange(16).reshape(4, 4)  # grey: the same in R, G and B
                assert np.array_equal(cell, np.repeat(want[:, :, None], 3, 2).astype(np.uint8)), (c, j)
            else:
                assert (cell == 255).all(), (c, j)  # an empty cell stays white
    in_cell_row = np.isin(np.arange(canvas.shape[0]), [1 + 5 * c + k for c in range(4) for k in range(4)])
    in_cell_col = np.isin(np.arange(canvas.shape[1]), [1 + 5 * j + k for j in range(3) for k in range(4)])
    border = ~(in_cell_row[:, None] & in_cell_col[None, :])
    assert border.sum() == 21 * 16 - 12 * 16 and (canvas[border] == 255).all()  # the lines between cells
    # max_per_class caps the columns (the first images of each class are kept)
    capped = np.asarray(image_grid(pixels, labels, 4, max_per_class=2))[::32, ::32]
    assert capped.shape[:2] == (21, 11)
    assert np.array_equal(capped[1:5, 6:10, 0], 16 * 3 + np.arange(16).reshape(4, 4))  # class 0, 2nd image (#3)


def test_report_from_eval_files(tmp_path):
    summ = {"runs": 2, "accuracy": {"mean": 0.5, "std": 0.01}, "class_std": {"mean": 0.1, "std": 0.0},
            "worst_accuracy": {"mean": 0.2, "std": 0.0}, "per_class": [0.6, 0.4],
            "groups": {"head": {"mean": 0.6, "std": 0}, "medium": {"mean": None, "std": None},
                       "tail": {"mean": 0.4, "std": 0}}}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "eval.json").write_text(json.dumps({"summary": summ, "seconds": 3}))
    (tmp_path / "full_data.json").write_text(json.dumps({"summary": summ, "method": "erm"}))
    path = write_report(tmp_path)
    md = path.read_text()
    assert "| a | 50.0 ± 1.0 |" in md and "full data (erm)" in md
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    with pytest.raises(LtddError):
        write_report(tmp_path / "nothing")
