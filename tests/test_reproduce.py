"""ltdd.experiments and its ``reproduce`` command: the cell plan (which presets a profile runs, cell names, keys,
resumable and stale state), adoption of legacy cells, and the report written from finished cells. Nothing heavy is
trained: LAD cells are small result dicts built in the test; the two-stage grid runs once at a tiny scale on digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ltdd.config import DataConfig
from ltdd.errors import LtddError
from ltdd.experiments.cells import Cell, CellTable, data_key
from ltdd.experiments.command import main, reproduce_cmd
from ltdd.experiments.lad_table import LadGrid, LadOptions
from ltdd.experiments.two_stage_table import ROWS, TwoStageGrid, TwoStageOptions

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    res = CliRunner().invoke(reproduce_cmd, [str(a) for a in args])
    assert res.exit_code == 0 and res.exception is None, (res.output, res.exception)
    return res.output


def _dirs(tmp_path) -> tuple[str, str]:
    return str(tmp_path / "w"), str(tmp_path / "res")


def _cell(acc: float, per_class: list[float]) -> dict:
    ms = lambda v: {"mean": v, "std": 0.01}  # noqa: E731
    groups = {g: ms(acc) for g in ("head", "medium", "tail", "many", "medium_shot", "few")}
    return {"summary": {"accuracy": ms(acc), "class_std": ms(0.1), "worst_accuracy": ms(min(per_class)),
                        "groups": groups, "per_class": per_class, "runs": 3},
            "seconds": 12.0, "peak_memory_mb": 100.0}


def _record(grid: LadGrid, cells: dict) -> None:
    """Record finished cells by name under the grid's current keys."""
    by_name = {grid.experts_cell(IF).name: grid.experts_cell(IF) for IF in grid.opts.ifs}
    by_name.update({c.name: c for c in (grid.cell(IF, ipc, m)[0] for IF, ipc, m in grid.positions())})
    for name, res in cells.items():
        grid.table.save(by_name[name], res)


def _states(out: str) -> dict:
    return {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.startswith("if")}


def test_gpu_plan_uses_released_lad_configs_and_ipc_50(tmp_path):
    work, res = _dirs(tmp_path)
    out = _run("lad-cifar10lt", "--profile", "gpu", "--ifs", "100", "--plan", "--work", work, "--results", res)
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
    work, res = _dirs(tmp_path)
    grid = LadGrid(LadOptions(ifs="100", methods="lad,dm,erm", work=work, results=res))
    _record(grid, {"if100-dm": _cell(0.4, [0.4] * 10)})
    lad = grid.cell(100, 10, "lad")[0]
    grid.table.artifact(lad).mkdir(parents=True)
    (grid.table.artifact(lad) / "checkpoint.safetensors").write_bytes(b"x")  # an interrupted distillation
    out = _run("lad-cifar10lt", "--ifs", "100", "--methods", "lad,dm,erm", "--plan", "--work", work, "--results", res)
    assert _states(out) == {"if100-lad": "partial", "if100-dm": "done", "if100-erm": "to"}  # "to do"
    assert "4 x 12 epochs" in out  # the cpu profile's experts


def test_report_only_writes_columns_paper_numbers_and_reading(tmp_path):
    work, res = _dirs(tmp_path)
    methods = "lad,datm,mtt,dm,erm,lad-init,lad-no-dam,lad-no-ed"
    grid = LadGrid(LadOptions(ifs="100", ipcs="10,50", methods=methods, work=work, results=res))
    per = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    _record(grid, {"if100-lad": _cell(0.45, per), "if100-datm": _cell(0.30, per), "if100-mtt": _cell(0.35, per),
                   "if100-dm": _cell(0.50, per), "if100-erm": _cell(0.55, per), "if100-ipc50-lad": _cell(0.60, per),
                   "if100-lad-init": _cell(0.40, per), "if100-lad-no-dam": _cell(0.41, per),
                   "if100-lad-no-ed": _cell(0.47, per), "experts-if100": {"seconds": 3600.0}})
    _run("lad-cifar10lt", "--ifs", "100", "--ipcs", "10,50", "--methods", methods, "--report-only", "--work", work,
         "--results", res)
    md = (Path(res) / "lad-cifar10lt-cpu.md").read_text()
    assert "--ifs 100 --ipcs 10,50 --methods lad,datm,mtt,dm,erm,lad-init,lad-no-dam,lad-no-ed" in md
    assert "the distillation iterations add +5.0 points" in md  # lad 45 vs lad-init 40
    assert "+ DAM only (lad-no-ed) 47.0, + ED only (lad-no-dam) 41.0, both (lad) 45.0" in md
    assert "44.3 / 57.1 / 54.8 / 64.0" in md  # the paper's ablation, from the packaged paper data
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
        assert (Path(res) / f"lad-cifar10lt-cpu-{png}.png").stat().st_size > 1000
    payload = json.loads((Path(res) / "lad-cifar10lt-cpu.json").read_text())
    assert set(payload["results"]) == {"if100-ipc10", "if100-ipc50"}
    assert payload["paper"]["100"]["50"]["datm"] == "44.3±0.1"
    # the cell records live under the results folder, one small JSON per cell with its key
    rec = json.loads((Path(res) / "cells" / "lad-cifar10lt-cpu" / "if100-ipc50-lad.json").read_text())
    assert rec["cell"] == "if100-ipc50-lad" and rec["key_hash"] == grid.cell(100, 50, "lad")[0].hash
    assert rec["key"]["config"]["distill"]["ipc"] == 50 and rec["key"]["data"]["imbalance_factor"] == 100.0


@pytest.mark.parametrize("ipc,key", [(10, "if10-lad"), (50, "if10-ipc50-lad")])
def test_cell_names_stay_compatible(ipc, key, tmp_path):
    """A legacy cell file of that name is adopted as that grid position's cell."""
    work, res = _dirs(tmp_path)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / f"{key}.json").write_text(json.dumps(_cell(0.5, [0.5] * 10)))
    out = _run("lad-cifar10lt", "--ifs", "10", "--ipcs", str(ipc), "--methods", "lad", "--adopt-legacy", legacy,
               "--plan", "--work", work, "--results", res)
    assert f"{key} " in out and "1 done" in out


def test_variants_apply_their_overrides_and_take_suffixes(tmp_path):
    work, res = _dirs(tmp_path)
    out = _run("lad-cifar10lt", "--ifs", "100", "--methods", "lad,lad-all,lad-all@7", "--variant",
               "lad-all=lad:distill.phases.0.match=all,distill.lr_lr=1e-4", "--plan", "--work", work, "--results", res)
    cells = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("if")}
    assert "representation(N=10, M=2, start<10, backbone)" in cells["if100-lad"]
    assert "representation(N=10, M=2, start<10, all)" in cells["if100-lad-all"]
    assert "7 iterations" in cells["if100-lad-all@7"] and "start<10, all)" in cells["if100-lad-all@7"]
    # a variant of LAD starts from LAD's released configuration of the cell (its own lambdas and windows)
    assert "preset lad-cifar10-if100-ipc10 " in cells["if100-lad-all"]


@pytest.mark.parametrize("args,word", [
    (["lad-cifar10lt", "--variant", "lad-x"], "--variant"),
    (["lad-cifar10lt", "--variant", "lad-x=lad"], "--variant"),
    (["lad-cifar10lt", "--variant", "lad-x=lad:novalue"], "--variant"),
    (["lad-cifar10lt", "--variant", "x@1=lad:a=b"], "--variant"),
    (["lad-cifar10lt", "--methods", "lad,nosuchmethod"], "nosuchmethod"),
    (["nosuchtable"], "nosuchtable"),
    (["two-stage", "--ifs", "10"], "--ifs"),
    (["lad-cifar10lt", "--width", "16"], "--width"),
])
def test_bad_input_is_one_clear_line(args, word, tmp_path, capsys):
    work, res = _dirs(tmp_path)
    rc = main(args + ["--plan", "--work", work, "--results", res])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0 and word in err and err.startswith("ltdd: error: ")
    assert isinstance(CliRunner().invoke(reproduce_cmd, args + ["--plan"]).exception, LtddError)


def test_report_leaves_out_columns_without_any_cell(tmp_path):
    work, res = _dirs(tmp_path)
    grid = LadGrid(LadOptions(ifs="10,100", ipcs="10,50", methods="lad", work=work, results=res))
    _record(grid, {"if100-lad": _cell(0.45, [0.5] * 10)})
    _run("lad-cifar10lt", "--ifs", "10,100", "--ipcs", "10,50", "--methods", "lad", "--report-only", "--work", work,
         "--results", res)
    md = (Path(res) / "lad-cifar10lt-cpu.md").read_text()
    assert "| method | IF 100 IPC 10 ours | paper |" in md
    assert "IF 10 IPC" not in md and "IPC 50" not in md


def test_changed_option_makes_a_cell_stale_and_it_is_recomputed(tmp_path):
    """A recorded cell is reused only under its key: another --full-epochs (or --runs) is another cell."""
    work, res = _dirs(tmp_path)
    args = ["lad-cifar10lt", "--ifs", "100", "--methods", "dm,erm", "--work", work, "--results", res]
    grid = LadGrid(LadOptions(ifs="100", methods="dm,erm", work=work, results=res))
    _record(grid, {"if100-erm": _cell(0.5, [0.5] * 10), "if100-dm": _cell(0.4, [0.4] * 10)})
    assert _states(_run(*args, "--plan")) == {"if100-erm": "done", "if100-dm": "done"}
    out = _run(*args, "--full-epochs", "5", "--plan")
    assert _states(out) == {"if100-erm": "stale", "if100-dm": "done"}
    assert out.strip().endswith("1 done, 0 running, 0 partial, 0 to do, 1 stale (recorded under another key: recomputed)")
    assert _states(_run(*args, "--runs", "2", "--plan")) == {"if100-erm": "done", "if100-dm": "stale"}
    # the report leaves the stale cell out
    _run(*args, "--full-epochs", "5", "--report-only")
    assert "| erm | – |" in (Path(res) / "lad-cifar10lt-cpu.md").read_text()
    # computing: a stale record is not reused
    stale = LadGrid(LadOptions(ifs="100", methods="dm,erm", full_epochs=5, work=work, results=res))
    cell = stale.cell(100, 10, "erm")[0]
    calls = []
    got = stale.table.cell(cell, lambda: calls.append(1) or _cell(0.7, [0.7] * 10))
    assert calls == [1] and got["summary"]["accuracy"]["mean"] == 0.7
    assert json.loads(stale.table.path("if100-erm").read_text())["key_hash"] == cell.hash


def test_two_stage_plan_stale_after_width_or_epochs_change(tmp_path):
    """The two-stage rows are keyed by the networks' width and epochs (and what they depend on): a run with another
    --width or --real-epochs does not reuse them; --syn-epochs leaves the rows that train on real images only."""
    work, res = _dirs(tmp_path)
    grid = TwoStageGrid(TwoStageOptions(work=work, results=res))
    for c, *_ in grid.cells():
        grid.table.save(c, {"summary": {}} if c.name in ROWS else {})
    base = ["two-stage", "--plan", "--work", work, "--results", res]

    def states(*extra):
        return {ln.split()[0]: ln.split()[1] for ln in _run(*base, *extra).splitlines()[:-1]}

    assert set(states().values()) == {"done"}
    for extra in (["--width", "16"], ["--real-epochs", "5"]):
        st = states(*extra)
        assert all(st[r] == "stale" for r in ROWS) and st["grouping"] == "stale", st
        assert st["distill-gm"] == st["distill-mtt"] == "done"
    st = states("--syn-epochs", "50")
    assert st["original_flat"] == st["original+original"] == "done"
    assert st["gm_flat"] == st["original+gm"] == st["gm+gm"] == "stale"
    assert states("--gm-iterations", "5")["distill-gm"] == "stale"


@pytest.mark.slow
def test_two_stage_grid_resumes_and_recomputes_stale_rows(tmp_path, one_thread, capsys):
    """A tiny two-stage table on digits: a second call computes nothing; another width recomputes every row."""
    data = DataConfig(dataset="digits", imbalance_factor=10, zca=False, probe_per_class=5)

    def grid(**kw):
        o = TwoStageOptions(work=str(tmp_path / "w"), results=str(tmp_path / "res"), runs=1, real_epochs=2,
                            syn_epochs=2, gm_iterations=1, mtt_iterations=1, mtt_experts=1, expert_epochs=11, **kw)
        return TwoStageGrid(o, data_config=data)

    g8 = grid(width=8)
    stem = g8.run()
    first = {r: g8.table.record(r) for r in ROWS}
    capsys.readouterr()
    grid(width=8).run()
    log = capsys.readouterr().out
    # every cell but the expert store (filled up, if short)
    assert "running" not in log and "recomputing" not in log and log.count("done before, reusing") == 15
    g4 = grid(width=4)
    g4.run()
    log = capsys.readouterr().out
    for r in ROWS:
        rec = g4.table.record(r)
        assert rec["key_hash"] == g4.row_cell(r).hash != first[r]["key_hash"]
        assert f"{r}: stale (recorded under key {first[r]['key_hash']}" in log
    assert "distill-gm: done before, reusing" in log  # the distilled sets do not depend on the width
    payload = json.loads(stem.with_suffix(".json").read_text())
    assert payload["complete"] and set(payload["rows"]) == set(ROWS) and payload["settings"]["width"] == 4
    assert "--width 4" in payload["command"]
    (stem.with_suffix(".md")).unlink()
    assert grid(width=4).write_report() == stem and stem.with_suffix(".md").is_file()  # the report-only path


def test_adopt_legacy_cells_from_a_folder_and_a_results_json(tmp_path):
    work, res = _dirs(tmp_path)
    legacy = tmp_path / "old" / "cells"
    legacy.mkdir(parents=True)
    for name, acc in (("if10-lad", 0.5), ("if100-ipc50-dm", 0.4), ("if200-lad", 0.3)):
        (legacy / f"{name}.json").write_text(json.dumps(_cell(acc, [acc] * 10)))
    (legacy / "experts-if100.json").write_text(json.dumps({"seconds": 60.0}))
    (legacy.parent / "experts-if10").mkdir()
    (legacy.parent / "experts-if10" / "store.json").write_text("{}")
    args = ["lad-cifar10lt", "--ifs", "10,100", "--ipcs", "10,50", "--methods", "lad,dm,erm", "--work", work,
            "--results", res]
    out = _run(*args, "--adopt-legacy", legacy)
    adopted = {ln.split()[0] for ln in out.splitlines() if "adopted under key" in ln}
    assert adopted == {"if10-lad", "if100-ipc50-dm", "experts-if100"}  # if200-lad is not a cell of this grid
    assert "3 cells adopted from" in out and "asserting the configuration has not changed" in out
    assert "legacy expert store" in out and "experts-if10-" in out  # where the old store could be moved
    grid = LadGrid(LadOptions(ifs="10,100", ipcs="10,50", methods="lad,dm,erm", work=work, results=res))
    rec = grid.table.record("if100-ipc50-dm")
    assert rec["key_hash"] == grid.cell(100, 50, "dm")[0].hash and rec["adopted_from"] == str(legacy)
    assert rec["result"]["summary"]["accuracy"]["mean"] == 0.4
    assert "kept (already recorded under key" in _run(*args, "--adopt-legacy", legacy)
    # an old results JSON: columns if<IF>-ipc<IPC>; full-data and IPC 10 cells have the short names
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"results": {"if10-ipc10": {"erm": _cell(0.6, [0.6] * 10), "lad": _cell(0.1, [0.1] * 10)},
                                           "if10-ipc50": {"erm": _cell(0.6, [0.6] * 10), "lad": _cell(0.7, [0.7] * 10)}}}))
    out = _run(*args, "--adopt-legacy", old, "--plan")
    assert {ln.split()[0] for ln in out.splitlines() if "adopted under key" in ln} == {"if10-erm", "if10-ipc50-lad"}
    assert _states(out)["if10-erm"] == _states(out)["if10-ipc50-lad"] == _states(out)["if10-lad"] == "done"
    assert grid.table.fresh(grid.cell(10, 10, "lad")[0])["summary"]["accuracy"]["mean"] == 0.5  # kept, not replaced


def test_data_key_names_the_root_by_name_not_path_or_presence(tmp_path):
    """The same archive anywhere (a path, ${LTDD_DATA}, absent on this machine) is the same data; another name is not."""
    a = tmp_path / "a" / "x.tar.gz"
    a.parent.mkdir()
    a.write_bytes(b"0" * 10)
    key = lambda root, **kw: data_key(DataConfig(dataset="cifar10", root=str(root), **kw))  # noqa: E731
    assert key(a) == key("${LTDD_DATA}/x.tar.gz") == key(tmp_path / "missing" / "x.tar.gz") != key(tmp_path / "y.tar.gz")
    assert key(a)["root"] == "x.tar.gz"
    assert key(a, imbalance_ratio=0.1)["imbalance_factor"] == 10.0 and key(a) != key(a, seed=1) != key(a, zca=False)


def test_cell_table_reuses_only_under_the_same_key(tmp_path):
    table = CellTable("t-cpu", tmp_path / "w", tmp_path / "res")
    calls = []

    def fn():
        calls.append(1)
        return {"summary": {"accuracy": {"mean": 0.5, "std": 0.0}}}

    table.cell(Cell("c", {"a": 1}), fn)
    table.cell(Cell("c", {"a": 1}), fn)
    assert calls == [1] and table.state(Cell("c", {"a": 1})) == "done" and table.state(Cell("c", {"a": 2})) == "stale"
    table.cell(Cell("c", {"a": 2}), fn)
    assert calls == [1, 1] and table.record("c")["key"] == {"a": 2}
    assert (tmp_path / "res" / "cells" / "t-cpu" / "c.json").is_file()


def test_help_stands_alone_and_the_scripts_call_the_command(tmp_path):
    text = CliRunner().invoke(reproduce_cmd, ["--help"]).output
    assert "§" not in text and "lad-cifar10lt" in text and "--adopt-legacy" in text
    out = subprocess.run([sys.executable, "benchmarks/reproduce.py", "--table", "two-stage", "--plan", "--work",
                          str(tmp_path / "w"), "--results", str(tmp_path / "res")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("16 cells: 0 done, 0 running, 0 partial, 16 to do")


def test_the_scripts_entry_point_configures_the_process_as_the_ltdd_group(tmp_path, monkeypatch):
    """benchmarks/reproduce.py calls ``main`` outside the ``ltdd`` group: it must still apply the process setup
    (CPU malloc tuning), or every table it runs trains 1.5-2x slower than ``ltdd reproduce``."""
    from ltdd import runtime

    calls = []
    monkeypatch.setattr(runtime, "configure_process", lambda: calls.append(1) or {"malloc_tuning": True})
    work, res = _dirs(tmp_path)
    assert main(["two-stage", "--plan", "--work", work, "--results", res]) == 0
    assert calls == [1]
