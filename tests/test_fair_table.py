"""The fair table: its shipped rows and cells (modes per row, one data setting, the teacher's store, full-data cells
shared with the LAD table), clear errors for bad grid files, the report's figures against hand-computed answers, and
a tiny run on digits."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from ltdd.errors import LtddError
from ltdd.experiments.fair_report import reading, row_figures, write_report
from ltdd.experiments.fair_table import GRID_FILE, FairGrid, FairOptions
from ltdd.experiments.lad_table import LadGrid, LadOptions


def _grid(tmp_path, **kw) -> FairGrid:
    return FairGrid(FairOptions(work=str(tmp_path / "w"), results=str(tmp_path / "res"), **kw))


# ---- the shipped grid ----------------------------------------------------------------------------------------------

def test_shipped_rows_modes_and_shared_cells(tmp_path):
    g = _grid(tmp_path)
    assert [r.name for r in g.rows] == ["random", "dm", "dc", "mtt", "datm", "lad", "lad+adsa", "rldd",
                                         "rldd-no-debias", "rldd-no-bnfair", "rldd-no-crop-init"]
    assert set(g.ifs) == {10, 100} and g.ipc == 10
    for IF in g.ifs:
        modes = {r.name: g.modes(r, IF) for r in g.rows}
        for hard_set in ("random", "dm", "dc", "mtt"):  # no soft labels: own = hard, not evaluated twice
            assert modes[hard_set] == ("hard", "teacher", "teacher-crt")
        for soft_set in ("datm", "lad", "rldd", "rldd-no-debias", "rldd-no-bnfair", "rldd-no-crop-init"):
            assert modes[soft_set] == ("hard", "own", "teacher", "teacher-crt")
        assert modes["lad+adsa"] == ("own",)
        # MTT, DATM and LAD read one trajectory store; the RLDD rows but the no-debias ablation share one
        stores = {r.name: g.store_cell(r, IF) for r in g.distilled_rows()}
        assert stores["mtt"].hash == stores["datm"].hash == stores["lad"].hash
        assert stores["rldd"].hash == stores["rldd-no-bnfair"].hash == stores["rldd-no-crop-init"].hash
        assert stores["rldd-no-debias"].hash != stores["rldd"].hash and stores["random"] is None
        assert g.teacher_cell(IF).hash == stores["rldd"].hash
        # the calibrated row re-evaluates LAD's set: same set, same distillation, calibrate in the key
        adsa, lad = g.eval_cell(g.row("lad+adsa"), IF, "own"), g.eval_cell(g.row("lad"), IF, "own")
        assert adsa.key["set"] == lad.key["set"] and adsa.key["calibrate"] and not lad.key["calibrate"]
        # the teacher mode names its teacher; the hard and own modes none
        assert g.eval_cell(g.row("dm"), IF, "teacher").key["teacher"] == g.teacher_cell(IF).hash
        assert g.eval_cell(g.row("dm"), IF, "hard").key["teacher"] is None
        crt = g.teacher_cell(IF, "crt")  # the second teacher: cRT on the full set, the full-data recipe
        assert crt.key["method"] == "crt" and crt.key["train"] == g.full_cell("crt", IF).key["train"]
        assert g.eval_cell(g.row("dm"), IF, "teacher-crt").key["teacher"] == crt.hash
        assert g.eval_cell(g.row("dm"), IF, "teacher-crt").key["mode"] == "teacher"
        # LAD runs its released configuration for (IF, IPC 10), as in the LAD table
        lad_cfg = g.config(g.row("lad"), IF)
        assert lad_cfg.data.resolved_imbalance_factor() == IF and lad_cfg.distill.ipc == 10
        assert lad_cfg.data.zca and g.config(g.row("rldd"), IF).data.zca  # one preprocessing for every row


def test_full_data_cells_share_the_lad_tables_key_and_records(tmp_path):
    g = _grid(tmp_path)
    lad = LadGrid(LadOptions(work=str(tmp_path / "lw"), results=str(tmp_path / "res"), ifs=(10, 100),
                             methods=("erm", "crt")))
    for IF in (10, 100):
        for m in ("erm", "crt"):
            mine, theirs = g.full_cell(m, IF), lad.cell(IF, 10, m)[0]
            assert mine.hash == theirs.hash
    # a record of the LAD table under the same key is reused; under another key it is not
    cell = g.full_cell("erm", 100)
    lad.table.save(lad.cell(100, 10, "erm")[0], {"summary": {"accuracy": {"mean": 0.42, "std": 0.0}}})
    assert g.borrow_full(cell) and g.table.fresh(cell)["summary"]["accuracy"]["mean"] == 0.42
    other = g.full_cell("crt", 100)
    lad.table.save(type(other)(other.name, {**other.key, "runs": 99}), {"summary": {}})
    assert not g.borrow_full(other)


@pytest.mark.parametrize("change, word", [
    (lambda r: r.update(colour="red"), "unknown key colour"),
    (lambda r: r["rows"].append({"name": "x"}), "needs either a preset"),
    (lambda r: r["rows"].append({"name": "x", "preset": "nope"}), "unknown preset 'nope'"),
    (lambda r: r["rows"].append({"name": "x", "of": "lad+adsa"}), "not a distilled row"),
    (lambda r: r["rows"].append({"name": "x", "preset": "dm", "calibrate": True}), "calibrate applies"),
    (lambda r: r.update(teachers=["dm"]), "no debiased store"),
    (lambda r: r.update(teachers=["zzz"]), "neither a row nor a long-tail method"),
    (lambda r: r.update(teachers=["crt", "crt"]), "named twice"),
    (lambda r: r.update(teachers="rldd"), "must be a list"),
    (lambda r: r["rows"].append({"name": "dm", "preset": "dm"}), "distinct names"),
    (lambda r: r["protocols"]["cpu"].update(relabel="cpu"), "not a relabel protocol"),
    (lambda r: r.update(common=["distill.eval_every=0"]), "other data settings"),  # LAD's ZCA vs RLDD's none
    (lambda r: r.update(trajectory_store=["experts.train.epochs=3"]),
     r"row mtt at IF 100: phase '\w+' reads up to epoch \d+, but the store trains 3 representation epochs"),
])
def test_a_bad_grid_file_is_one_clear_line(tmp_path, change, word):
    raw = yaml.safe_load(GRID_FILE.read_text())
    change(raw)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(LtddError, match=word):
        _grid(tmp_path, grid_file=str(path))


# ---- the report ----------------------------------------------------------------------------------------------------

def _res(acc, std=0.01, groups=(0.5, 0.4, 0.3), class_std=0.1, **extra):
    g = dict(zip(("head", "medium", "tail"), groups))
    return {"summary": {"accuracy": {"mean": acc, "std": std}, "class_std": {"mean": class_std, "std": 0.0},
                        "groups": {k: {"mean": v, "std": 0.0} for k, v in g.items()}}, **extra}


def test_report_gains_lrs_compute_and_reading_from_hand_made_cells(tmp_path):
    g = _grid(tmp_path, ifs=(100,))
    t, IF = g.table, 100
    save = lambda cell, res: t.save(cell, res)  # noqa: E731
    save(g.full_cell("erm", IF), _res(0.60))
    save(g.full_cell("crt", IF), _res(0.65))
    save(g.baseline_cell(IF, "hard"), _res(0.30))
    save(g.baseline_cell(IF, "teacher"), _res(0.40))
    lad, rldd, adsa = g.row("lad"), g.row("rldd"), g.row("lad+adsa")
    save(g.store_cell(lad, IF), {"expert_seconds": {"representation": 1000.0, "classifier": 200.0}, "threads": 1})
    save(g.store_cell(rldd, IF), {"expert_seconds": {"observer": 300.0, "teacher": 300.0}, "threads": 2})
    save(g.distill_cell(lad, IF), {"distill_seconds": 500.0, "threads": 1})
    save(g.distill_cell(rldd, IF), {"distill_seconds": 50.0, "threads": 1})
    save(g.eval_cell(lad, IF, "hard"), _res(0.30))
    save(g.eval_cell(lad, IF, "own"), _res(0.45))
    save(g.baseline_cell(IF, "own", lad), _res(0.35))
    save(g.eval_cell(lad, IF, "teacher"), _res(0.50))
    save(g.eval_cell(adsa, IF, "own"), _res(0.44, calibration={"tau": 0.7}))
    save(g.baseline_cell(IF, "own", adsa), _res(0.36))
    save(g.eval_cell(rldd, IF, "own"), _res(0.41))
    save(g.eval_cell(rldd, IF, "teacher"), _res(0.55))
    figs = {IF: row_figures(g, IF, g.collect()[0])}
    by = {f["row"]: f for f in figs[IF]}
    f = by["lad"]
    assert f["modes"]["own"]["gain"] == pytest.approx(0.10) and f["modes"]["teacher"]["gain"] == pytest.approx(0.10)
    # LRS by hand: HLR = 0.60 - 0.30, IOR = 0.45 - 0.35, a = 0.5 * 0.1 - 0.5 * 0.3 = -0.1
    e = math.e
    assert f["lrs"]["lrs"] == pytest.approx((math.exp(-0.1) - 1 / e) / (e - 1 / e))
    # compute: LAD's distillation + every expert it reads (representation and classifier); RLDD's x its 2 threads
    assert f["compute"] == pytest.approx(500 + 1000 + 200)
    assert by["rldd"]["compute"] == pytest.approx(50 + 2 * 600)
    assert by["lad+adsa"]["compute"] == f["compute"] and by["lad+adsa"]["modes"]["own"]["tau"] == 0.7
    assert by["dm"]["modes"]["own"] == {"same_as": "hard"} and by["lad+adsa"]["modes"]["hard"] is None
    read = reading(g, figs)
    assert ("IF 100: RLDD above LAD under the relabel protocol (mode teacher: teacher rldd): holds (55.0 vs 50.0, "
            "+5.0 points)") in read
    assert "IF 100: RLDD above LAD under LAD's own protocol (own mode): does not hold (41.0 vs 45.0, -4.0 points)" \
        in read
    assert any(s.startswith("IF 100: RLDD at no more than a quarter of LAD's compute: does not hold") for s in read)
    assert "IF 100: LAD + ADSA at least LAD (own mode): does not hold (44.0 vs 45.0, -1.0 points)" in read
    stem = write_report(g)
    md = stem.with_suffix(".md").read_text()
    assert "| lad | 1700 | 30.0 ± 1.0 (+0.0) | 45.0 ± 1.0 (+10.0) | 50.0 ± 1.0 (+10.0) | to do | 0.228 |" in md
    assert "| dm | - | to do | = hard | to do | to do | - |" in md
    assert json.loads(stem.with_suffix(".json").read_text())["rows"]["100"][5]["row"] == "lad"


# ---- a tiny table on digits -----------------------------------------------------------------------------------------

TINY = {
    "ipc": 1, "ifs": [10], "common": ["distill.eval_every=0"],
    "protocols": {"cpu": {"sgd": "cpu", "relabel": "relabel_cpu",
                          "set": ["train.epochs=3", "model.args.width=8"]}},
    "teachers": ["rldd", "crt"],
    "trajectory_store": ["experts.num_experts=1", "experts.train.epochs=2", "experts.classifier_train.epochs=2",
                         "experts.model.args.width=8"],
    "rows": [
        {"name": "random", "preset": "random"},
        {"name": "lad", "preset": "lad", "set": [
            "experts.model.args.width=8", "distill.iterations=2", "distill.phases.0.max_start_epoch=1",
            "distill.phases.0.syn_steps=2", "distill.phases.1.syn_steps=2"]},
        {"name": "lad+adsa", "of": "lad", "calibrate": True},
        {"name": "rldd", "preset": "rldd", "set": [
            "experts.train.epochs=1", "experts.model.args.width=8", "distill.iterations=2",
            "distill.options.score_batch=64", "distill.options.stats_batch=64"]},
    ],
    "full_data": [],
}
DIGITS = ("data.dataset=digits", "data.zca=false", "data.root=null")


@pytest.mark.slow
def test_tiny_table_on_digits(tmp_path, one_thread):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    kw = dict(grid_file=str(path), extra_set=DIGITS, runs=1, poll_s=0.01)
    grid = _grid(tmp_path, **kw)
    grid.run()
    results, stale = grid.collect()
    names = [c.name for c, _, _ in grid.cells(10)]
    assert set(results) == set(names) and not stale
    # the teacher mode's teacher is the rldd store's; the baselines are under the same protocol and mode
    store = str(grid.store_dir(grid.row("rldd"), 10))
    for name in ("if10-lad-teacher", "if10-random-teacher", "if10-baseline-teacher", "if10-teacher-test"):
        assert results[name]["teacher"]["path"].startswith(store)
    crt = str(grid.table.artifact(grid.teacher_cell(10, "crt")))  # the second teacher: cRT trained by the table
    for name in ("if10-lad-teacher-crt", "if10-random-teacher-crt", "if10-baseline-teacher-crt",
                 "if10-teacher-crt-test"):
        assert results[name]["teacher"]["path"].startswith(crt)
    for name in ("if10-lad-teacher", "if10-random-teacher", "if10-baseline-teacher", "if10-teacher-test"):
        assert results[name]["teacher"]["path"].startswith(store)
        if name != "if10-teacher-test":
            assert results[name]["label_mode"] == "teacher"
            assert results[name]["protocol_name"].startswith("relabel_cpu")
    for name in ("if10-lad-own-baseline", "if10-rldd-own-baseline", "if10-lad+adsa-own-baseline"):
        assert results[name]["label_mode"] == "own" and results[name]["kind"] == "random real subset"
    assert "RLDD's teacher" in results["if10-rldd-own-baseline"]["soft_labels_from"]
    assert results["if10-lad+adsa-own"]["calibration"] and results["if10-lad+adsa-own-baseline"]["calibration"]
    assert results["if10-lad+adsa-own"]["summary"] != results["if10-lad-own"]["summary"] or \
        results["if10-lad+adsa-own"]["calibration"]["tau"] == 0
    # a second run computes nothing; a set gone from the work folder is distilled again, its record kept
    lad_set = grid.table.artifact(grid.distill_cell(grid.row("lad"), 10))
    before = json.loads(grid.table.path("if10-lad").read_text())
    for f in lad_set.iterdir():
        f.unlink()
    teacher_file = grid.teacher_path(10, "crt")
    teacher_file.unlink()
    grid.run()
    assert (lad_set / "distilled.safetensors").is_file() and teacher_file.is_file()
    assert json.loads(grid.table.path("if10-lad").read_text()) == before
    stem = write_report(grid)
    assert "| lad |" in stem.with_suffix(".md").read_text()


@pytest.mark.parametrize("table, args, word", [
    ("lad-cifar10lt", ["--standardised-pixels"], "--raw-pixels/--standardised-pixels: not an option of the "
                                                 "lad-cifar10lt table"),
    ("fair-cifar10lt", ["--width", "64"], "--width: not an option of the fair-cifar10lt table"),
    ("fair-cifar10lt", ["--methods", "lad"], "--methods: not an option"),
    ("accuracy-vs-compute", ["--ifs", "10"], "--ifs: not an option"),
])
def test_an_option_of_another_table_is_one_clear_line(tmp_path, table, args, word):
    from click.testing import CliRunner

    from ltdd.experiments.command import reproduce_cmd

    res = CliRunner().invoke(reproduce_cmd, [table, "--plan", "--work", str(tmp_path / "w"), "--results",
                                             str(tmp_path / "r"), *args])
    assert res.exit_code != 0 and word in str(res.exception)


def test_plan_of_the_shipped_table_needs_no_data(tmp_path):
    from click.testing import CliRunner

    from ltdd.experiments.command import reproduce_cmd

    res = CliRunner().invoke(reproduce_cmd, ["fair-cifar10lt", "--plan", "--ifs", "100", "--work",
                                             str(tmp_path / "w"), "--results", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "if100-lad+adsa-own" in res.output and "if10-" not in res.output
