"""``ltdd reproduce accuracy-vs-compute``: print the plan with its compute estimates, write the report, or run."""

from __future__ import annotations

import os

from ..errors import LtddError
from .cells import STATES
from .compute_table import ComputeGrid, ComputeOptions

__all__ = ["run_compute", "plan_text"]


def _h(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 3600:.2f} h"


def plan_text(grid: ComputeGrid) -> list[str]:
    """The stores and points with their state, key hash, scale and estimated single-core compute, and the total."""
    stores, points = grid.plan()
    out = [f"{'store':22s} {'state':8s} {'hash':12s}  {'preset':10s} {'est.':>8s}  experts (read by)"]
    for r in stores:
        users = "; ".join(f"{k}: {len(v)} point{'s' * (len(v) != 1)}" for k, v in r["users"].items())
        out.append(f"{r['cell']:22s} {r['state']:8s} {r['hash']}  {r['preset']:10s} {_h(r['estimate']):>8s}  "
                   f"{r['what']} ({users})")
    out += ["", f"{'point':16s} {'state':8s} {'hash':12s}  {'method':6s} {'compute':>8s} {'amort.':>8s} "
                f"{'distill':>8s} {'store':>8s}  scale"]
    for r in points:
        e = r["estimate"]
        out.append(f"{r['cell']:16s} {r['state']:8s} {r['hash']}  {r['method']:6s} {_h(e['compute']):>8s} "
                   f"{_h(e['compute_amortised']):>8s} {_h(e['distill']):>8s} {_h(e['store']):>8s}  {r['what']}")
    rows = stores + points
    n = {s: sum(r["state"] == s for r in rows) for s in STATES}
    tot = grid.total_estimate()
    out += ["", f"{len(points)} points and {len(stores)} expert stores: {n['done']} done, {n['running']} running, "
                f"{n['partial']} partial, {n['to do']} to do" + (f", {n['stale']} stale" if n["stale"] else ""),
            "compute: the point's distillation + the experts it reads, charged in full (amort.: shared among the "
            "points that read them); estimates in single-core seconds from the grid file's cost model",
            f"estimated total to fill the table: {tot['total'] / 3600:.1f} single-core hours (stores "
            f"{tot['stores'] / 3600:.1f} h, distillations {tot['distill'] / 3600:.1f} h, evaluations "
            f"{tot['eval'] / 3600:.1f} h); about {tot['total'] / 3600 / max(1, os.cpu_count() or 1):.1f} h with one "
            f"process per core on this machine's {os.cpu_count()} cores"]
    return out


def run_compute(common: dict, *, points: str | None = None, plan: bool, report_only: bool) -> None:
    """Plan, report or run the table with the command's common options; ``points``: the comma-separated points to
    compute (in that order), all when None."""
    from .compute_report import write_report
    from .drive import drive_table

    only = tuple(n.strip() for n in points.split(",") if n.strip()) if points is not None else ()
    if points is not None and (plan or report_only):
        raise LtddError("--points chooses what to compute; it does not go with --plan or --report-only")
    if points is not None and not only:
        raise LtddError("--points: give at least one point name (comma-separated)")
    opts = ComputeOptions(**common, only=only)
    drive_table(lambda device: ComputeGrid(opts, device), plan_lines=plan_text, write_report=write_report,
                stale=lambda g: g.collect()[2], results=opts.results, device=opts.device, plan=plan,
                report_only=report_only, files="md, .json and .png")
