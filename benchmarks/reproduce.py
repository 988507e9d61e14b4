"""Reproduce the papers' tables with ltdd, on the same experts and splits, and write a comparison report.

    python benchmarks/reproduce.py --profile cpu --table lad-cifar10lt
    python benchmarks/reproduce.py --profile cpu --table two-stage

Under ``torchrun --nproc_per_node=K benchmarks/reproduce.py ...`` the experts and the cells are spread over the
ranks (each rank takes every K-th cell), and rank 0 writes the report. Every cell (IF x method) is computed once and stored under ``--work`` (default runs/reproduce/<table>-<profile>);
a killed run continues where it stopped: finished cells are not recomputed, an interrupted distillation resumes
from its checkpoint and an interrupted expert store is filled up. Results go to
``benchmarks/results/<table>-<profile>.md`` and ``.json`` with the paper's numbers beside ours, per-class accuracy,
head/medium/tail, seconds and peak memory per method, and plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ltdd.config import (RunConfig, TrainConfig, atomic_write_bytes, atomic_write_text, load_preset,
                         save_json)
from ltdd.data import prepare_data
from ltdd.distill import distill
from ltdd.distill.run import peak_memory_mb
from ltdd.evaluate import run_protocol
from ltdd.experts import train_experts
from ltdd.lt_methods import run_full
from ltdd.synset import SyntheticSet
from ltdd.distributed import dist_context, local_only, rank_world
from ltdd.train import resolve_device


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()

CIFAR = "../shared/data/cifar10-jpeg.tar.gz"
DEFAULT_METHODS = "random,dc,dm,mtt,datm,lad,erm,crt"

# lad.md §6.1 (Table 1 of the LAD paper), IPC 10 columns; "full" = full long-tailed dataset
PAPER_LAD_C10 = {
    10: {"random": "32.5±2.2", "dc": "37.9±0.9", "mtt": "58.0±0.8", "datm": "57.2±0.4", "lad": "58.1±0.3",
         "erm": "76.7±0.3"},
    50: {"random": "33.2±0.4", "dc": "37.3±0.9", "mtt": "45.8±1.4", "datm": "41.6±0.2", "lad": "54.2±1.0",
         "erm": "69.8±0.3"},
    100: {"random": "34.4±2.0", "dc": "36.7±0.8", "mtt": "37.7±0.6", "datm": "37.3±0.2", "lad": "53.4±0.1",
          "erm": "66.2±0.4"},
    200: {"random": "32.5±0.8", "dc": "35.6±0.8", "mtt": "N/A", "datm": "N/A", "lad": "52.2±0.6", "erm": "62.1±0.4"},
}

# the CPU profile: what changes against the paper scale (stated in the report)
CPU_SCALE = {
    "model": "ConvNet-3, width 32 (paper: 128), instance norm",
    "experts": "4 representation experts x 12 epochs, SGD lr 0.01, wd 5e-3, no GSAM (paper: 100 x 100, GSAM); "
               "4 classifier experts x 3 epochs, class-aware sampler (paper: 10 epochs)",
    "distillation": "IPC 10; trajectory methods 60 iterations, 10 student steps per phase, start epochs [0, 10) "
                    "(paper: 10,000 iterations, 80 steps, [0, 20)); DC/DM/coresets: their presets' cpu profiles",
    "evaluation": "protocol 'cpu': ConvNet-3 width 32, 300 epochs, lr = learned lr, x0.1 at half, DSA, 3 runs "
                  "(paper: width 128, 1000 epochs, 5 runs)",
    "full data": "ConvNet-3 width 32, 30 epochs, cosine lr 0.01 momentum 0.9, DSA; cRT: 10 classifier epochs "
                 "with class-balanced sampling (paper's full-data row: ConvNet-3 width 128)",
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Table:
    def __init__(self, work: Path, device, profile: str):
        self.work = work
        self.device = device
        self.profile = profile
        self.cells_dir = work / "cells"
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = rank_world()
        self.count = 0
        self.on_cell = None  # called after every computed cell (incremental report)

    def cell(self, key: str, fn):
        """Compute (or reuse) one cell. Under torchrun the cells are dealt round-robin to the ranks; a rank
        returns None for cells it does not own, and the report is written by rank 0 after a barrier."""
        path = self.cells_dir / f"{key}.json"
        self.count += 1
        if path.is_file():
            _log(f"{key}: done before, reusing")
            return json.loads(path.read_text())
        if (self.count - 1) % self.world != self.rank:
            return None
        _log(f"{key}: running")
        t0 = time.time()
        with local_only():  # a cell is one rank's independent work
            res = fn()
        res.setdefault("seconds", time.time() - t0)
        save_json(path, res)
        if self.on_cell:
            self.on_cell()
        _log(f"{key}: acc {100 * res['summary']['accuracy']['mean']:.1f} "
             f"({res['seconds']:.0f} s)")
        return res


def _distill_cell(table: Table, cfg: RunConfig, data, name: str, experts_dir, runs: int) -> dict:
    out = table.work / name
    resume = (out / "checkpoint.safetensors").is_file() and not (out / "distilled.safetensors").is_file()
    t0 = time.time()
    if not (out / "distilled.safetensors").is_file():
        distill(cfg, data, out, experts_dir=experts_dir, device=table.device, resume=resume, evaluate=False,
                progress=False)
    t_distill = time.time() - t0
    syn = SyntheticSet.load(out)
    res = run_protocol(syn.images, syn.labels, data, cfg.protocol_config(), soft_labels=syn.soft_labels, lr=syn.lr,
                       device=table.device, runs=runs, seed=cfg.distill.seed)
    save_json(out / "eval.json", res.to_dict())
    return {"summary": res.summary, "runs": [m.to_dict() for m in res.runs], "lr": res.lr,
            "distill_seconds": t_distill, "eval_seconds": res.seconds, "seconds": t_distill + res.seconds,
            "peak_memory_mb": peak_memory_mb(table.device), "config": cfg.distill.method}


def lad_cifar10lt(args, table: Table) -> dict:
    ifs = [int(x) for x in args.ifs.split(",")]
    methods = args.methods.split(",")
    results: dict = {}
    profile = "cpu" if args.profile == "cpu" else None
    for IF in ifs:
        base = load_preset("lad", profile, [f"data.imbalance_factor={IF}", f"data.root={args.root}"])
        data = prepare_data(base.data)
        experts_dir = table.work / f"experts-if{IF}"
        if any(m in ("mtt", "datm", "lad", "lad-no-dam", "lad-no-ed") for m in methods):
            _log(f"IF {IF}: experts")
            t0 = time.time()
            train_experts(base.experts, data, experts_dir, device=table.device, progress=False, rank=table.rank,
                          world=table.world)
            barrier()
            results.setdefault("experts_seconds", {})[IF] = time.time() - t0
        row = {}
        for m in methods:
            key = f"if{IF}-{m}"
            if m in ("erm", "crt", "balanced_softmax"):
                proto = base.protocol_config()
                tcfg = TrainConfig(epochs=args.full_epochs, lr=0.01, batch_size=256, schedule="cosine", dsa=True)
                row[m] = table.cell(key, lambda: run_full(data, m, proto.model, tcfg, runs=1, device=table.device,
                                                          crt_epochs=10))
                continue
            preset = {"dc": "dc", "dm": "dm", "random": "random"}.get(m, m)
            cfg = load_preset(preset, profile, [f"data.imbalance_factor={IF}", f"data.root={args.root}"])
            needs = m in ("mtt", "datm", "lad", "lad-no-dam", "lad-no-ed")
            row[m] = table.cell(key, lambda: _distill_cell(table, cfg, data, key, experts_dir if needs else None,
                                                           args.runs))
        results[IF] = row
    return results


def _fmt(ms) -> str:
    return f"{100 * ms['mean']:.1f}±{100 * ms['std']:.1f}" if ms and ms.get("mean") is not None else "–"


def write_lad_report(args, results: dict, out_md: Path, class_names) -> None:
    ifs = [int(x) for x in args.ifs.split(",")]
    methods = args.methods.split(",")
    lines = [f"# LAD Table 1 (CIFAR-10-LT, IPC 10) at the `{args.profile}` profile", "",
             f"Command: `{_command(args)}`  ",
             f"Machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}, device {args.device or 'auto'}; "
             f"date {time.strftime('%Y-%m-%d')}.", "", "Scale (what differs from the paper):", ""]
    if args.profile == "cpu":
        lines += [f"- {k}: {v}" for k, v in CPU_SCALE.items()]
    lines += ["", "## Overall accuracy (%), ours vs paper", "",
              "| method | " + " | ".join(f"IF {IF} ours | IF {IF} paper" for IF in ifs) + " |",
              "| --- | " + " | ".join("--- | ---" for _ in ifs) + " |"]
    for m in methods:
        cells = []
        for IF in ifs:
            r = results.get(IF, {}).get(m)
            paper = PAPER_LAD_C10.get(IF, {}).get(m if m != "crt" else "-", "–")
            cells.append(f"{_fmt(r['summary']['accuracy']) if r else '–'} | {paper}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for IF in ifs:
        lines += ["", f"## IF {IF}: per-class and group accuracy (%), class std, cost", "",
                  "| method | acc | class std | worst | head | medium | tail | many | med-shot | few | seconds | "
                  "peak MB |", "| --- " * 12 + "|"]
        for m in methods:
            r = results.get(IF, {}).get(m)
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
            r = results.get(IF, {}).get(m)
            if r:
                lines.append(f"| {m} | " + " | ".join(f"{100 * a:.1f}" for a in r["summary"]["per_class"]) + " |")
        lines += ["", f"![per-class accuracy IF {IF}](lad-cifar10lt-{args.profile}-perclass-if{IF}.png)"]
    lines += ["", f"![accuracy vs IF](lad-cifar10lt-{args.profile}-vs-if.png)", ""]
    lines += ["## Reading", "", _reading(results, ifs), ""]
    atomic_write_text(out_md, "\n".join(lines) + "\n")


def _command(args) -> str:
    """The command line that reproduces this report (the arguments that differ from the defaults)."""
    cmd = f"python benchmarks/reproduce.py --profile {args.profile} --table {args.table}"
    if args.ifs != "10,100":
        cmd += f" --ifs {args.ifs}"
    if args.methods != DEFAULT_METHODS:
        cmd += f" --methods {args.methods}"
    if args.runs != 3:
        cmd += f" --runs {args.runs}"
    if args.full_epochs != 30:
        cmd += f" --full-epochs {args.full_epochs}"
    return cmd


def _reading(results, ifs) -> str:
    notes = []
    for IF in ifs:
        row = results.get(IF, {})
        acc = {m: r["summary"]["accuracy"]["mean"] for m, r in row.items() if r}
        std = {m: r["summary"]["class_std"]["mean"] for m, r in row.items() if r}
        if {"lad", "datm", "mtt"} <= acc.keys():
            order = "holds" if acc["lad"] > max(acc["datm"], acc["mtt"]) else "does NOT hold"
            notes.append(f"IF {IF}: LAD {100 * acc['lad']:.1f} vs DATM {100 * acc['datm']:.1f} vs MTT "
                         f"{100 * acc['mtt']:.1f} - the paper's ordering (LAD above DATM and MTT) {order} here.")
        if "erm" in std:
            narrower = [m for m in std if m not in ("erm", "crt", "balanced_softmax") and std[m] < std["erm"]]
            notes.append(f"IF {IF}: per-class accuracy std of full-data ERM {100 * std['erm']:.1f}; distilled sets "
                         f"with a narrower spread: {', '.join(narrower) or 'none'}.")
    return "\n".join(f"- {n}" for n in notes) or "- (no complete rows yet)"


def plots(args, results, out_dir: Path, class_names) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ifs = [int(x) for x in args.ifs.split(",")]
    methods = [m for m in args.methods.split(",")]
    for IF in ifs:
        row = {m: r for m, r in results.get(IF, {}).items() if r}
        if not row:
            continue
        fig, ax = plt.subplots(figsize=(9, 3.5))
        w = 0.8 / len(row)
        for i, (m, r) in enumerate(row.items()):
            ax.bar(np.arange(len(class_names)) + (i - (len(row) - 1) / 2) * w, np.array(r["summary"]["per_class"]) * 100,
                   w, label=m)
        ax.set_xticks(range(len(class_names)))
        ax.set_xticklabels(class_names, fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"CIFAR-10-LT IF {IF}, IPC 10 ({args.profile} profile): per-class accuracy, head → tail")
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(out_dir / f"lad-cifar10lt-{args.profile}-perclass-if{IF}.png", buf.getvalue())
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in methods:
        xs = [IF for IF in ifs if results.get(IF, {}).get(m)]
        ys = [100 * results[IF][m]["summary"]["accuracy"]["mean"] for IF in xs]
        if xs:
            ax.plot(xs, ys, marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("imbalance factor")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out_dir / f"lad-cifar10lt-{args.profile}-vs-if.png", buf.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--table", choices=["lad-cifar10lt", "two-stage"], default="lad-cifar10lt")
    p.add_argument("--root", default=CIFAR)
    p.add_argument("--ifs", default="10,100")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--full-epochs", type=int, default=30)
    p.add_argument("--device", default=None)
    p.add_argument("--work", default=None)
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the finished cells; compute nothing")
    args = p.parse_args(argv)
    with dist_context():
        return _main(args)


def _main(args) -> int:
    if args.profile == "gpu":
        args.runs = max(args.runs, 5)
    device = resolve_device(args.device)
    work = Path(args.work or f"runs/reproduce/{args.table}-{args.profile}")
    table = Table(work, device, args.profile)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.table == "two-stage":
        from two_stage_table import two_stage_table  # noqa: E402  (benchmarks/two_stage_table.py)

        return two_stage_table(args, table, out_dir)
    data = prepare_data(load_preset("lad", None, [f"data.root={args.root}"]).data)
    stem = out_dir / f"lad-cifar10lt-{args.profile}"

    def write() -> None:
        results = collect_cells(args, table)
        save_json(stem.with_suffix(".json"), {"profile": args.profile, "scale": CPU_SCALE if args.profile == "cpu"
                                              else "paper", "paper": PAPER_LAD_C10, "results": results})
        plots(args, results, out_dir, data.class_names)
        write_lad_report(args, results, stem.with_suffix(".md"), data.class_names)

    if args.report_only:
        write()
        _log(f"wrote {stem}.md and .json from the finished cells")
        return 0
    if table.rank == 0:
        table.on_cell = write  # the report grows cell by cell, so a stopped run still leaves its figures
    lad_cifar10lt(args, table)
    barrier()
    if table.rank == 0:
        write()
        _log(f"wrote {stem}.md and .json")
    return 0


def collect_cells(args, table: Table) -> dict:
    results: dict = {}
    for IF in [int(x) for x in args.ifs.split(",")]:
        for m in args.methods.split(","):
            path = table.cells_dir / f"if{IF}-{m}.json"
            if path.is_file():
                results.setdefault(IF, {})[m] = json.loads(path.read_text())
    return results


if __name__ == "__main__":
    sys.exit(main())
