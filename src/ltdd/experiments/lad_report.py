"""The LAD table's report from its finished cells: markdown with the paper's numbers beside ours, JSON and plots."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..config import atomic_write_text, save_json
from .lad_table import (CIFAR10_CLASSES, DEFAULT_IFS, DEFAULT_METHODS, FULL_DATA, INIT_SUFFIX, TABLE, LadGrid,
                        cell_name, col_name, default_full_epochs, default_ipcs)
from .machine import cpu_model
from .paper import lad_paper_table, paper_data

__all__ = ["CPU_SCALE", "GPU_SCALE", "write_report", "command_line"]

# the CPU profile: what changes against the paper scale (stated in the report)
CPU_SCALE = {
    "model": "ConvNet-3, width 32 (paper: 128), instance norm",
    "experts": "4 representation experts x 12 epochs, SGD lr 0.01, wd 5e-3, no GSAM (paper: 100 x 100, GSAM); "
               "4 classifier experts x 3 epochs, class-aware sampler (paper: 10 epochs)",
    "distillation": "IPC 10; trajectory methods 60 iterations, 10 student steps per phase, start epochs [0, 10) "
                    "(paper: 10,000 iterations, 80 steps, [0, 20)); DC/DM/coresets: their presets' cpu profiles",
    "evaluation": "protocol 'cpu': ConvNet-3 width 32, 300 epochs, lr = learned lr, x0.1 at half, DSA, 3 runs "
                  "(paper: width 128, 1000 epochs, 5 runs)",
    "full data": "ConvNet-3 width 32, 30 epochs, cosine lr 0.01 momentum 0.9, DSA, one seed; cRT: 10 classifier "
                 "epochs with class-balanced sampling (paper's full-data row: ConvNet-3 width 128)",
}

# the GPU profile: the paper's scale; what is still ours is said here
GPU_SCALE = {
    "model": "ConvNet-3, width 128, instance norm (as the paper)",
    "experts": "the lad preset: 100 representation experts x 100 epochs with GSAM, classifier experts x 10 epochs "
               "(as the paper); MTT, DATM and LAD share these stores",
    "distillation": "LAD: its released configuration for (IF, IPC) (the authors' released configuration, its known bugs fixed); MTT / DATM / "
                    "DC / DM / coresets: their presets at full scale with the IPC set (the DATM preset is its "
                    "IPC 10 configuration: no per-IPC retuning)",
    "evaluation": "protocol 'lad': ConvNet-3 width 128, 1000 epochs, lr = learned lr, DSA, 5 runs (as the paper)",
    "full data": "ConvNet-3 width 128, 200 epochs (--full-epochs), cosine lr 0.01 momentum 0.9, DSA, 5 seeds (the "
                 "paper does not state its full-data schedule); cRT: 10 classifier epochs, class-balanced sampling",
}


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


def write_report(grid: LadGrid, out_dir: str | Path | None = None) -> Path:
    """Write ``<results>/lad-cifar10lt-<profile>.{md,json}`` and the plots from the finished cells; returns the
    stem. Cells recorded under another key (stale) are left out."""
    o = grid.opts
    out_dir = Path(out_dir or o.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{TABLE}-{o.profile}"
    results, _ = grid.collect()
    save_json(stem.with_suffix(".json"), {"profile": o.profile, "scale": CPU_SCALE if o.profile == "cpu"
                                          else GPU_SCALE, "command": command_line(grid), "paper": lad_paper_table(),
                                          "results": results})
    plots(grid, results, out_dir, CIFAR10_CLASSES)
    _write_markdown(grid, results, stem.with_suffix(".md"), CIFAR10_CLASSES)
    return stem


def command_line(grid: LadGrid) -> str:
    """The command line that reproduces this report (the arguments that differ from the defaults)."""
    o = grid.opts
    cmd = f"ltdd reproduce {TABLE} --profile {o.profile}"
    if o.ifs != DEFAULT_IFS:
        cmd += f" --ifs {_csv(o.ifs)}"
    if o.ipcs != default_ipcs(o.profile):
        cmd += f" --ipcs {_csv(o.ipcs)}"
    if o.methods != DEFAULT_METHODS:
        cmd += f" --methods {_csv(o.methods)}"
    for v in o.variants:
        cmd += f" --variant {v}"
    if o.runs != 3:
        cmd += f" --runs {o.runs}"
    if o.full_epochs != default_full_epochs(o.profile):
        cmd += f" --full-epochs {o.full_epochs}"
    return cmd


def _fmt(ms) -> str:
    return f"{100 * ms['mean']:.1f}±{100 * ms['std']:.1f}" if ms and ms.get("mean") is not None else "–"


def _paper(IF: int, ipc: int, method: str) -> str:
    return lad_paper_table().get(IF, {}).get(ipc, {}).get(method, "–")


def _perclass_png(profile: str, IF: int, ipc: int) -> str:
    return f"{TABLE}-{profile}-perclass-if{IF}-ipc{ipc}.png"


def filled_columns(grid: LadGrid, results: dict) -> list[tuple[int, int]]:
    """The requested columns that have at least one finished distillation cell (full-data cells are shared by
    every IPC of an IF, so they alone do not make a column); all requested columns when none has."""
    filled = [c for c in grid.columns() if any(m not in FULL_DATA for m in results.get(col_name(*c), {}))]
    return filled or grid.columns()


def _write_markdown(grid: LadGrid, results: dict, out_md: Path, class_names) -> None:
    o = grid.opts
    cols = filled_columns(grid, results)
    methods = list(o.methods)
    lines = [f"# LAD Table 1 (CIFAR-10-LT) at the `{o.profile}` profile", "",
             f"Command: `{command_line(grid)}`  ",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, device {o.device or 'auto'}; "
             f"torch threads of the processes that computed the cells: {_threads(results)}; report written "
             f"{time.strftime('%Y-%m-%d')}.", "", "Scale (what differs from the paper):", ""]
    lines += [f"- {k}: {v}" for k, v in (CPU_SCALE if o.profile == "cpu" else GPU_SCALE).items()]
    lines += ["", "## Overall accuracy (%), ours vs paper", "",
              "| method | " + " | ".join(f"IF {IF} IPC {ipc} ours | paper" for IF, ipc in cols) + " |",
              "| --- | " + " | ".join("--- | ---" for _ in cols) + " |"]
    for m in methods:
        cells = []
        for IF, ipc in cols:
            r = results.get(col_name(IF, ipc), {}).get(m)
            cells.append(f"{_fmt(r['summary']['accuracy']) if r else '–'} | {_paper(IF, ipc, m)}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "erm and crt are trained on the whole long-tailed set (no IPC): the same cell under every IPC.", ""]
    lines += _cost_lines(grid, results)
    for IF, ipc in cols:
        row = results.get(col_name(IF, ipc), {})
        lines += ["", f"## IF {IF}, IPC {ipc}: per-class and group accuracy (%), class std, cost", "",
                  "| method | acc | class std | worst | head | medium | tail | many | med-shot | few | seconds | "
                  "peak MB |", "| --- " * 12 + "|"]
        for m in methods:
            r = row.get(m)
            if not r:
                continue
            s, g = r["summary"], r["summary"]["groups"]
            lines.append(f"| {m} | {_fmt(s['accuracy'])} | {_fmt(s['class_std'])} | {_fmt(s['worst_accuracy'])} | "
                         f"{_fmt(g.get('head'))} | {_fmt(g.get('medium'))} | {_fmt(g.get('tail'))} | "
                         f"{_fmt(g.get('many'))} | {_fmt(g.get('medium_shot'))} | {_fmt(g.get('few'))} | "
                         f"{r.get('seconds', 0):.0f} | {r.get('peak_memory_mb', 0):.0f} |")
        lines += ["", "Per-class accuracy (%), head → tail:", "",
                  "| method | " + " | ".join(class_names) + " |", "| --- " * (len(class_names) + 1) + "|"]
        for m in methods:
            r = row.get(m)
            if r:
                lines.append(f"| {m} | " + " | ".join(f"{100 * a:.1f}" for a in r["summary"]["per_class"]) + " |")
        lines += ["", f"![per-class accuracy IF {IF} IPC {ipc}]({_perclass_png(o.profile, IF, ipc)})"]
    lines += ["", f"![accuracy vs IF]({TABLE}-{o.profile}-vs-if.png)", ""]
    lines += ["## Reading", "", _reading(results, cols), ""]
    notes = out_md.with_name(out_md.stem + "-notes.md")
    if notes.is_file():  # a hand-written analysis of this table, kept beside it
        lines += [f"Analysis of these figures (why orderings do or do not hold at this scale): [{notes.name}]({notes.name})",
                  ""]
    atomic_write_text(out_md, "\n".join(lines) + "\n")


def _threads(results: dict) -> str:
    found = sorted({r["threads"] for row in results.values() for r in row.values() if r.get("threads")})
    return ", ".join(map(str, found)) if found else "not recorded in these cells"


def _cost_lines(grid: LadGrid, results: dict) -> list[str]:
    """Compute spent: the cells' seconds and the expert stores' wall time, per IF and in total, and the part of it
    spent on the default methods (the table the issue asks for) when other methods are present too."""
    o = grid.opts
    default = set(DEFAULT_METHODS)
    out, total, core = [], 0.0, 0.0
    for IF in o.ifs:
        seen, cells, core_cells = set(), 0.0, 0.0
        for ipc in o.ipcs:
            for m, r in results.get(col_name(IF, ipc), {}).items():
                if cell_name(IF, ipc, m) not in seen:
                    seen.add(cell_name(IF, ipc, m))
                    cells += r.get("seconds", 0.0)
                    is_core = m in default and (m in FULL_DATA or ipc in default_ipcs(o.profile))
                    core_cells += r.get("seconds", 0.0) if is_core else 0.0
        stores = [grid.table.fresh(grid.experts_cell(IF, ipcs[0])) for ipcs in grid.store_columns(IF).values()]
        timed = [x["seconds"] for x in stores if x and "seconds" in x]
        e = sum(timed) if timed else None
        base = grid.table.fresh(grid.experts_cell(IF))
        core_e = base["seconds"] if base and "seconds" in base else 0.0  # the default IPC's store
        total += cells + (e or 0.0)
        core += core_cells + core_e
        out.append(f"- IF {IF}: {len(seen)} cells {cells / 60:.0f} min (default methods at the profile's default IPC: "
                   f"{core_cells / 60:.0f} min); "
                   "expert store " + (f"{e / 60:.0f} min" if e is not None else "not timed") + ".")
    out.append(f"- Total compute (sum over processes, 1 thread each unless stated): {total / 3600:.2f} h; the default "
               f"methods ({_csv(DEFAULT_METHODS)}) at IPC {_csv(default_ipcs(o.profile))} with the expert stores: "
               f"{core / 3600:.2f} h.")
    return ["Cost:", ""] + out


def _reading(results: dict, cols) -> str:
    ab = paper_data(TABLE)["ablation"]
    paper_ablation = " / ".join(f"{ab[k]:.1f}" for k in ("datm", "dam_only", "ed_only", "lad"))
    notes = []
    for IF, ipc in cols:
        row = results.get(col_name(IF, ipc), {})
        acc = {m: r["summary"]["accuracy"]["mean"] for m, r in row.items() if r}
        std = {m: r["summary"]["class_std"]["mean"] for m, r in row.items() if r}
        where = f"IF {IF}, IPC {ipc}"
        for sfx in sorted({m[3:] for m in acc if m.startswith("lad")}, key=lambda x: (x != "", x)):  # lad, lad@300..
            lad, datm, mtt = (f"{b}{sfx}" for b in ("lad", "datm", "mtt"))
            if {lad, datm, mtt} <= acc.keys():
                order = "holds" if acc[lad] > max(acc[datm], acc[mtt]) else "does NOT hold"
                notes.append(f"{where}: {lad} {100 * acc[lad]:.1f} vs {datm} {100 * acc[datm]:.1f} vs {mtt} "
                             f"{100 * acc[mtt]:.1f} - the paper's ordering (LAD above DATM and MTT) {order} here.")
        if {"lad", "lad-no-dam", "lad-no-ed", "datm"} <= acc.keys():
            both = acc["lad"] > max(acc["lad-no-dam"], acc["lad-no-ed"])
            notes.append(f"{where}: ablation - DATM {100 * acc['datm']:.1f}, + DAM only (lad-no-ed) "
                         f"{100 * acc['lad-no-ed']:.1f}, + ED only (lad-no-dam) {100 * acc['lad-no-dam']:.1f}, both (lad) "
                         f"{100 * acc['lad']:.1f}; the paper's ablation ({ab['where']}, as reported, unverified): "
                         f"{paper_ablation} - 'both components are needed' "
                         f"{'holds' if both else 'does NOT hold'} here.")
        for m in acc:
            if m.endswith(INIT_SUFFIX) and m[: -len(INIT_SUFFIX)] in acc:
                b = m[: -len(INIT_SUFFIX)]
                notes.append(f"{where}: {b} {100 * acc[b]:.1f} vs its initial set alone ({m}) {100 * acc[m]:.1f}: "
                             f"the distillation iterations add {100 * (acc[b] - acc[m]):+.1f} points.")
        better = [m for m in acc if m not in FULL_DATA and not m.startswith("lad") and "lad" in acc
                  and acc[m] > acc["lad"]]
        if better:
            notes.append(f"{where}: distilled/coreset sets above LAD here: "
                         + ", ".join(f"{m} {100 * acc[m]:.1f}" for m in better) + ".")
        if "erm" in std:
            narrower = [m for m in std if m not in FULL_DATA and std[m] < std["erm"]]
            notes.append(f"{where}: per-class accuracy std of full-data ERM {100 * std['erm']:.1f}; distilled sets "
                         f"with a narrower spread: {', '.join(narrower) or 'none'}.")
    return "\n".join(f"- {n}" for n in notes) or "- (no complete rows yet)"


def plots(grid: LadGrid, results: dict, out_dir: Path, class_names) -> None:
    """Per-class accuracy per filled column, and accuracy against IF (one colour per base method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..report import _save_png  # the package's one PNG writer

    o = grid.opts
    for IF, ipc in filled_columns(grid, results):
        row = {m: r for m, r in results.get(col_name(IF, ipc), {}).items() if r}
        if not row:
            continue
        if len(row) > 10:  # a readable chart: the default methods only (every row is in the tables)
            row = {m: r for m, r in row.items() if m in DEFAULT_METHODS} or row
        fig, ax = plt.subplots(figsize=(10, 3.5))
        w = 0.8 / len(row)
        for i, (m, r) in enumerate(row.items()):
            ax.bar(np.arange(len(class_names)) + (i - (len(row) - 1) / 2) * w, np.array(r["summary"]["per_class"]) * 100,
                   w, label=m, color=plt.cm.tab10(i % 10))
        ax.set_xticks(range(len(class_names)))
        ax.set_xticklabels(class_names, fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"CIFAR-10-LT IF {IF}, IPC {ipc} ({o.profile} profile): per-class accuracy, head → tail")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        _save_png(fig, out_dir / _perclass_png(o.profile, IF, ipc), dpi=100)
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    ifs, ipcs = list(o.ifs), list(o.ipcs)

    def base_of(m: str) -> str:
        return o.base_method(m)[0] if not m.endswith(INIT_SUFFIX) else m[: -len(INIT_SUFFIX)]

    bases = []  # one colour per base method; the variant sets the line style
    for m in o.methods:
        if base_of(m) not in bases:
            bases.append(base_of(m))
    for m in o.methods:
        style = (":" if m.endswith(INIT_SUFFIX) else "-." if "@" in m else "--" if m in FULL_DATA
                 else (0, (5, 2)) if m in o.variant_map else "-")
        for ipc in ([None] if m in FULL_DATA else ipcs):
            xs = [IF for IF in ifs if results.get(col_name(IF, ipc or ipcs[0]), {}).get(m)]
            ys = [100 * results[col_name(IF, ipc or ipcs[0])][m]["summary"]["accuracy"]["mean"] for IF in xs]
            if xs:
                label = m if ipc is None or len(ipcs) == 1 else f"{m} IPC {ipc}"
                ax.plot(xs, ys, marker="o", linestyle=style, color=plt.cm.tab20(bases.index(base_of(m)) % 20),
                        label=label)
    ax.set_xscale("log")
    ax.set_xticks(ifs)
    ax.set_xticklabels([str(i) for i in ifs])
    ax.set_xlabel("imbalance factor")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"CIFAR-10-LT ({o.profile} profile); dotted: initial set only, dash-dot: more iterations")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(o.methods) < 14 else 2)
    _save_png(fig, out_dir / f"{TABLE}-{o.profile}-vs-if.png", dpi=100)
