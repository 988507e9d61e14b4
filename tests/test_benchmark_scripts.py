"""Benchmark scripts that time training: a tiny run writes its results section (the command that wrote it, the
table), and the multiply-accumulate count of width_cost.py against a hand count."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _width_cost():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling common.py, as when run from benchmarks/
    try:
        spec = importlib.util.spec_from_file_location("width_cost_under_test", BENCH / "width_cost.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_forward_macs_counts_convolutions_and_linear_layers_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    # conv: 4x4 outputs x 2 channels x (3x3 x 1 input channel) = 288; linear: 32 x 3 = 96
    assert _width_cost().forward_macs(model, (1, 4, 4)) == 288 + 96
    grouped = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2))  # each output reads 2 of the 4 input channels
    assert _width_cost().forward_macs(grouped, (4, 2, 2)) == 2 * 2 * 4 * 2
    assert model.training  # the count runs in eval mode and restores training mode


def test_width_cost_tiny_run_writes_its_section(tmp_path):
    out = tmp_path / "width_cost.md"
    args = ["--widths", "8,16", "--images", "64", "--rounds", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(BENCH / "width_cost.py"), *args], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    assert text.startswith("# Expert width: cost per training image on CPU\n")
    assert f"`python benchmarks/width_cost.py {' '.join(args)}`" in text and "malloc tuning on" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| 8 |") or ln.startswith("| 16 |")]
    assert len(rows) == 2 and rows[0].endswith("| 1.00x | 1.0x |")


def test_mtt_step_size_without_a_store_is_one_clear_line_and_writes_nothing(tmp_path):
    out = tmp_path / "mtt_step_size.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra, word in (([], "no MTT expert store"), (["--lrs", "0.1,x"], "comma-separated numbers")):
        res = subprocess.run([sys.executable, str(BENCH / "mtt_step_size.py"), "--work", str(tmp_path / "w"),
                              "--out", str(out), *extra], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 2 and word in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert not out.exists()
