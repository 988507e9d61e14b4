"""The accuracy-vs-compute table: its shipped points (spread, stores sized to what they read), the store charge of a
point's compute, the automatic reading on hand-made curves, the report with missing cells, and a tiny run on digits
that records measured seconds."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from ltdd.config import load_yaml
from ltdd.errors import LtddError
from ltdd.experiments.command import reproduce_cmd
from ltdd.experiments.compute_reading import best_per_decade, crossing, crossing_text
from ltdd.experiments.compute_report import point_compute, write_report
from ltdd.experiments.compute_table import GRID_FILE, ComputeGrid, ComputeOptions

TRAJECTORY = ("mtt", "datm", "lad")


def _grid(tmp_path, **kw) -> ComputeGrid:
    return ComputeGrid(ComputeOptions(work=str(tmp_path / "w"), results=str(tmp_path / "res"), **kw))


def _result(acc: float, std: float = 0.01, distill: float = 100.0, threads: int = 1) -> dict:
    ms = {"mean": acc, "std": std}
    return {"summary": {"accuracy": ms, "class_std": {"mean": 0.1, "std": 0.0}}, "distill_seconds": distill,
            "eval_seconds": 50.0, "seconds": distill + 50.0, "threads": threads, "distill_threads": threads}


def _pts(*xy) -> list[dict]:
    return [{"name": f"p{i}", "compute": x, "mean": y, "std": 0.005} for i, (x, y) in enumerate(xy)]


# ---- the shipped grid ----------------------------------------------------------------------------------------------

def test_plan_lists_three_points_per_method_spanning_ten_times_the_compute(tmp_path):
    grid = _grid(tmp_path)
    stores, points = grid.plan()
    by_method: dict = {}
    for r in points:
        by_method.setdefault(r["method"], []).append(r["estimate"]["compute"])
    assert set(by_method) >= {"random", "dm", "dc", "mtt", "datm", "lad"}
    assert len(by_method.pop("random")) == 1
    for m, est in by_method.items():
        assert len(est) >= 3 and max(est) >= 10 * min(est), (m, est)
    for m in TRAJECTORY:  # the largest trajectory point, experts included, is planned at >= 1.5 single-core hours
        assert max(by_method[m]) >= 1.5 * 3600, m
    for r in stores:  # every store trains exactly the representation epochs its points read (W + 1 with M = 2)
        e = grid.store_config(r["cell"][len("store-"):]).experts
        if e.kind == "trajectory":
            need = max(ph.max_start_epoch - 1 + ph.expert_epochs for p in grid.points
                       if p.store == r["cell"][len("store-"):] for ph in grid.point_config(p).distill.phases
                       if ph.store == "representation")
            assert e.train.epochs == need
    res = CliRunner().invoke(reproduce_cmd, ["accuracy-vs-compute", "--plan", "--work", str(tmp_path / "w"),
                                             "--results", str(tmp_path / "res")])
    assert res.exit_code == 0, res.output
    for r in points + stores:
        assert r["cell"] in res.output
    assert "estimated total to fill the table:" in res.output and "single-core hours" in res.output


def test_the_estimate_charges_the_store_parts_a_point_reads(tmp_path):
    grid = _grid(tmp_path)
    parts = grid.store_estimate("traj-s")
    est = {p.name: grid.estimate(p) for p in grid.points}
    assert est["mtt-s"]["store"] == pytest.approx(parts["representation"])  # MTT reads no classifier experts
    assert est["lad-s"]["store"] == pytest.approx(parts["representation"] + parts["classifier"])
    n_rep = len(grid.users("traj-s")["representation"])
    assert n_rep == 6 and est["mtt-s"]["store_amortised"] == pytest.approx(parts["representation"] / n_rep)
    assert est["lad-m"]["compute"] == pytest.approx(est["lad-m"]["distill"] + est["lad-m"]["store"])


@pytest.mark.parametrize("change, word", [
    (lambda g: g["stores"]["traj-xs"]["set"].__setitem__(1, "experts.train.epochs=7"), "trains 7 representation"),
    (lambda g: g["methods"]["mtt"]["points"][0].__setitem__("store", "nope"), "unknown store 'nope'"),
    (lambda g: g["methods"]["dm"]["points"][0].__setitem__("store", "traj-xs"), "uses no experts"),
    (lambda g: g["methods"]["lad"]["points"][0]["set"].append("distill.phases.0.max_start_epoch=6"), "reads up to"),
    (lambda g: g.update(colour="red"), "grid.yaml: unknown key colour"),
    (lambda g: g["methods"]["mtt"]["points"][0].__setitem__("stor", "traj-xs"), "point 'mtt-xs': unknown key stor"),
    (lambda g: g["methods"]["dm"].__setitem__("point", []), "method 'dm': unknown key point"),
    (lambda g: g["stores"]["traj-xs"].__setitem__("sets", []), "store 'traj-xs': unknown key sets"),
])
def test_a_bad_grid_file_is_one_clear_line(tmp_path, change, word):
    raw = load_yaml(GRID_FILE)
    change(raw)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(LtddError, match=word) as e:
        _grid(tmp_path, grid_file=str(path))
    assert "\n" not in str(e.value)


# ---- the reading ---------------------------------------------------------------------------------------------------

def test_crossing_on_hand_made_curves():
    dm = _pts((100, 0.40), (1000, 0.42), (10000, 0.43))
    lad = _pts((100, 0.30), (1000, 0.40), (10000, 0.50))  # below DM, above it from between 1e3 and 1e4 s
    res = crossing(lad, dm)
    assert res["status"] == "crosses" and len(res["at"]) == 1 and res["at"][0][1] == "up" and res["clear"]
    # at 1e3 s LAD is 0.02 below, at 1e4 s 0.07 above: the gap is linear in log10 x -> 10^(3 + 2/9)
    assert res["at"][0][0] == pytest.approx(10 ** (3 + 2 / 9), rel=1e-6)
    text = crossing_text("LAD", "DM", res, (3, 3), (3, 3))
    assert text.startswith("LAD's curve crosses DM's: it rises above DM at about 1668 ")
    below = crossing(_pts((100, 0.30), (1000, 0.35), (10000, 0.41)), dm)
    assert below["status"] == "below" and below["clear"]
    assert "does not cross DM's: it stays below it" in crossing_text("LAD", "DM", below, (3, 3), (3, 3))
    # only the common compute range counts: a LAD point beyond DM's last one cannot make a crossing, but it is said
    far = crossing(_pts((100, 0.30), (1000, 0.35), (1e5, 0.9)), _pts((100, 0.4), (2000, 0.45)))
    assert far["status"] == "below" and far["beyond"]["above"] and far["beyond"]["b_largest"] == 2000
    assert crossing_text("LAD", "DM", far).endswith(
        "; beyond DM's largest point (2000 s), LAD reaches 90.0 % at 100000 s, above every DM point (DM's best: "
        "45.0 % at 2000 s)")
    assert crossing(lad, dm)["beyond"] is None  # no LAD point beyond DM's range
    noisy = crossing(_pts((100, 0.40), (1000, 0.42)), [dict(p, std=0.05) for p in _pts((100, 0.41), (1000, 0.41))])
    assert noisy["status"] == "crosses" and not noisy["clear"]
    assert "not resolved" in crossing_text("LAD", "DM", noisy)


def test_the_reading_says_not_enough_points_while_cells_are_missing():
    one = crossing(_pts((100, 0.3)), _pts((100, 0.4), (1000, 0.5)))
    assert one["status"] == "few"
    assert crossing_text("LAD", "DM", one, (1, 2), (5, 4)).startswith("not enough points yet (LAD 1/5, DM 2/4")
    res = crossing(_pts((100, 0.3), (1000, 0.5)), _pts((100, 0.4), (1000, 0.45)))
    text = crossing_text("LAD", "DM", res, (2, 2), (5, 4))
    assert text.startswith("not enough points yet") and "so far: LAD's curve crosses DM's" in text
    assert crossing(_pts((10, 0.3), (50, 0.4)), _pts((100, 0.4), (1000, 0.5)))["status"] == "disjoint"


def test_best_method_per_budget_decade():
    rows = best_per_decade({"dm": _pts((60, 0.38), (600, 0.41), (2400, 0.43)),
                            "lad": _pts((400, 0.36), (1200, 0.40), (7000, 0.47)),
                            "dc": _pts((40, 0.35), (500, 0.39))})
    assert [(r["decade"], r["best"]["name"], r["within"]["name"]) for r in rows] == [
        (1, "p0", "p0"), (2, "p1", "p1"), (3, "p2", "p2")]
    by = {r["decade"]: r for r in rows}
    assert by[1]["best"]["method"] == "dm"  # dm 60 s beats dc 40 s
    assert by[2]["best"]["method"] == "dm" and by[2]["best"]["compute"] == 600
    assert by[3]["best"]["method"] == "lad" and by[3]["best"]["compute"] == 7000


# ---- the report ----------------------------------------------------------------------------------------------------

def test_report_charges_the_store_and_renders_with_missing_cells(tmp_path):
    grid = _grid(tmp_path)
    t = grid.table
    t.save(grid.store_cell("traj-xs"), {"expert_seconds": {"representation": 300.0, "classifier": 120.0},
                                        "seconds": 420.0, "threads": 1})
    points = {p.name: p for p in grid.points}
    recorded = {"random": _result(0.27, 0.01, distill=0.5), "dm-i150": _result(0.38, distill=70.0),
                "dm-i1500": _result(0.41, distill=650.0), "lad-xs": _result(0.36, distill=40.0, threads=2),
                "mtt-xs": _result(0.30, distill=25.0), "lad-m": _result(0.40, distill=1000.0)}
    for name, res in recorded.items():
        t.save(grid.point_cell(points[name]), res)
    results, stores, _ = grid.collect()
    lad = point_compute(grid, "lad-xs", results["lad-xs"], stores)
    assert lad["distill"] == 80.0 and lad["store"] == 420.0 and lad["compute"] == 500.0  # 2 threads x 40 s
    assert lad["compute_amortised"] == pytest.approx(80.0 + 300.0 / 3 + 120.0)  # 3 points read the representation
    mtt = point_compute(grid, "mtt-xs", results["mtt-xs"], stores)
    assert mtt["store"] == 300.0 and mtt["compute"] == 325.0  # MTT reads no classifier experts
    assert point_compute(grid, "lad-m", results["lad-m"], stores)["compute"] is None  # store traj-s not recorded
    stem = write_report(grid)
    md = stem.with_suffix(".md").read_text()
    assert "(to do)" in md and "not enough points yet (LAD 1/5, DM 2/4" in md and "charged in full" in md
    assert "| lad | lad-xs |" in md and "| 500 |" in md
    assert stem.with_suffix(".png").stat().st_size > 0
    # coverage: DM's two points (70, 650 s: 9.3x) and LAD's one (lad-m has no compute: its store is not recorded)
    assert "- dm: 2 of 4 points, 70-650 single-core s (9.3x), largest 0.18 h; aim (at least 3 points over at least " \
           "10x): not met (lacks 3 points, a 10x span)" in md
    assert "- lad: 1 of 5 points, 500-500 single-core s (1.0x)" in md and "the largest at least 1.5 h): not met" in md
    payload = json.loads(stem.with_suffix(".json").read_text())
    row = next(r for r in payload["points"] if r["name"] == "lad-xs")
    assert row["compute"] == 500.0 and payload["reading"]["lad_vs_dm"]["status"] == "few"


# ---- a tiny table on digits ----------------------------------------------------------------------------------------

TINY = {
    "protocol": "cpu", "data": ["data.imbalance_factor=10"], "common": ["distill.ipc=1", "distill.eval_every=0"],
    "stores": {"t": {"preset": "lad", "set": ["experts.num_experts=1", "experts.train.epochs=2",
                                              "experts.classifier_train.epochs=2", "experts.model.args.width=8"]},
               "r": {"preset": "rldd", "set": ["experts.train.epochs=1", "experts.model.args.width=8"]}},
    "methods": {
        "random": {"preset": "random", "points": [{"name": "random"}]},
        "dm": {"preset": "dm", "set": ["distill.options.model.args.width=8", "distill.options.batch_real=8"],
               "points": [{"name": "dm-a", "set": ["distill.iterations=2"]}]},
        "mtt": {"preset": "mtt", "points": [{"name": "mtt-a", "store": "t", "set": [
            "distill.iterations=2", "distill.phases.0.max_start_epoch=1", "distill.phases.0.syn_steps=2"]}]},
        "lad": {"preset": "lad-cifar10-if100-ipc10", "points": [{"name": "lad-a", "store": "t", "set": [
            "distill.iterations=2", "distill.phases.0.max_start_epoch=1", "distill.phases.0.syn_steps=2",
            "distill.phases.1.syn_steps=2"]}]},
        "rldd": {"preset": "rldd", "set": ["distill.options.score_batch=64", "distill.options.stats_batch=64"],
                 "points": [{"name": "rldd-a", "store": "r", "set": ["distill.iterations=2"]}]},
    },
}
DIGITS = ("data.dataset=digits", "data.zca=false", "data.root=null", "protocol_overrides.train.epochs=5")


@pytest.mark.slow
def test_tiny_grid_on_digits_records_measured_seconds_and_charges_its_store(tmp_path, one_thread):
    raw = dict(TINY, cost_model=load_yaml(GRID_FILE)["cost_model"])
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    grid = _grid(tmp_path, grid_file=str(path), extra_set=DIGITS, runs=1)
    from ltdd.data import prepare_data
    from ltdd.distill import distill

    dm = next(p for p in grid.points if p.name == "dm-a")  # killed after 1 of its 2 iterations: the run resumes it
    cfg = grid.point_config(dm)
    distill(cfg, prepare_data(cfg.data), grid.table.artifact(grid.point_cell(dm)), evaluate=False, progress=False,
            stop_after=1)
    grid.run()
    results, stores, stale = grid.collect()
    assert set(results) == {"random", "dm-a", "mtt-a", "lad-a", "rldd-a"} and not stale
    rec = stores["t"]
    assert set(rec["expert_seconds"]) == {"representation", "classifier"} and rec["threads"] == 1
    assert all(v >= 0 for v in rec["expert_seconds"].values())  # the store's log rounds to 0.1 s: tiny experts may read 0
    for name, res in results.items():
        assert res["distill_seconds"] is not None and res["eval_seconds"] > 0 and res["threads"] == 1
        assert math.isclose(res["seconds"], res["distill_seconds"] + res["eval_seconds"])
    assert set(stores["r"]["expert_seconds"]) == {"observer", "teacher"}
    rldd = point_compute(grid, "rldd-a", results["rldd-a"], stores)
    assert rldd["store"] == pytest.approx(sum(stores["r"]["expert_seconds"].values()))
    r = results["dm-a"]
    assert r["resumed_from"] == 1 and r["distill_seconds_full"] == pytest.approx(2 * r["distill_seconds"])
    assert point_compute(grid, "dm-a", r, stores)["compute"] == pytest.approx(2 * r["distill_seconds"])
    lad = point_compute(grid, "lad-a", results["lad-a"], stores)
    mtt = point_compute(grid, "mtt-a", results["mtt-a"], stores)
    assert lad["store"] == pytest.approx(sum(rec["expert_seconds"].values()))
    assert mtt["store"] == pytest.approx(rec["expert_seconds"]["representation"])
    assert lad["compute"] == pytest.approx(results["lad-a"]["distill_seconds"] + lad["store"])
    lad_point = next(p for p in grid.points if p.name == "lad-a")
    assert json.loads((grid.table.artifact(grid.point_cell(lad_point)) / "timing.json").read_text())[
        "resumed_from"] == 0
    stem = write_report(grid)
    md = stem.with_suffix(".md").read_text()
    assert "| lad | lad-a |" in md and "(to do)" not in md


def _tiny_grid(tmp_path, **kw) -> ComputeGrid:
    raw = dict(TINY, cost_model=load_yaml(GRID_FILE)["cost_model"])
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return _grid(tmp_path, grid_file=str(path), extra_set=DIGITS, runs=1, **kw)


def test_points_option_computes_only_the_named_points_in_its_order(tmp_path, one_thread):
    grid = _tiny_grid(tmp_path, only=("random", "dm-a", "random"))
    assert [p.name for p in grid.selected()] == ["random", "dm-a"]  # given order, a repeat once
    grid.opts.only = ("random",)
    grid.run()
    results, stores, _ = grid.collect()
    assert set(results) == {"random"} and not stores  # nothing else computed, no store trained
    assert not any(grid.store_dir("t").glob("*.safetensors"))
    grid.opts.only = ("random", "lad-z")
    with pytest.raises(LtddError, match=r"--points: no point 'lad-z'.*known: dm-a, lad-a, mtt-a, random, rldd-a\)"):
        grid.run()


@pytest.mark.parametrize("argv, word", [
    (["--points", "mtt-l", "--plan"], "does not go with --plan"),
    (["--points", " , "], "at least one point name"),
    (["--points", "dm-i150", "--ifs", "10"], "--ifs: not an option of the accuracy-vs-compute table"),
])
def test_points_option_errors_are_one_line(tmp_path, argv, word):
    r = CliRunner().invoke(reproduce_cmd, ["accuracy-vs-compute", "--work", str(tmp_path / "w"),
                                           "--results", str(tmp_path / "r"), *argv])
    assert r.exit_code != 0 and word in str(r.exception), r.output


def test_points_option_is_refused_by_the_other_tables(tmp_path):
    r = CliRunner().invoke(reproduce_cmd, ["fair-cifar10lt", "--points", "x", "--plan"])
    assert r.exit_code != 0 and "--points: not an option of the fair-cifar10lt table" in str(r.exception)


def test_phases_misfit_by_hand():
    """A phase starting below W and matching M epochs ahead reads epoch W - 1 + M: W 20, M 2 reads epoch 21."""
    from ltdd.config import load_preset
    from ltdd.experiments.grid_files import phases_misfit
    from ltdd.typed import apply_overrides

    cfg = apply_overrides(load_preset("lad"), ["distill.phases.0.max_start_epoch=20", "distill.phases.0.expert_epochs=2",
                                               "distill.phases.1.max_start_epoch=1", "distill.phases.1.expert_epochs=2",
                                               "experts.train.epochs=21", "experts.classifier_train.epochs=2"])
    assert phases_misfit(cfg.distill, cfg.experts) is None
    short = apply_overrides(cfg, ["experts.train.epochs=20"])
    assert phases_misfit(short.distill, short.experts) == (
        f"phase '{cfg.distill.phases[0].name}' reads up to epoch 21, but the store trains 20 representation epochs")
    short = apply_overrides(cfg, ["experts.classifier_train.epochs=1"])
    assert "reads up to epoch 2, but the store trains 1 classifier epochs" in phases_misfit(short.distill, short.experts)
    none = apply_overrides(cfg, ["experts.classifier_experts=false"])
    assert "reads classifier experts, but the store has none" in phases_misfit(none.distill, none.experts)
    dm = load_preset("dm")
    assert phases_misfit(dm.distill, cfg.experts) is None  # not trajectory matching: nothing to fit


def test_coverage_by_hand():
    from ltdd.experiments.compute_reading import coverage, coverage_line

    pts = _pts((100, 0.3), (500, 0.32), (6000, 0.35))  # 60x, largest 1.67 h
    c = coverage("lad", pts, 4, trajectory=True)
    assert (c["done"], c["lo"], c["hi"], c["span"], c["met"]) == (3, 100, 6000, 60.0, True)
    assert coverage_line(c) == ("lad: 3 of 4 points, 100-6000 single-core s (60.0x), largest 1.67 h; aim (at least 3 "
                                "points over at least 10x, the largest at least 1.5 h): met")
    short = coverage("lad", pts[:2] + _pts((900, 0.33)), 4, trajectory=True)  # 9x, largest 900 s
    assert short["missing"] == ["a 10x span", "a point of 1.5 h"]
    assert coverage("dm", pts[:2] + _pts((900, 0.33)), 3, trajectory=False)["missing"] == ["a 10x span"]
    assert coverage("dm", pts[:1] + _pts((5000, 0.4)), 3, trajectory=False)["missing"] == ["3 points"]
    assert coverage("dc", [], 3, trajectory=False)["missing"] == ["3 points", "a 10x span"]
    assert "dc: 0 of 3 points; aim" in coverage_line(coverage("dc", [], 3, trajectory=False))
