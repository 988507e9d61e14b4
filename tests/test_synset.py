"""The distilled-set file: round trip, validation, refusal of bad files; the report."""

from __future__ import annotations

import json

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
    im = image_grid(torch.rand(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    assert im.height > 0 and im.width > 0


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
