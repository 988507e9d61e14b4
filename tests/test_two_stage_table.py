"""The two-stage table (``ltdd reproduce two-stage``): the paper-real profile and its budget, the fixed split beside
the computed one, what of each row is at the paper's scale, and that every changed setting makes exactly the cells
it reaches stale. Nothing heavy runs: plans need no data, one tiny table runs on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ltdd.config import DataConfig
from ltdd.errors import LtddError
from ltdd.experiments.command import main, reproduce_cmd
from ltdd.experiments.two_stage_table import (
    BUDGET_S,
    GM_ITERATION_S,
    MTT_ITERATION_S,
    ROWS,
    TWO_STAGE_ORDER,
    TwoStageGrid,
    TwoStageOptions,
    estimate_seconds,
    is_control,
)

FIXED = [f"{r}-fixed" for r in TWO_STAGE_ORDER]
PAPER_NETS = "paper scale (width 128, 300 epochs, raw [0, 1] pixels)"
VEHICLES = [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]]


def _dirs(tmp_path) -> list[str]:
    return ["--work", str(tmp_path / "w"), "--results", str(tmp_path / "res")]


def _run(*args: str) -> str:
    res = CliRunner().invoke(reproduce_cmd, [str(a) for a in args])
    assert res.exit_code == 0 and res.exception is None, (res.output, res.exception)
    return res.output


def _states(out: str) -> dict:
    return {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.split() and "preset" in ln}


def test_paper_real_profile_is_the_papers_scale_with_reduced_distillation(tmp_path):
    grid = TwoStageGrid(TwoStageOptions(profile="paper-real", work=str(tmp_path / "w"), results=str(tmp_path / "r")))
    o, st = grid.opts, grid.settings
    assert (st["width"], st["real_epochs"], st["syn_epochs"]) == (128, 300, 300)
    assert o.runs == 1 and grid.seeds == [0] and o.raw_pixels and not grid.dcfg.normalize and not grid.dcfg.zca
    assert grid.model_cfg.args == {"width": 128} and grid.table.name == "two-stage-paper-real"
    t = grid.train_cfg
    assert (t.lr, t.momentum, t.weight_decay, t.batch_size, t.schedule, t.dsa) == (0.01, 0.9, 5e-4, 256, "constant",
                                                                                   False)
    # GM: the dc preset at the paper's settings but for the iterations
    gm = grid.dc_cfg.distill
    assert (gm.iterations, gm.image_init, gm.lr_img, gm.momentum_img) == (74, "noise", 0.1, 0.5)
    assert {k: gm.options[k] for k in ("outer_loop", "inner_loop", "batch_real", "lr_net")} == \
        {"outer_loop": 10, "inner_loop": 50, "batch_real": 256, "lr_net": 0.01}
    assert grid.scale_parts()["gm"] == "GM set: reduced (iterations 74 instead of 1000)"
    # MTT: the preset's per-iteration settings, five experts trained just as far as distillation reads them
    ex, mtt = grid.mtt_cfg.experts, grid.mtt_cfg.distill
    ph = mtt.phases[0]
    assert (ex.num_experts, ex.train.epochs, mtt.iterations, mtt.lr_lr) == (5, 21, 50, 1e-7)
    assert mtt.eval_every == 0 == gm.eval_every  # no evaluation network inside the budgeted distillation
    assert (ph.syn_steps, ph.expert_epochs, ph.max_start_epoch) == (30, 2, 20)
    assert ex.train.epochs == ph.max_start_epoch - 1 + ph.expert_epochs
    assert grid.fixed_groups == VEHICLES
    scale = grid.row_scale("original+gm")
    assert f"real nets: {PAPER_NETS}" in scale and f"nets on distilled images: {PAPER_NETS}" in scale
    assert "GM set: reduced (iterations 74 instead of 1000)" in scale and "MTT" not in scale
    assert grid.row_scale("original+original") == f"real nets: {PAPER_NETS}"
    # the cpu profile says what it reduces; options and runs
    cpu = TwoStageGrid(TwoStageOptions(work=str(tmp_path / "w"), results=str(tmp_path / "r")))
    assert cpu.row_scale("original_flat") == ("real nets: reduced (width 32 instead of 128, 20 epochs instead of 300, "
                                              "per-channel standardised pixels instead of raw [0, 1])")
    assert cpu.opts.runs == 3 and cpu.fixed_groups is None
    assert TwoStageOptions(profile="paper-real", runs=3).runs == 3 and TwoStageOptions(profile="gpu").runs == 5
    assert not TwoStageOptions(profile="paper-real", raw_pixels=False).raw_pixels
    assert TwoStageOptions(profile="paper-real", groups="none").groups == "none"
    with pytest.raises(LtddError, match="paper-real"):
        TwoStageOptions(profile="paper")


def test_paper_real_fits_its_budget_with_equal_distillation_shares(tmp_path):
    grid = TwoStageGrid(TwoStageOptions(profile="paper-real", work=str(tmp_path / "w"), results=str(tmp_path / "r")))
    est = estimate_seconds(grid)
    total = sum(est.values())
    paper_rows = sum(v for k, v in est.items() if not is_control(k))
    # MTT runs 50 of the 539 iterations its share buys (its step size collapses; see PAPER_REAL_MTT_ITERATIONS)
    unused = (539 - 50) * 17.6
    assert 0.99 * BUDGET_S < paper_rows + unused <= BUDGET_S
    # the random-real controls come on top: the same networks as GM's rows, on another 100 images
    for ctl, same in (("random_flat", "gm_flat"), ("original+random", "original+gm"), ("random+random", "gm+gm")):
        assert est[ctl] == pytest.approx(est[same])
        if ctl != "random_flat":
            assert est[f"{ctl}-fixed"] == pytest.approx(est[f"{same}-fixed"])
    assert est["random_flat"] == pytest.approx(300 * 5.3 * 100 / 2478 + 11.5)
    # known answers from the measured unit costs (5.3 s per real epoch, 11.5 s per test pass)
    assert est["original_flat"] == pytest.approx(300 * 5.3 + 11.5)
    # Original + Original trains the real group classifier and the two real intra-group classifiers
    assert est["original+original"] == est["original+original-fixed"] == pytest.approx(2 * 300 * 5.3 + 3 * 11.5)
    assert est["original+gm"] == est["original+mtt"] == pytest.approx(300 * 5.3 * 100 / 2478 + 2 * 11.5)
    assert est["gm+gm"] == pytest.approx(300 * 5.3 * 100 / 2478 + 11.5)  # only its GM group classifier is new
    assert est["distill-gm"] == pytest.approx(74 * 135.0) and est["distill-mtt"] == pytest.approx(50 * 17.6)
    assert est["experts-mtt"] == pytest.approx(5 * (21 * 4.8 + 11.5))
    # the distillers' shares of what the networks leave are equal: neither could take one more iteration
    share = (BUDGET_S - sum(v for k, v in est.items()
                            if k not in ("distill-gm", "distill-mtt", "experts-mtt") and not is_control(k))) / 2
    gm, mtt = est["distill-gm"], est["experts-mtt"] + 539 * 17.6
    assert gm <= share < gm + GM_ITERATION_S and mtt <= share < mtt + MTT_ITERATION_S
    assert "total 5.59 core-hours = about 2.8 h on 2 cores" in grid.estimate_lines()[0]
    assert "the random-real control rows add 401 s" in grid.estimate_lines()[0]
    # once the grouping is known to equal the fixed split, the fixed rows train nothing new (their networks exist),
    # and the total drops by exactly what they were charged
    grid.table.save(grid.grouping_cell, {"groups": VEHICLES})
    after = estimate_seconds(grid)
    assert all(after[f"{r}-fixed"] == 0 for r in TWO_STAGE_ORDER)
    assert sum(after.values()) == pytest.approx(total - sum(est[f] for f in FIXED))
    grid.table.save(grid.grouping_cell, {"groups": [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]]})  # another split
    assert estimate_seconds(grid) == est
    # three runs per row would not fit: the networks and the same distillation exceed the budget
    assert sum(estimate_seconds(TwoStageGrid(TwoStageOptions(profile="paper-real", runs=3))).values()) > BUDGET_S


def test_paper_real_plan_needs_no_data_and_shows_each_rows_scale(tmp_path):
    out = _run("two-stage", "--profile", "paper-real", "--plan", *_dirs(tmp_path), "--root",
               tmp_path / "missing.tar.gz")
    lines = {ln.split()[0]: ln for ln in out.splitlines() if "preset" in ln}
    # the run's order: the real-image rows first, then the random-real controls, then the GM set and its rows,
    # then the MTT set and its rows
    assert list(lines) == ["data", "grouping", "original_flat", "original+original", "original+original-fixed",
                           "random_flat", "original+random", "random+random", "original+random-fixed",
                           "random+random-fixed", "distill-gm", "gm_flat", "original+gm", "gm+gm",
                           "original+gm-fixed", "gm+gm-fixed",
                           "experts-mtt", "distill-mtt", "mtt_flat", "original+mtt", "original+mtt-fixed",
                           "grouping-stability"]
    assert "22 cells: 0 done, 0 running, 0 partial, 22 to do" in out and "total 5.59 core-hours" in out
    assert "1 seed;" in lines["original+gm"] and PAPER_NETS in lines["original+gm"]
    assert "GM set: reduced (iterations 74 instead of 1000)" in lines["original+gm"]
    assert "fixed split {airplane, automobile, ship, truck} vs {bird, cat, deer, dog, frog, horse}" in \
        lines["original+gm-fixed"]
    assert "iterations 50 instead of 10000" in lines["distill-mtt"] and "[est. 1,602 s]" in lines["original_flat"]
    assert "§" not in out and ".md" not in out
    assert "2 seeds;" in _run("two-stage", "--profile", "paper-real", "--runs", "2", "--plan", *_dirs(tmp_path))
    out = _run("two-stage", "--profile", "paper-real", "--groups", "none", "--plan", *_dirs(tmp_path))
    assert "16 cells" in out and "-fixed" not in out
    out = _run("two-stage", "--groups", "airplane,automobile,ship,truck;2,3,4,5,6,7", "--plan", *_dirs(tmp_path))
    assert "22 cells" in out and "core-hours" not in out  # a fixed split on the cpu profile too; no estimate


@pytest.mark.parametrize("args,word", [
    (["lad-cifar10lt", "--profile", "paper-real"], "paper-real"),
    (["fair-cifar10lt", "--profile", "paper-real"], "paper-real"),
    (["two-stage", "--groups", "0,1;2,3;4,5,6,7,8,9"], "two groups"),
    (["two-stage", "--groups", "0,1,plane;2,3,4,5,6,7,8,9"], "'plane'"),
    (["two-stage", "--groups", "0,1;2,3,4,5,6,7,8"], "[9] are in no group"),
    (["two-stage", "--profile", "paper-real", "--runs", "0"], "--runs"),
    (["two-stage", "--profile", "paper-real", "--gm-iterations", "-1"], "--gm-iterations"),
])
def test_bad_input_is_one_clear_line(args, word, tmp_path, capsys):
    rc = main(args + ["--plan", *_dirs(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().count("\n") == 0 and word in err and err.startswith("ltdd: error: "), err
    assert "§" not in err


STATIC = {"data", "distill-gm", "experts-mtt", "distill-mtt"}
COMPUTED = set(ROWS)
CONTROLS = {"random_flat", "original+random", "random+random", "original+random-fixed", "random+random-fixed"}


@pytest.mark.parametrize("extra,stale", [
    (["--width", "64"], {"grouping", "grouping-stability", *COMPUTED, *FIXED}),
    (["--real-epochs", "100"], {"grouping", "grouping-stability", *COMPUTED, "original+gm-fixed",
                                "original+mtt-fixed", "original+original-fixed", "original+random-fixed"}),
    (["--syn-epochs", "100"], {"grouping-stability", "gm_flat", "mtt_flat", "original+gm", "original+mtt", "gm+gm",
                               "original+gm-fixed", "original+mtt-fixed", "gm+gm-fixed", *CONTROLS}),
    (["--gm-iterations", "4"], {"distill-gm", "grouping-stability", "gm_flat", "original+gm", "gm+gm",
                                "original+gm-fixed", "gm+gm-fixed"}),
    (["--mtt-iterations", "20"], {"distill-mtt", "grouping-stability", "mtt_flat", "original+mtt",
                                  "original+mtt-fixed"}),
    (["--mtt-experts", "2"], {"experts-mtt", "distill-mtt", "grouping-stability", "mtt_flat", "original+mtt",
                              "original+mtt-fixed"}),
    (["--M", "3"], {"grouping", "grouping-stability", *COMPUTED}),  # the fixed split does not come from the grouping
    (["--standardised-pixels"], {*STATIC, "grouping", "grouping-stability", *COMPUTED, *FIXED}),
    (["--groups", "0,1,2,8,9;3,4,5,6,7"], set(FIXED)),
    (["--runs", "2"], {"grouping-stability", *COMPUTED, *FIXED}),
])
def test_a_changed_setting_makes_exactly_the_cells_it_reaches_stale(extra, stale, tmp_path):
    """Every cell of a paper-real table recorded as done; one setting changed: the cells it reaches are stale (and
    would be recomputed, never shown under the new labels), the others stay done."""
    grid = TwoStageGrid(TwoStageOptions(profile="paper-real", work=str(tmp_path / "w"), results=str(tmp_path / "res")))
    for c, *_ in grid.cells():
        grid.table.save(c, {"summary": {}} if c.name in ROWS or c.name in FIXED else {})
    base = ["two-stage", "--profile", "paper-real", "--plan", *_dirs(tmp_path)]
    assert set(_states(_run(*base)).values()) == {"done"}
    st = _states(_run(*base, *extra))
    assert {c for c, s in st.items() if s == "stale"} == stale
    assert {c for c, s in st.items() if s != "stale"} == set(st) - stale and set(st.values()) <= {"done", "stale"}
    if "--groups" in extra:  # the record of a fixed row names the split it was computed under
        rec = json.loads((tmp_path / "res" / "cells" / "two-stage-paper-real" / "gm+gm-fixed.json").read_text())
        assert rec["key"]["groups"] == VEHICLES


@pytest.mark.slow
def test_tiny_table_with_a_fixed_split_and_its_reports(tmp_path, one_thread, capsys):
    """A tiny table on digits with a fixed split: both splits' rows, cells keyed by the split (another split
    recomputes only its rows and networks), the report's sections; then the same records rendered as a paper-real
    report."""
    data = DataConfig(dataset="digits", imbalance_factor=10, zca=False, probe_per_class=5)
    work, res = str(tmp_path / "w"), str(tmp_path / "res")

    def grid(groups):
        o = TwoStageOptions(work=work, results=res, runs=1, width=4, real_epochs=1, syn_epochs=1, gm_iterations=1,
                            mtt_iterations=1, mtt_experts=1, expert_epochs=11, groups=groups)
        return TwoStageGrid(o, data_config=data)

    g = grid("0,1,2,3,4;5,6,7,8,9")
    capsys.readouterr()
    stem = g.run()
    # cells are computed in the plan's order: real-image rows, then the GM set and its rows, then MTT's
    ran = [ln.split("] ", 1)[1].rsplit(": running", 1)[0] for ln in capsys.readouterr().out.splitlines()
           if ln.endswith(": running")]
    order = [c.name for c, *_ in g.cells()]
    assert {"original+original", "distill-mtt", "original+mtt-fixed", "distill-gm", "gm+gm-fixed"} <= set(ran)
    assert ran == sorted(ran, key=order.index)
    P = json.loads(stem.with_suffix(".json").read_text())
    assert P["complete"] and set(P["rows_fixed"]) == set(TWO_STAGE_ORDER)
    F = P["fixed_split"]
    assert F["groups"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and F["rank"] >= 1 and F["of"] == 511
    from ltdd.grouping import cut_value

    assert F["cut"] == pytest.approx(cut_value(P["grouping"]["distance_matrix"], F["groups"]))
    assert F["cut"] <= P["grouping"]["cut"]
    assert g.table.record("original+gm-fixed")["key"]["groups"] == F["groups"]
    assert g.table.record("original+gm-fixed")["result"]["groups"] == F["groups"]
    assert "--groups '0,1,2,3,4;5,6,7,8,9'" in P["command"] and "estimate" not in P
    # the random-real control: IPC distinct real training images of each class (the distilled sets' size)
    from ltdd.data import prepare_data

    ipc = g.dc_cfg.distill.ipc
    d = prepare_data(data)
    for row in ("random_flat", "original+random", "random+random", "original+random-fixed"):
        rs = g.table.record(row)["result"]["random_subset"]
        idx = torch.tensor(rs["train_indices"])
        assert len(set(rs["train_indices"])) == len(idx) == 10 * ipc and rs["ipc"] == ipc
        assert torch.equal(torch.bincount(d.train_y[idx], minlength=10), torch.full((10,), ipc))
    assert P["rows"]["random_flat"]["summary"]["train_images"]["mean"] == 10 * ipc
    assert P["rows"]["original+random"]["summary"]["train_images"]["mean"] == len(d.train_y) + 10 * ipc
    md = stem.with_suffix(".md").read_text()
    assert "## Two-stage rows under the computed and the fixed split" in md
    assert f"objective {F['cut']:.1f} (rank {F['rank']} of 511" in md and "| fixed (--groups) |" in md
    assert f"objective {P['grouping']['cut']:.1f} (rank 1)" in md
    assert "## Scale of each row" in md and "| Original + GM | real nets: reduced (width 4 instead of 128" in md
    assert "§" not in md and "two-stage.md" not in md
    assert "| 1 | Random real (flat) (control) | 100 / – |" in md and "Against the random-real control" in md
    # one run: the reading gives no standard error (a 0.0 would read as no spread)
    reading = md.split("## Reading")[1]
    assert "pp, one run" in reading and "± 0.0 pp" not in reading and "with one run every ±" in md
    # another fixed split: only its rows (and networks) are computed again
    capsys.readouterr()
    grid("0,2,4,6,8;1,3,5,7,9").run()
    log = capsys.readouterr().out
    for r in TWO_STAGE_ORDER:
        assert f"{r}: done before, reusing" in log and f"{r}-fixed: stale (recorded under key" in log
    assert "net group-real-02468-13579" in log and "net group-real-01234" not in log
    # the same records under a paper-real grid's keys: its report (labels and scale come from the paper-real grid)
    raw = DataConfig(dataset="digits", imbalance_factor=10, zca=False, normalize=False, probe_per_class=5)
    pr = TwoStageGrid(TwoStageOptions(profile="paper-real", work=str(tmp_path / "pw"), results=res,
                                      groups="0,1,2,3,4;5,6,7,8,9"), data_config=raw)
    for c, *_ in pr.cells():
        rec = g.table.record(c.name)
        if rec is not None:
            pr.table.save(c, rec["result"])
    md = pr.write_report().with_suffix(".md").read_text()
    assert "`paper-real` profile" in md and "total 5.59 core-hours" in md
    assert f"| Original (flat) | real nets: {PAPER_NETS} |" in md
    assert "GM set: reduced (iterations 74 instead of 1000)" in md and "**budget**" in md
    assert "Scale caveat: every network is at the paper's scale" in md
    assert "--groups '0,1,2,3,4;5,6,7,8,9'" in md and "--runs" not in md.split("Command:")[1].split("\n")[0]
    assert Path(res, "two-stage-paper-real.json").is_file()
