"""benchmarks/reproduce.py: the cell plan (which presets a profile runs, cell names, resumable state) and the report
written from finished cells. Nothing is trained here: cells are small result dicts built in the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reproduce.py"


def _run(*args: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _cell(acc: float, per_class: list[float]) -> dict:
    ms = lambda v: {"mean": v, "std": 0.01}  # noqa: E731
    groups = {g: ms(acc) for g in ("head", "medium", "tail", "many", "medium_shot", "few")}
    return {"summary": {"accuracy": ms(acc), "class_std": ms(0.1), "worst_accuracy": ms(min(per_class)),
                        "groups": groups, "per_class": per_class, "runs": 3},
            "seconds": 12.0, "peak_memory_mb": 100.0}


def test_gpu_plan_uses_released_lad_configs_and_ipc_50(tmp_path):
    out = _run("--profile", "gpu", "--ifs", "100", "--plan", "--work", str(tmp_path / "w"), cwd=ROOT)
    lines = [ln for ln in out.splitlines() if ln.startswith("if")]
    cells = {ln.split()[0]: ln for ln in lines}
    # 6 distillation methods x 2 IPCs + erm + crt (shared by both IPCs)
    assert len(cells) == 14, out
    assert "lad-cifar10-if100-ipc10" in cells["if100-lad"]
    assert "lad-cifar10-if100-ipc50" in cells["if100-ipc50-lad"]
    assert "ipc 50" in cells["if100-ipc50-datm"] and "experts 100 x 100 epochs" in cells["if100-ipc50-datm"]
    assert "200 epochs" in cells["if100-erm"]
    assert out.strip().endswith("14 cells: 0 done, 0 running, 0 partial, 14 to do")


def test_cpu_plan_marks_done_and_partial_cells(tmp_path):
    work = tmp_path / "w"
    (work / "cells").mkdir(parents=True)
    (work / "cells" / "if100-dm.json").write_text(json.dumps(_cell(0.4, [0.4] * 10)))
    (work / "if100-lad").mkdir()
    (work / "if100-lad" / "checkpoint.safetensors").write_bytes(b"x")
    out = _run("--ifs", "100", "--methods", "lad,dm,erm", "--plan", "--work", str(work), cwd=ROOT)
    states = {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.startswith("if")}
    assert states == {"if100-lad": "partial", "if100-dm": "done", "if100-erm": "to"}  # "to do"
    assert "4 x 12 epochs" in out  # the cpu profile's experts


def test_report_only_writes_columns_paper_numbers_and_reading(tmp_path):
    work, res = tmp_path / "w", tmp_path / "res"
    (work / "cells").mkdir(parents=True)
    per = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    cells = {"if100-lad": _cell(0.45, per), "if100-datm": _cell(0.30, per), "if100-mtt": _cell(0.35, per),
             "if100-dm": _cell(0.50, per), "if100-erm": _cell(0.55, per), "if100-ipc50-lad": _cell(0.60, per),
             "if100-lad-init": _cell(0.40, per), "if100-lad-no-dam": _cell(0.41, per), "if100-lad-no-ed": _cell(0.47, per)}
    for k, v in cells.items():
        (work / "cells" / f"{k}.json").write_text(json.dumps(v))
    (work / "cells" / "experts-if100.json").write_text(json.dumps({"seconds": 3600.0}))
    _run("--ifs", "100", "--ipcs", "10,50", "--methods", "lad,datm,mtt,dm,erm,lad-init,lad-no-dam,lad-no-ed", "--report-only", "--work", str(work),
         "--results", str(res), cwd=ROOT)
    md = (res / "lad-cifar10lt-cpu.md").read_text()
    assert "--ifs 100 --ipcs 10,50 --methods lad,datm,mtt,dm,erm,lad-init,lad-no-dam,lad-no-ed" in md
    assert "the distillation iterations add +5.0 points" in md  # lad 45 vs lad-init 40
    assert "+ DAM only (lad-no-ed) 47.0, + ED only (lad-no-dam) 41.0, both (lad) 45.0" in md
    assert "'both components are needed' does NOT hold here" in md
    assert "| lad | 45.0±1.0 | 53.4±0.1 | 60.0±1.0 | 64.0±0.9 |" in md  # ours | paper for IPC 10 and 50
    assert "| erm | 55.0±1.0 | 66.2±0.4 | 55.0±1.0 | 66.2±0.4 |" in md  # one full-data cell under both IPCs
    assert "(LAD above DATM and MTT) holds here" in md
    # cost: 9 cells of 12 s; the 5 default-method cells at IPC 10 (60 s) + the store (3600 s) = 1.02 h
    assert "- IF 100: 9 cells 2 min (default methods at the profile's default IPC: 1 min); expert store 60 min." in md
    assert "Total compute (sum over processes, 1 thread each unless stated): 1.03 h" in md
    assert "at IPC 10 with the expert stores: 1.02 h." in md
    assert "above LAD here: dm 50.0" in md
    for png in ("perclass-if100-ipc10", "perclass-if100-ipc50", "vs-if"):
        assert (res / f"lad-cifar10lt-cpu-{png}.png").stat().st_size > 1000
    payload = json.loads((res / "lad-cifar10lt-cpu.json").read_text())
    assert set(payload["results"]) == {"if100-ipc10", "if100-ipc50"}
    assert payload["paper"]["100"]["50"]["datm"] == "44.3±0.1"


@pytest.mark.parametrize("ipc,key", [(10, "if10-lad"), (50, "if10-ipc50-lad")])
def test_cell_names_stay_compatible(ipc, key, tmp_path):
    work = tmp_path / "w"
    (work / "cells").mkdir(parents=True)
    (work / "cells" / f"{key}.json").write_text(json.dumps(_cell(0.5, [0.5] * 10)))
    out = _run("--ifs", "10", "--ipcs", str(ipc), "--methods", "lad", "--plan", "--work", str(work), cwd=ROOT)
    assert f"{key} " in out and "1 done" in out


def test_variants_apply_their_overrides_and_take_suffixes(tmp_path):
    out = _run("--ifs", "100", "--methods", "lad,lad-all,lad-all@7", "--variant",
               "lad-all=lad:distill.phases.0.match=all,distill.lr_lr=1e-4", "--plan", "--work", str(tmp_path / "w"),
               cwd=ROOT)
    cells = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("if")}
    assert "representation(N=10, M=2, start<10, backbone)" in cells["if100-lad"]
    assert "representation(N=10, M=2, start<10, all)" in cells["if100-lad-all"]
    assert "7 iterations" in cells["if100-lad-all@7"] and "start<10, all)" in cells["if100-lad-all@7"]
    # a variant of LAD starts from LAD's released configuration of the cell (its own lambdas and windows)
    assert "preset lad-cifar10-if100-ipc10 " in cells["if100-lad-all"]


@pytest.mark.parametrize("bad", ["lad-x", "lad-x=lad", "lad-x=lad:novalue", "x@1=lad:a=b"])
def test_malformed_variant_is_one_clear_line(bad, tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--plan", "--variant", bad, "--work", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "--variant" in out.stderr


def test_report_leaves_out_columns_without_any_cell(tmp_path):
    work, res = tmp_path / "w", tmp_path / "res"
    (work / "cells").mkdir(parents=True)
    (work / "cells" / "if100-lad.json").write_text(json.dumps(_cell(0.45, [0.5] * 10)))
    _run("--ifs", "10,100", "--ipcs", "10,50", "--methods", "lad", "--report-only", "--work", str(work),
         "--results", str(res), cwd=ROOT)
    md = (res / "lad-cifar10lt-cpu.md").read_text()
    assert "| method | IF 100 IPC 10 ours | paper |" in md
    assert "IF 10 IPC" not in md and "IPC 50" not in md
