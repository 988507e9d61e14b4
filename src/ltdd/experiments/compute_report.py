"""The accuracy-vs-compute report from the finished cells: each point's measured compute, markdown, JSON and plot.

A point's compute is its distillation seconds plus the training seconds of the experts of its store that it reads
(all representation experts; the classifier experts too when it reads them; RLDD's observer and teacher), charged
in full to every point that reads them. The amortised figure divides each kind of expert's seconds among the
grid's points that read it. Seconds are single-core seconds: measured wall seconds x the torch threads of the
process that measured them (exact for the intended one-thread processes, an upper bound with more threads).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..config import atomic_write_text, save_json
from .compute_cost import kinds_read
from .compute_reading import best_per_decade, coverage, coverage_line, crossing, crossing_text, curve, decade_lines
from .compute_table import TABLE, ComputeGrid
from .machine import cpu_model

__all__ = ["RULE", "point_compute", "points_table", "reading", "write_report", "command_line"]

RULE = ("A point's compute = its distillation + the training of every expert it reads from its store (all "
        "representation experts; the classifier experts too when it reads them; RLDD's observer and teacher), charged "
        "in full to every point that reads them, in single-core seconds (measured seconds x torch threads). The "
        "amortised figure divides each kind of expert's training among the grid's points that read it. Evaluation "
        "(the same protocol for every point) is not part of compute; random's set costs only its evaluation.")


def point_compute(grid: ComputeGrid, name: str, res: dict, stores: dict) -> dict:
    """Measured single-core seconds of a finished point: distill, store (charged in full), store_amortised,
    compute, compute_amortised, eval; compute is None while the distillation or the store is not timed."""
    p = next(q for q in grid.points if q.name == name)
    d = res.get("distill_seconds_full", res.get("distill_seconds"))
    distill = None if d is None else float(d) * int(res.get("distill_threads") or res.get("threads") or 1)
    ev = float(res.get("eval_seconds") or 0.0) * int(res.get("threads") or 1)
    store = amortised = 0.0
    if p.store:
        rec = stores.get(p.store)
        if rec is None:
            store = amortised = None
        else:
            parts = rec.get("expert_seconds") or {}
            threads = int(rec.get("threads") or 1)
            users = grid.users(p.store)
            for k in kinds_read(grid.point_config(p)):
                s = float(parts.get(k, 0.0)) * threads
                store += s
                amortised += s / max(1, len(users.get(k, [])))
            if not parts:  # a store recorded without its training log: its seconds in full
                store = amortised = float(rec.get("seconds", 0.0)) * threads
    ok = distill is not None and store is not None
    return {"distill": distill, "store": store, "store_amortised": amortised, "eval": ev,
            "compute": distill + store if ok else None, "compute_amortised": distill + amortised if ok else None}


def points_table(grid: ComputeGrid, results: dict, stores: dict) -> list[dict]:
    """One row per planned point: method, knobs, estimate, state, measured compute and accuracy (mean, std)."""
    rows = []
    for p in grid.points:
        res = results.get(p.name)
        row = {"name": p.name, "method": p.method, "preset": p.preset, "store": p.store, "knobs": grid.knobs(p),
               "estimate": grid.estimate(p), "done": res is not None}
        if res is not None:
            acc = res["summary"]["accuracy"]
            row.update({"measured": point_compute(grid, p.name, res, stores), "mean": acc["mean"],
                        "std": acc.get("std", 0.0), "class_std": res["summary"].get("class_std", {}).get("mean"),
                        "threads": res.get("threads")})
            row["compute"] = row["measured"]["compute"]
        rows.append(row)
    return rows


def reading(grid: ComputeGrid, rows: list[dict]) -> dict:
    """The best method per budget decade and LAD against DM (when the grid has both)."""
    curves: dict[str, list[dict]] = {}
    for r in rows:
        if r["done"] and r["method"] != "random":
            curves.setdefault(r["method"], []).append(r)
    random = next((r for r in rows if r["method"] == "random" and r["done"]), None)
    decades = best_per_decade(curves)
    out = {"decades": [{"decade": d["decade"], "best": d["best"]["name"], "best_method": d["best"]["method"],
                        "within": d["within"]["name"]} for d in decades],
           "decade_lines": decade_lines(decades, random)}
    methods = {r["method"] for r in rows}
    out["coverage"] = []
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "random"):
        mine = [r for r in rows if r["method"] == m]
        trajectory = any(r["store"] and grid.store_config(r["store"]).experts.kind == "trajectory" for r in mine)
        out["coverage"].append(coverage(m, curves.get(m, []), len(mine), trajectory=trajectory))
    if {"lad", "dm"} <= methods:
        planned = tuple(sum(r["method"] == m for r in rows) for m in ("lad", "dm"))
        done = tuple(len(curve(curves.get(m, []))) for m in ("lad", "dm"))
        res = crossing(curves.get("lad", []), curves.get("dm", []))
        out["lad_vs_dm"] = {k: v for k, v in res.items() if k != "gaps"}
        out["lad_vs_dm_text"] = crossing_text("LAD", "DM", res, done, planned)
    return out


def command_line(grid: ComputeGrid) -> str:
    o = grid.opts
    return f"ltdd reproduce {TABLE} --profile {o.profile}" + (f" --runs {o.runs}" if int(o.runs) != 3 else "")


def _s(v) -> str:
    return "–" if v is None else f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _markdown(grid: ComputeGrid, rows: list[dict], stores: dict, read: dict, stale: list[str], png: str) -> str:
    o = grid.opts
    threads = sorted({r["threads"] for r in rows if r.get("threads")})
    tot = grid.total_estimate()
    done = sum(r["done"] for r in rows)
    lines = ["# Accuracy vs compute (CIFAR-10-LT IF 100, IPC 10)", "", *([grid.description, ""] if grid.description else []),
             f"Command: `{command_line(grid)}`  ",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; torch threads of the "
             f"processes that computed the points: {', '.join(map(str, threads)) or 'none yet'}; report written "
             f"{time.strftime('%Y-%m-%d')}.  ",
             f"Evaluation: protocol `{grid.protocol}`, runs: {o.runs}, the same for every point.  ",
             f"Points done: {done} of {len(rows)}"
             + (f"; left out (recorded under another key): {', '.join(stale)}" if stale else "") + ".", "",
             f"**Charging rule.** {RULE}", "",
             "## Points", "",
             "Seconds are single-core seconds. *est.*: the plan's estimate from the cost model; *distill*, *store*, "
             "*compute*, *amortised*: measured. Accuracy: mean ± std over the evaluation runs (%).", "",
             "| method | point | scale | est. compute | distill | store (charged) | compute | amortised | eval | "
             "accuracy |", "| --- " * 10 + "|"]
    for r in rows:
        m = r.get("measured") or {}
        acc = f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}" if r["done"] else "(to do)"
        lines.append(f"| {r['method']} | {r['name']} | {r['knobs']} | {_s(r['estimate']['compute'])} | "
                     f"{_s(m.get('distill'))} | {_s(m.get('store'))} | {_s(m.get('compute'))} | "
                     f"{_s(m.get('compute_amortised'))} | {_s(m.get('eval'))} | {acc} |")
    lines += ["", "## Expert stores", "",
              "| store | experts | est. s | measured s (per kind) | read by |", "| --- " * 5 + "|"]
    for s in grid.used_stores():
        rec = stores.get(s)
        parts = ", ".join(f"{k} {_s(v * int(rec.get('threads') or 1))}" for k, v in
                          (rec.get("expert_seconds") or {}).items()) if rec else "(to do)"
        users = "; ".join(f"{k}: {', '.join(v)}" for k, v in grid.users(s).items())
        e = grid.store_config(s).experts
        what = (f"observer + teacher x {e.train.epochs} ep" if e.kind == "debiased" else
                f"{e.num_experts} x {e.train.epochs} ep" + (f" + cls x {e.classifier_train.epochs}"
                                                           if e.classifier_experts else ""))
        lines.append(f"| {s} | {what}, width {(e.model.args or {}).get('width', 128)} | "
                     f"{_s(sum(grid.store_estimate(s).values()))} | {parts} | {users} |")
    lines += ["", f"![accuracy vs single-core seconds]({png})", "", "## Reading", ""]
    lines += [f"- {ln}" for ln in read["decade_lines"]] or ["- not enough points yet (no finished point)"]
    if "lad_vs_dm_text" in read:
        lines.append(f"- LAD vs DM: {read['lad_vs_dm_text']}.")
    if read.get("coverage"):
        lines += ["", "Coverage of the budget axis (finished points, measured compute with the experts charged in "
                      "full):", ""]
        lines += [f"- {coverage_line(c)}" for c in read["coverage"]]
    lines += ["", "## Plan-time estimate", "",
              f"Stores {tot['stores'] / 3600:.2f} h + distillations {tot['distill'] / 3600:.2f} h + evaluations "
              f"{tot['eval'] / 3600:.2f} h = **{tot['total'] / 3600:.2f} single-core hours** to fill the table "
              f"(cost model: `cost_model` in ltdd/experiments/grids/{TABLE}.yaml, calibrated from the committed "
              f"lad-cifar10lt cpu cells and expert logs).", ""]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..report import _save_png  # the package's one PNG writer

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    methods = []
    for r in rows:
        if r["method"] not in methods and r["method"] != "random":
            methods.append(r["method"])
    for i, m in enumerate(methods):
        c = curve([r for r in rows if r["method"] == m and r["done"]])
        if c:
            ax.errorbar([r["compute"] for r in c], [100 * r["mean"] for r in c], yerr=[100 * r["std"] for r in c],
                        marker="o", capsize=3, color=plt.cm.tab10(i % 10), label=m)
            for r in c:
                ax.annotate(r["name"], (r["compute"], 100 * r["mean"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points", color=plt.cm.tab10(i % 10))
    rnd = next((r for r in rows if r["method"] == "random" and r["done"]), None)
    if rnd is not None:
        lo, hi = 100 * (rnd["mean"] - rnd["std"]), 100 * (rnd["mean"] + rnd["std"])
        ax.axhspan(lo, hi, color="grey", alpha=0.25, label="random (mean ± std)")
        ax.axhline(100 * rnd["mean"], color="grey", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("compute: distillation + expert store (single-core seconds)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("CIFAR-10-LT IF 100, IPC 10: accuracy vs compute")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save_png(fig, path, dpi=100)


def write_report(grid: ComputeGrid, out_dir: str | Path | None = None) -> Path:
    """Write ``<results>/accuracy-vs-compute.{md,json,png}`` from the finished cells (missing ones are listed as
    to do); returns the stem."""
    out_dir = Path(out_dir or grid.opts.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / TABLE
    results, stores, stale = grid.collect()
    rows = points_table(grid, results, stores)
    read = reading(grid, rows)
    _plot(rows, stem.with_suffix(".png"))
    save_json(stem.with_suffix(".json"), {
        "table": TABLE, "profile": grid.opts.profile, "command": command_line(grid), "rule": RULE,
        "protocol": grid.protocol, "runs": grid.opts.runs, "points": rows,
        "stores": {s: {"record": stores.get(s), "estimate": grid.store_estimate(s), "users": grid.users(s)}
                   for s in grid.used_stores()},
        "reading": read, "estimate_total": grid.total_estimate(), "cost_model": grid.cost, "stale": stale})
    atomic_write_text(stem.with_suffix(".md"), _markdown(grid, rows, stores, read, stale, f"{TABLE}.png"))
    return stem
