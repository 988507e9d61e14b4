"""The ``ltdd`` command: JSON output, user errors (one stderr line, exit code 2, no traceback, no partial output),
full-data training and the preset list. Digits or tiny ImageFolder trees built here; the whole module is fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from ltdd import config as C
from ltdd.cli import cli
from ltdd.data import load_source, make_longtail
from ltdd.synset import SyntheticSet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny; one thread avoids OpenMP spin-waits, which on a busy 2-core machine made this module
    3x slower with two threads (62 s vs 22 s wall)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own data cache folder (nothing written to ~/.cache)."""
    monkeypatch.setenv("LTDD_CACHE_DIR", str(tmp_path / "cache"))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(res, *fragments):
    """Exit code 2, exactly one stderr line starting 'ltdd: error:', nothing on stdout, no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ltdd: error: "), res.stderr
    assert "Traceback" not in res.output and res.stdout == ""
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _png(path, value, size=8, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size, 3) if mode == "RGB" else (size, size), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)


def make_imagefolder(root, classes=("a", "b", "c"), train=(6, 4, 2), test=2):
    for k, (name, n) in enumerate(zip(classes, train)):
        for i in range(n):
            _png(root / "train" / name / f"{i}.png", 40 * k + 3 * i)
        for i in range(test):
            _png(root / "test" / name / f"{i}.png", 40 * k + 5 + i)
    return root


def _cache_files(tmp_path):
    folder = tmp_path / "cache"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------------------------------------------
# ltdd data


def test_data_json_counts_match_the_split():
    res = invoke("data", "--dataset", "digits", "--imbalance-factor", 10, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["class_names"] == [str(c) for c in range(10)]
    expected = make_longtail(load_source("digits").train.labels, 10, 10.0)
    assert info["train_counts"] == expected.counts
    assert info["train_counts"][0] / info["train_counts"][-1] == pytest.approx(10, rel=0.1)
    assert info["test_counts"] == [50] * 10
    assert info["num_train"] == sum(info["train_counts"]) and info["num_test"] == 500
    assert info["imbalance_factor"] == 10.0


def test_data_table_on_an_imagefolder(tmp_path):
    root = make_imagefolder(tmp_path / "ifo")
    res = invoke("data", "--dataset", "imagefolder", "--root", root, "--imbalance-factor", 3, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["class_names"] == ["a", "b", "c"] and info["train_counts"] == [6, 3, 2]
    assert info["test_counts"] == [2, 2, 2]
    text = invoke("data", "--dataset", "imagefolder", "--root", root, "--imbalance-factor", 3)
    assert text.exit_code == 0 and "11 train images" in text.stdout


@pytest.mark.parametrize("args,fragments", [
    (["--dataset", "nosuchset"], ["unknown dataset 'nosuchset'", "digits"]),
    (["--imbalance-factor", "0.5"], ["imbalance_factor must be >= 1", "0.5"]),
    (["--imbalance-ratio", "2"], ["imbalance_ratio must be in (0, 1]"]),
    (["--dataset", "cifar10"], ["--root is required for dataset 'cifar10'"]),
    (["--dataset", "cifar10", "--root", "/no/such/folder"], ["/no/such/folder", "does not exist"]),
    (["--dataset", "imagefolder", "--root", "/no/such/folder"], ["/no/such/folder", "does not exist"]),
    (["--max-per-class", "2", "--imbalance-factor", "1000"], ["would have no training images"]),
    (["--profile", "zigzag"], ["unknown long-tail profile 'zigzag'"]),
])
def test_data_user_errors(tmp_path, args, fragments):
    assert_user_error(invoke("data", *args), *fragments)
    assert _cache_files(tmp_path) == []


def test_corrupt_image_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "ifo")
    bad = root / "train" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    line = assert_user_error(invoke("data", "--dataset", "imagefolder", "--root", root), "cannot read image")
    assert str(bad) in line
    assert _cache_files(tmp_path) == []  # nothing cached from a failed load


def test_empty_class_folder(tmp_path):
    root = make_imagefolder(tmp_path / "ifo")
    (root / "train" / "d").mkdir()
    _png(root / "test" / "d" / "0.png", 7)
    line = assert_user_error(invoke("data", "--dataset", "imagefolder", "--root", root), "has no images")
    assert str(root / "train" / "d") in line
    assert _cache_files(tmp_path) == []


def test_class_without_images_after_the_split(tmp_path):
    root = make_imagefolder(tmp_path / "ifo", train=(6, 4, 1))
    # IF 10 with n_max 6: the tail class gets floor(6 / 10) = 0 images
    assert_user_error(invoke("data", "--dataset", "imagefolder", "--root", root, "--imbalance-factor", 10),
                      "class 'c' would have no training images")


def test_main_entry_point_exit_code_and_stderr(tmp_path):
    """The installed entry point (ltdd.cli:main), in a fresh interpreter: code 2, one line, no traceback."""
    env = {**os.environ, "LTDD_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", "from ltdd.cli import main; main()", "data", "--dataset", "nosuch"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("ltdd: error: unknown dataset")


# ----------------------------------------------------------------------------------------------------------------
# ltdd eval


def _digits_meta():
    return {"data": C.to_dict(C.DataConfig(dataset="digits", imbalance_factor=10)), "method": "test"}


def test_eval_wrong_channel_count(tmp_path):
    path = SyntheticSet(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), meta=_digits_meta()).save(
        tmp_path / "set" / "distilled.safetensors")
    assert_user_error(invoke("eval", path, "--protocol", "dc", "--runs", 1), "images have shape (4, 3, 16, 16)",
                      "expected (N, 1, 16, 16)")
    assert sorted(p.name for p in path.parent.iterdir()) == ["distilled.safetensors"]  # no eval.json


def test_eval_labels_beyond_the_classes(tmp_path):
    path = SyntheticSet(torch.randn(2, 1, 16, 16), torch.tensor([0, 12]), meta=_digits_meta()).save(tmp_path / "s")
    assert_user_error(invoke("eval", path), "labels go up to 12", "10 classes")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_eval_not_safetensors(tmp_path, content):
    path = tmp_path / "distilled.safetensors"
    path.write_bytes(content)
    assert_user_error(invoke("eval", path), "not a valid safetensors file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distilled.safetensors"]


def test_eval_missing_file(tmp_path):
    assert_user_error(invoke("eval", tmp_path / "nothing.safetensors"), "distilled set not found")


def test_eval_writes_eval_json(tmp_path):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(20, 1, 16, 16, generator=g), torch.arange(10).repeat(2)
    path = SyntheticSet(images, labels, lr=0.01, meta=_digits_meta()).save(tmp_path / "set")
    res = invoke("eval", path, "--protocol", "dc", "--runs", 1, "--set", "train.epochs=2", "--set",
                 "model.args={width: 8}", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["protocol_name"] == "dc" and out["summary"]["runs"] == 1
    assert json.loads((path.parent / "eval.json").read_text())["summary"] == out["summary"]


# ----------------------------------------------------------------------------------------------------------------
# ltdd train


def test_train_erm_on_digits(tmp_path):
    out = tmp_path / "run"
    res = invoke("train", "--dataset", "digits", "--method", "erm", "--epochs", 3, "--json", "--out", out,
                 "--width", 32, "--batch-size", 32, "--lr", 0.05, "--no-dsa", "--device", "cpu")
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["summary"] == printed["summary"] and saved["method"] == "erm"
    assert printed["summary"]["accuracy"]["mean"] > 0.5  # chance is 0.1
    assert len(printed["summary"]["per_class"]) == 10
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "erm" and cfg["train"]["epochs"] == 3 and cfg["data"]["dataset"] == "digits"
    assert cfg["model"]["args"] == {"width": 32}


@pytest.mark.parametrize("args,fragment", [
    (["--method", "focal"], "unknown long-tail method 'focal'"),
    (["--imbalance-factor", "0.5"], "imbalance_factor must be >= 1"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_train_user_errors_write_nothing(tmp_path, args, fragment):
    out = tmp_path / "run"
    assert_user_error(invoke("train", "--dataset", "digits", "--epochs", 1, "--out", out, *args), fragment)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# ltdd presets / models


def test_presets_lists_the_main_methods():
    res = invoke("presets")
    assert res.exit_code == 0, res.output
    names = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert {"lad", "datm", "mtt"} <= names


def test_unknown_preset_is_a_user_error(tmp_path):
    assert_user_error(invoke("distill", "--preset", "no-such-preset", "--out", tmp_path / "d"), "unknown preset")
    assert not (tmp_path / "d").exists()


def test_models_lists_convnet():
    res = invoke("models")
    assert res.exit_code == 0 and "convnet" in res.stdout.split()


# ----------------------------------------------------------------------------------------------------------------
# ltdd export



def _digits_set(tmp_path, split_sha=None, soft=False):
    from ltdd.data import prepare_data

    cfg = C.DataConfig(dataset="digits", imbalance_factor=10)
    data = prepare_data(cfg)
    idx = torch.cat([data.class_indices(c)[:2] for c in range(10)])
    sha = split_sha or __import__("hashlib").sha256(data.split.indices.tobytes()).hexdigest()[:16]
    soft_labels = torch.randn(len(idx), 10) if soft else None
    syn = SyntheticSet(data.train_x[idx], data.train_y[idx], soft_labels, 0.02,
                       meta={"data": C.to_dict(cfg), "split_sha": sha})
    return syn.save(tmp_path / "set"), data, idx


def test_export_imagefolder_un_whitens(tmp_path):
    path, data, idx = _digits_set(tmp_path)
    out = tmp_path / "png"
    res = invoke("export", path, "--format", "imagefolder", "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [str(c) for c in range(10)]  # + manifest files
    want = (data.preprocessor.to_pixels(data.train_x[idx[0:1]]) * 255).round().to(torch.uint8)[0, 0].numpy()
    got = np.asarray(Image.open(out / "0" / "0.png"))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_export_ddranking(tmp_path):
    path, _, _ = _digits_set(tmp_path, soft=True)
    res = invoke("export", path, "--format", "ddranking", "--out", tmp_path / "dd")
    assert res.exit_code == 0, res.output
    labels = torch.load(tmp_path / "dd" / "labels.pt", weights_only=True)
    assert labels.shape == (20, 10) and labels.dtype == torch.float32
    assert torch.load(tmp_path / "dd" / "lr.pt", weights_only=True).item() == pytest.approx(0.02)


def test_export_user_errors(tmp_path):
    path, _, _ = _digits_set(tmp_path, split_sha="0" * 16)
    assert_user_error(invoke("export", path, "--format", "imagefolder", "--out", tmp_path / "o"), "split")
    assert_user_error(invoke("export", path, "--format", "zip", "--out", tmp_path / "o"), "unknown export format")
    assert_user_error(invoke("export", tmp_path / "none.safetensors", "--out", tmp_path / "o"), "not found")
    assert not (tmp_path / "o").exists()


def test_run_can_skip_the_reference_rows(tmp_path):
    out = tmp_path / "r"
    res = invoke("run", "--out", out, "--device", "cpu", "--no-full-data", "--no-baselines",
                 "--set", "experts.num_experts=1", "--set", "experts.train.epochs=3",
                 "--set", "experts.classifier_train.epochs=2", "--set", "distill.iterations=2",
                 "--set", "distill.phases.0.max_start_epoch=1", "--set", "protocol_overrides.train.epochs=2",
                 "--set", "protocol_overrides.runs=1")
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "comparison.json").read_text())
    keys = [r["key"] for r in (rows["rows"] if isinstance(rows, dict) else rows)]
    assert "distilled" in keys and not {"full", "random", "initial"} & set(keys)
