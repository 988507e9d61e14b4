"""ADSA soft-label calibration: a known log-prior shift is recovered, the confidences get flatter, the command
writes a new set and leaves the original alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ltdd.calibration import calibrate_set, class_confidences, find_tau, log_priors
from ltdd.cli import cli
from ltdd.errors import LtddError
from ltdd.synset import SyntheticSet

COUNTS = [500, 300, 180, 110, 65, 40, 24, 14, 8, 5]  # long-tailed, IF 100


def clean_logits(ipc=6, num_classes=10, seed=0):
    """Per-class symmetric logits: the logits of an image of class c are a fixed random vector (largest entry first)
    rolled by c, so every class has exactly the same mean own-class confidence (their std is 0)."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for k in range(ipc):
        base = torch.randn(num_classes, generator=g)
        base[0] = base.max() + 1.0 + k * 0.3
        for c in range(num_classes):
            rows.append(torch.roll(base, c))
            labels.append(c)
    return torch.stack(rows), torch.tensor(labels)


@pytest.mark.parametrize("tau0", [1.0, 0.55, -0.4, 2.3])
def test_a_known_log_prior_shift_is_recovered(tau0):
    clean, labels = clean_logits()
    lp = log_priors(COUNTS).float()
    assert np.std(class_confidences(clean, labels, lp, 0.0)) < 1e-6  # the construction: flat at tau = 0
    shifted = clean + tau0 * lp  # soft labels leaning toward the head (for tau0 > 0)
    before = class_confidences(shifted, labels, lp, 0.0)
    if tau0 > 0:
        assert before[0] > before[-1]  # head more confident than tail
    tau, info = find_tau(shifted, labels, COUNTS)
    assert tau == pytest.approx(tau0, abs=1e-3)  # within the search tolerance (float32 logits)
    after = class_confidences(shifted, labels, lp, tau)
    assert np.std(after) < 0.05 * np.std(before)
    assert info["range"] == [-2.0, 4.0] and not info["at_boundary"]


def test_calibrate_set_stores_shifted_logits_and_keeps_the_input():
    clean, labels = clean_logits()
    lp = log_priors(COUNTS).float()
    soft = clean + 1.2 * lp
    syn = SyntheticSet(torch.randn(len(labels), 1, 4, 4), labels, soft.clone(), 0.01, {"train_counts": COUNTS})
    new, info = calibrate_set(syn)
    assert torch.equal(syn.soft_labels, soft) and "calibration" not in syn.meta  # original untouched
    assert info["tau"] == pytest.approx(1.2, abs=2e-3)
    assert torch.allclose(new.soft_labels, soft - info["tau"] * lp, atol=1e-5)
    assert torch.allclose(new.soft_labels, clean, atol=1e-2)
    cal = new.meta["calibration"]
    assert cal["std_after"] < cal["std_before"] and len(cal["confidence_before"]) == 10
    assert torch.equal(new.images, syn.images) and new.lr == syn.lr


def test_errors():
    syn = SyntheticSet(torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 3]), meta={"train_counts": [4, 3, 2, 1]})
    with pytest.raises(LtddError, match="no soft labels"):
        calibrate_set(syn)
    with pytest.raises(LtddError, match="no training images"):
        log_priors([3, 0, 1])
    soft = torch.randn(4, 4)
    with pytest.raises(LtddError, match="train_counts"):
        calibrate_set(SyntheticSet(torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 3]), soft))
    with pytest.raises(LtddError, match="lo < hi"):
        find_tau(soft, torch.tensor([0, 1, 2, 3]), [4, 3, 2, 1], lo=1.0, hi=0.0)


# ----------------------------------------------------------------------------------------------------------------
# ltdd calibrate


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(res, fragment):
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ltdd: error:") and fragment in lines[0], res.stderr


def test_calibrate_command(tmp_path):
    clean, labels = clean_logits()
    soft = clean + 0.8 * log_priors(COUNTS).float()
    src = SyntheticSet(torch.randn(len(labels), 1, 4, 4), labels, soft, 0.02, {"train_counts": COUNTS,
                                                                              "method": "tm"}).save(tmp_path / "a")
    original = src.read_bytes()
    res = invoke("calibrate", src, "--out", tmp_path / "b", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["tau"] == pytest.approx(0.8, abs=2e-3)
    assert src.read_bytes() == original
    new = SyntheticSet.load(tmp_path / "b")
    assert new.meta["calibration"]["tau"] == pytest.approx(out["tau"])
    assert new.meta["calibration"]["source"]["path"] == str(src)
    assert new.meta["method"] == "tm"
    # refuses to overwrite the original, or anything else
    _one_line_error(invoke("calibrate", src, "--out", src), "never overwrites the original")
    _one_line_error(invoke("calibrate", src, "--out", tmp_path / "a"), "never overwrites the original")
    _one_line_error(invoke("calibrate", src, "--out", tmp_path / "b"), "already exists")
    assert src.read_bytes() == original
    hard = SyntheticSet(torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 3]), meta={"train_counts": COUNTS[:4]}).save(
        tmp_path / "h")
    _one_line_error(invoke("calibrate", hard, "--out", tmp_path / "h2"), "no soft labels")
    assert not (tmp_path / "h2").exists()
    # human-readable output
    res = invoke("calibrate", src, "--out", tmp_path / "c.safetensors")
    assert res.exit_code == 0 and "tau* = 0.8" in res.output and (tmp_path / "c.safetensors").is_file()
