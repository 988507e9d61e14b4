"""The fair table's report from its finished cells: accuracy per label mode beside its random baseline, LRS,
class std, head/medium/tail and compute per row, and which orderings hold (markdown and JSON).

A row's compute is its distillation plus the training of the experts it reads (charged in full; RLDD: observer
and teacher), in single-core seconds (measured seconds x torch threads). The teacher of the teacher mode is the
evaluation's tool: its training is not charged to the rows it relabels (it is RLDD's own teacher, charged to
RLDD). Evaluations are not part of compute.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import atomic_write_text, save_json
from ..scores import label_robust_score
from .compute_cost import kinds_read
from .fair_table import TABLE, FairGrid
from .machine import machine_line

__all__ = ["row_figures", "reading", "write_report", "RULE"]

FULL_NAMES = {"erm": "ERM", "crt": "cRT", "balanced_softmax": "balanced softmax"}

RULE = ("compute = the row's distillation + the training of every expert it reads (trajectory rows: the shared "
        "store's experts they read, charged in full to each; RLDD: its observer and teacher), in single-core "
        "seconds (measured seconds x torch threads). The teacher that relabels every row in the teacher mode is "
        "RLDD's debiased teacher: charged to RLDD only. Evaluations are not counted.")


def _acc(res: dict | None) -> float | None:
    try:
        return float(res["summary"]["accuracy"]["mean"])
    except (TypeError, KeyError):
        return None


def _std(res: dict | None) -> float | None:
    try:
        return float(res["summary"]["accuracy"]["std"])
    except (TypeError, KeyError):
        return None


def _groups(res: dict | None) -> dict:
    try:
        s = res["summary"]
        return {"class_std": s["class_std"]["mean"], **{k: s["groups"][k]["mean"] for k in ("head", "medium", "tail")
                                                        if k in s["groups"]}}
    except (TypeError, KeyError):
        return {}


def row_compute(grid: FairGrid, row, IF: int, results: dict) -> float | None:
    """Single-core seconds of a row (None while a part is missing)."""
    src = grid.row(row.of) if row.of else row
    d = results.get(grid.distill_cell(src, IF).name)
    if d is None:
        return None
    s = d.get("distill_seconds_full", d.get("distill_seconds"))
    if s is None:
        return None
    total = float(s) * int(d.get("threads") or 1)
    store = grid.store_cell(src, IF)
    if store is not None:
        rec = results.get(store.name)
        if rec is None:
            return None
        parts, threads = rec.get("expert_seconds") or {}, int(rec.get("threads") or 1)
        if parts:
            total += sum(float(parts.get(k, 0.0)) for k in kinds_read(grid.config(src, IF))) * threads
        else:
            total += float(rec.get("seconds", 0.0)) * threads
    return total


def row_figures(grid: FairGrid, IF: int, results: dict) -> list[dict]:
    """Per row: per mode the accuracy, its std over runs, the baseline's accuracy and the gain; LRS; groups."""
    full = {m: _acc(results.get(grid.full_cell(m, IF).name)) for m in grid.full}
    base = {m: results.get(grid.baseline_cell(IF, m).name) for m in ("hard", *grid.teacher_modes)}
    out = []
    for r in grid.rows:
        modes = grid.modes(r, IF)
        fig = {"row": r.name, "IF": IF, "compute": row_compute(grid, r, IF, results), "modes": {}}
        for m in grid.all_modes:
            if m not in modes:
                fig["modes"][m] = {"same_as": "hard"} if (m == "own" and "hard" in modes) else None
                continue
            res = results.get(grid.eval_cell(r, IF, m).name)
            b = results.get(grid.baseline_cell(IF, "own", r).name) if m == "own" else base[m]
            acc, bacc = _acc(res), _acc(b)
            fig["modes"][m] = {"acc": acc, "std": _std(res), "baseline": bacc, "baseline_std": _std(b),
                               "gain": None if acc is None or bacc is None else acc - bacc, **_groups(res),
                               "baseline_groups": _groups(b)}
            if res is not None and res.get("calibration"):
                fig["modes"][m]["tau"] = res["calibration"].get("tau")
        hard = (fig["modes"].get("hard") or {}).get("acc")
        own_fig = fig["modes"]["own"]
        own = own_fig.get("acc") if own_fig and "acc" in own_fig else hard
        rnd_own = own_fig.get("baseline") if own_fig and "acc" in own_fig else (fig["modes"].get("hard") or {}).get(
            "baseline")
        fig["lrs"] = None
        if None not in (full.get("erm"), hard, own, rnd_own):
            fig["lrs"] = label_robust_score(full["erm"], hard, own, rnd_own)
        out.append(fig)
    return out


def _pct(v, sign=False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"


def _cell_text(f) -> str:
    if f is None:
        return "n/a"
    if "same_as" in f:
        return f"= {f['same_as']}"
    if f.get("acc") is None:
        return "to do"
    out = f"{_pct(f['acc'])} ± {_pct(f['std'])}"
    if f.get("gain") is not None:
        out += f" ({_pct(f['gain'], True)})"
    return out


def _seconds(s) -> str:
    return "-" if s is None else (f"{s:.0f}" if s < 10000 else f"{s / 3600:.1f} h")


def reading(grid: FairGrid, figs: dict[int, list[dict]]) -> list[str]:
    """Plain statements of which orderings hold, from the figures (only where both sides are computed)."""
    out = []
    for IF, rows in figs.items():
        by = {f["row"]: f for f in rows}

        def acc(row, mode):
            f = (by.get(row) or {}).get("modes", {}).get(mode)
            if f and "same_as" in f:
                f = by[row]["modes"].get(f["same_as"])
            return (f or {}).get("acc")

        def cmp(a, ma, b, mb, what):
            x, y = acc(a, ma), acc(b, mb)
            if x is None or y is None:
                out.append(f"IF {IF}: {what}: not computed yet")
                return
            verdict = "holds" if x >= y else "does not hold"
            out.append(f"IF {IF}: {what}: {verdict} ({_pct(x)} vs {_pct(y)}, {_pct(x - y, True)} points)")

        if "rldd" in by and "lad" in by:
            for m, name in grid.teacher_modes.items():
                cmp("rldd", m, "lad", m, f"RLDD above LAD under the relabel protocol (mode {m}: teacher {name})")
            cmp("rldd", "own", "lad", "own", "RLDD above LAD under LAD's own protocol (own mode)")
            c_r, c_l = by["rldd"]["compute"], by["lad"]["compute"]
            if c_r is not None and c_l is not None:
                verdict = "holds" if c_r <= c_l / 4 else "does not hold"
                out.append(f"IF {IF}: RLDD at no more than a quarter of LAD's compute: {verdict} "
                           f"({_seconds(c_r)} s vs {_seconds(c_l)} s, ratio {c_r / c_l:.2f})")
        if "lad+adsa" in by and "lad" in by:
            cmp("lad+adsa", "own", "lad", "own", "LAD + ADSA at least LAD (own mode)")
        for f in rows:
            gains = {m: v["gain"] for m, v in f["modes"].items() if v and v.get("gain") is not None}
            if gains:
                below = [m for m, g in gains.items() if g < 0]
                out.append(f"IF {IF}: {f['row']} vs the random subset: "
                           + ", ".join(f"{m} {_pct(g, True)}" for m, g in gains.items())
                           + (f" (below random in {', '.join(below)})" if below else ""))
    return out


def command_line(grid: FairGrid) -> str:
    o = grid.opts
    parts = ["ltdd reproduce", TABLE, "--profile", o.profile, "--ifs", ",".join(map(str, grid.ifs)),
             "--runs", str(o.runs), "--results", str(o.results)]
    return " ".join(parts)


def _markdown(grid: FairGrid, figs: dict, results: dict, read: list[str], stale: list[str]) -> str:
    o = grid.opts
    lines = [f"# The fair table: CIFAR-10-LT, IPC {grid.ipc}, profile {o.profile}", "",
             grid.description + ".", "",
             f"Command: `{command_line(grid)}` (add `--report-only` to rewrite this file from the recorded cells).",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} on {machine_line(grid.table.device)}.", "",
             f"- **hard**: the set's images with hard labels, protocol `{grid.protocol_names['sgd']}`;",
             f"- **own**: its own soft labels (hard-label sets have none: = hard), protocol "
             f"`{grid.protocol_names['sgd']}`; its baseline is the random subset given the soft labels the row's "
             "method would have started it with (ADSA-calibrated for the calibrated row);",
             f"- **teacher** modes: every training batch relabelled by one teacher per IF, the same for every row, "
             f"protocol `{grid.protocol_names['relabel']}` (MSE on logits + 0.025 CE, cutmix, EMA): "
             + "; ".join(f"`{m}`: {_teacher_what(grid, n)}" for m, n in grid.teacher_modes.items()) + ";",
             "- each accuracy is the mean ± std over "
             f"{o.runs} runs, with (in brackets) the gain over the random real subset of the same size drawn from "
             "the long-tailed train set, under the same protocol and mode;",
             "- LRS: DD-Ranking's label-robust score, long-tail variant (full-data reference: ERM on the same split; "
             "0.5 · (own − random own) − 0.5 · (ERM − hard), normalised to [0, 1]);",
             f"- {RULE}", ""]
    for IF, rows in figs.items():
        full = {m: results.get(grid.full_cell(m, IF).name) for m in grid.full}
        base = {m: results.get(grid.baseline_cell(IF, m).name) for m in ("hard", *grid.teacher_modes)}
        lines += [f"## IF {IF}", "",
                  "Full data (same split, hard labels): " + ", ".join(
                      f"{FULL_NAMES.get(m, m)} {_pct(_acc(r))}" for m, r in full.items()) + ". Random real subset: "
                  + ", ".join(f"{m} {_pct(_acc(b))} ± {_pct(_std(b))}" for m, b in base.items()) + ".", "",
                  *[_teacher_line(n, results.get(grid.teacher_test_cell(IF, n).name)) for n in grid.teachers], "",
                  "| row | compute (s) | " + " | ".join(grid.all_modes) + " | LRS |",
                  "|---|---:|" + "---|" * len(grid.all_modes) + "---:|"]
        for f in rows:
            lrs = f["lrs"]["lrs"] if f["lrs"] else None
            lines.append(f"| {f['row']} | {_seconds(f['compute'])} | " + " | ".join(
                _cell_text(f["modes"][m]) for m in grid.all_modes) + f" | {'-' if lrs is None else f'{lrs:.3f}'} |")
        lines += ["", "Class std and head / medium / tail accuracy per mode (random subset's in brackets):", "",
                  "| row | mode | class std | head | medium | tail |", "|---|---|---:|---:|---:|---:|"]
        for f in rows:
            for m in grid.all_modes:
                v = f["modes"][m]
                if not v or "acc" not in v or v["acc"] is None:
                    continue
                bg = v.get("baseline_groups") or {}
                cells = [f"{_pct(v.get(k))} ({_pct(bg.get(k))})" for k in ("class_std", "head", "medium", "tail")]
                tau = f" (τ {v['tau']:.2f})" if v.get("tau") is not None else ""
                lines.append(f"| {f['row']} | {m}{tau} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Reading (computed from the figures above)", ""] + [f"- {s}" for s in read] + [""]
    if stale:
        lines += [f"Left out (recorded under another key, recomputed on the next run): {', '.join(stale)}", ""]
    return "\n".join(lines)


def _teacher_what(grid: FairGrid, name: str) -> str:
    if grid.teacher_is_row(name):
        return f"the debiased teacher of row {name}'s expert store"
    return f"a {FULL_NAMES.get(name, name)} network trained on the full long-tailed set (the full-data recipe, seed 0)"


def _teacher_line(name: str, res: dict | None) -> str:
    """What a teacher is worth on the test set."""
    if res is None:
        return f"Teacher {name}'s own test accuracy: to do."
    g = _groups(res)
    return (f"Teacher {name} on the test set: {_pct(_acc(res))} %, class std "
            f"{_pct(g.get('class_std'))}, head / medium / tail {_pct(g.get('head'))} / {_pct(g.get('medium'))} / "
            f"{_pct(g.get('tail'))}.")


def write_report(grid: FairGrid, out_dir: str | Path | None = None) -> Path:
    """Write ``<results>/fair-cifar10lt-<profile>.{md,json}`` from the finished cells; returns the stem."""
    out_dir = Path(out_dir or grid.opts.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / grid.opts.table
    results, stale = grid.collect()
    figs = {IF: row_figures(grid, IF, results) for IF in grid.ifs}
    read = reading(grid, figs)
    save_json(stem.with_suffix(".json"), {"table": TABLE, "profile": grid.opts.profile, "command": command_line(grid),
                                          "rule": RULE, "protocols": grid.protocol_names, "runs": grid.opts.runs,
                                          "rows": {str(k): v for k, v in figs.items()}, "reading": read,
                                          "stale": stale})
    atomic_write_text(stem.with_suffix(".md"), _markdown(grid, figs, results, read, stale))
    return stem
