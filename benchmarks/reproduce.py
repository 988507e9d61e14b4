"""Reproduce the papers' tables with ltdd, on the same experts and splits, and write a comparison report.

    python benchmarks/reproduce.py --profile cpu --table lad-cifar10lt            # IF 10 and 100, IPC 10
    python benchmarks/reproduce.py --profile gpu --table lad-cifar10lt            # paper scale, IPC 10 and 50
    python benchmarks/reproduce.py --profile cpu --table two-stage
    python benchmarks/reproduce.py ... --plan           # list every cell, its preset, scale and state; compute nothing
    python benchmarks/reproduce.py ... --report-only    # rewrite the report from the finished cells

The LAD table's cells are (IF, IPC, method): ``--ifs``, ``--ipcs`` and ``--methods`` choose them. A method
``<name>-init`` (e.g. ``lad-init``) evaluates that method's initial synthetic set with no distillation iteration,
and ``<name>@<N>`` (e.g. ``lad@300``) runs it for N iterations instead of its preset's number. MTT, DATM and LAD
share one expert store per IF. Full-data rows (erm, crt) are trained on the whole long-tailed set, one cell per IF.
Under ``torchrun --nproc_per_node=K benchmarks/reproduce.py ...`` the experts and the cells are spread over the
ranks (each rank takes every K-th cell), and rank 0 writes the report. Every cell is computed once and stored under
``--work`` (default runs/reproduce/<table>-<profile>); a killed run continues where it stopped: finished cells are
not recomputed, an interrupted distillation resumes from its checkpoint and an interrupted expert store is filled
up. Several independent processes may share one work folder (start the same command twice, e.g. one per core):
cells and experts are claimed with lock files, so they split the work. Results go to ``benchmarks/results/<table>-<profile>.md`` and ``.json`` with the paper's numbers beside ours,
per-class accuracy, head/medium/tail, seconds and peak memory per method, and plots (per-class accuracy per
column; accuracy against IF).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from common import cpu_model  # noqa: E402  (benchmarks/common.py)
from ltdd.config import (RunConfig, TrainConfig, atomic_write_bytes, atomic_write_text, list_presets, load_preset,
                         save_json)
from ltdd.data import prepare_data
from ltdd.distill import DISTILLERS, distill
from ltdd.distill.run import peak_memory_mb
from ltdd.evaluate import run_protocol
from ltdd.experts import train_experts
from ltdd.locks import lock_is_stale, try_lock, unlock
from ltdd.lt_methods import run_full
from ltdd.synset import SyntheticSet
from ltdd.distributed import dist_context, local_only, rank_world
from ltdd.train import resolve_device


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()

CIFAR = "../shared/data/cifar10-jpeg.tar.gz"
# the CIFAR-10 batches' label names in label order (= head to tail: the long-tailed split keeps the natural order)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_METHODS = "random,dc,dm,mtt,datm,lad,erm,crt"

# lad.md §6.1 (Table 1 of the LAD paper): PAPER_LAD_C10[IF][IPC][method]; "erm" = the full long-tailed dataset
# (one number per IF, repeated under every IPC). Methods the paper's table does not have are absent.
_P = {  # method: {IF: (IPC 10, IPC 20, IPC 50)}
    "random": {10: ("32.5±2.2", "39.6±0.9", "51.9±1.5"), 50: ("33.2±0.4", "42.0±1.3", "51.6±1.3"),
               100: ("34.4±2.0", "41.4±0.7", "52.6±0.5"), 200: ("32.5±0.8", "42.2±1.1", "49.9±1.4")},
    "kcenter": {10: ("21.9±0.8", "24.2±0.8", "31.7±0.9"), 50: ("17.8±0.2", "20.8±0.5", "26.1±0.2"),
                100: ("16.2±0.5", "19.0±1.0", "24.2±1.2"), 200: ("16.8±0.3", "17.5±1.4", "22.6±1.6")},
    "dc": {10: ("37.9±0.9", "38.5±0.9", "37.4±1.4"), 50: ("37.3±0.9", "38.8±1.0", "35.8±1.2"),
           100: ("36.7±0.8", "38.1±1.0", "35.3±1.4"), 200: ("35.6±0.8", "35.7±0.9", "33.3±1.4")},
    "mtt": {10: ("58.0±0.8", "59.5±0.4", "62.0±0.9"), 50: ("45.8±1.4", "49.9±0.8", "53.6±0.5"),
            100: ("37.7±0.6", "41.6±1.1", "47.8±1.1"), 200: ("N/A", "22.6±1.0", "23.9±0.8")},
    "datm": {10: ("57.2±0.4", "60.4±0.2", "66.7±0.6"), 50: ("41.6±0.2", "43.4±0.3", "50.3±0.2"),
             100: ("37.3±0.2", "38.9±0.1", "44.3±0.1"), 200: ("N/A", "34.8±0.1", "40.1±0.2")},
    "lad": {10: ("58.1±0.3", "63.0±1.0", "70.5±0.4"), 50: ("54.2±1.0", "59.4±0.7", "65.8±0.2"),
            100: ("53.4±0.1", "58.2±0.6", "64.0±0.9"), 200: ("52.2±0.6", "56.6±0.4", "62.3±0.3")},
}
_FULL = {10: "76.7±0.3", 50: "69.8±0.3", 100: "66.2±0.4", 200: "62.1±0.4"}
PAPER_LAD_C10 = {IF: {ipc: {**{m: v[IF][i] for m, v in _P.items()}, "erm": _FULL[IF]}
                      for i, ipc in enumerate((10, 20, 50))} for IF in _FULL}
FULL_DATA = ("erm", "crt", "balanced_softmax")  # trained on the real long-tailed set: one cell per IF, no IPC
TRAJECTORY = ("mtt", "datm", "lad", "lad-no-dam", "lad-no-ed")  # need the expert store
# "<method>-init": the method's initial synthetic set (images + soft labels), evaluated without any distillation
# iteration - what the iterations add over the initialisation
# "<method>@<N>": the method run for N iterations instead of its preset's number
INIT_SUFFIX = "-init"

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

# the GPU profile: the paper's scale (lad.md §3, §4.7, §5); what is still ours is said here
GPU_SCALE = {
    "model": "ConvNet-3, width 128, instance norm (as the paper)",
    "experts": "the lad preset: 100 representation experts x 100 epochs with GSAM, classifier experts x 10 epochs "
               "(as the paper); MTT, DATM and LAD share these stores",
    "distillation": "LAD: its released configuration for (IF, IPC) (lad.md §4.7, upstream bugs fixed); MTT / DATM / "
                    "DC / DM / coresets: their presets at full scale with the IPC set (the DATM preset is its "
                    "IPC 10 configuration: no per-IPC retuning)",
    "evaluation": "protocol 'lad': ConvNet-3 width 128, 1000 epochs, lr = learned lr, DSA, 5 runs (as the paper)",
    "full data": "ConvNet-3 width 128, 200 epochs (--full-epochs), cosine lr 0.01 momentum 0.9, DSA, 5 seeds (the "
                 "paper does not state its full-data schedule); cRT: 10 classifier epochs, class-balanced sampling",
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
        returns None for cells it does not own, and the report is written by rank 0 after a barrier.

        Independent processes may also share one work folder (start the same command twice): a cell is claimed
        with a lock file, a process skips the cells another live process holds, and a dead process's claim is
        taken over (ltdd.locks)."""
        path = self.cells_dir / f"{key}.json"
        self.count += 1
        if path.is_file():
            _log(f"{key}: done before, reusing")
            return json.loads(path.read_text())
        if (self.count - 1) % self.world != self.rank:
            return None
        lock = self.cells_dir / f"{key}.lock"
        if not try_lock(lock):
            _log(f"{key}: another process is computing it, skipping")
            return None
        try:
            if path.is_file():  # finished by another process between the check above and the claim
                return json.loads(path.read_text())
            _log(f"{key}: running")
            t0 = time.time()
            with local_only():  # a cell is one rank's independent work
                res = fn()
            res.setdefault("seconds", time.time() - t0)
            res.setdefault("threads", torch.get_num_threads())
            save_json(path, res)
        finally:
            unlock(lock)
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


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def columns(args) -> list[tuple[int, int]]:
    """The table's columns: (IF, IPC) pairs."""
    return [(IF, ipc) for IF in _ints(args.ifs) for ipc in _ints(args.ipcs)]


def col_name(IF: int, ipc: int) -> str:
    return f"if{IF}-ipc{ipc}"


def cell_key(IF: int, ipc: int, method: str) -> str:
    """A cell's name under ``<work>/cells``. Full-data cells are shared by every IPC of an IF; IPC 10 cells keep the
    short names of the first (IPC 10 only) version of this script, so their finished cells stay valid."""
    if method in FULL_DATA or ipc == 10:
        return f"if{IF}-{method}"
    return f"if{IF}-ipc{ipc}-{method}"


def method_config(args, method: str, IF: int, ipc: int) -> tuple[str, RunConfig]:
    """(preset name, resolved config) of a distillation cell. The GPU profile runs LAD with its released
    configuration for (IF, IPC) where lad.md §4.7 has one; everything else is the method's preset at the
    profile, with the IF and IPC set."""
    profile = "cpu" if args.profile == "cpu" else None
    method, extra = base_method(method)
    over = [f"data.imbalance_factor={IF}", f"data.root={args.root}", f"distill.ipc={ipc}"]
    released = released_preset(method, IF, ipc)
    if released:
        return released, load_preset(released, profile, [f"data.root={args.root}"] + extra)
    return method, load_preset(method, profile, over + extra)


def released_preset(method: str, IF: int, ipc: int) -> str | None:
    """LAD's released configuration for (IF, IPC) on CIFAR-10-LT, when there is one (under every profile: its own
    lambdas, windows and learning rates, scaled by the profile)."""
    name = f"lad-cifar10-if{IF}-ipc{ipc}"
    return name if method == "lad" and name in list_presets() else None


# named variants of a preset given on the command line: --variant NAME=PRESET:key=value,key=value
VARIANTS: dict[str, tuple[str, list[str]]] = {}


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``NAME=PRESET:key=value,key=value`` -> (NAME, PRESET, overrides)."""
    name, eq, rest = text.partition("=")
    preset, colon, over = rest.partition(":")
    if not eq or not colon or not name.strip() or not preset.strip() or "@" in name or name.endswith(INIT_SUFFIX):
        raise SystemExit(f"--variant '{text}': expected NAME=PRESET:key=value[,key=value...] (NAME without @ or "
                         f"a '{INIT_SUFFIX}' ending)")
    pairs = [o.strip() for o in over.split(",") if o.strip()]
    if not pairs or any("=" not in o for o in pairs):
        raise SystemExit(f"--variant '{text}': the overrides must be key=value pairs")
    return name.strip(), preset.strip(), pairs


def base_method(method: str) -> tuple[str, list[str]]:
    """(preset, overrides) of a method name: ``lad`` -> (lad, []); ``lad-init`` -> (lad, [iterations=0]);
    ``lad@300`` -> (lad, [iterations=300]); a ``--variant`` name -> its preset and overrides (suffixes apply to
    variants too)."""
    extra: list[str] = []
    if method.endswith(INIT_SUFFIX):  # the method's initialisation alone: images and soft labels, no iteration
        method, extra = method[: -len(INIT_SUFFIX)], ["distill.iterations=0"]
    elif "@" in method:
        name, _, its = method.partition("@")
        if not its.isdigit():
            raise SystemExit(f"method '{method}': the part after @ must be a number of iterations")
        method, extra = name, [f"distill.iterations={int(its)}"]
    if method in VARIANTS:
        preset, over = VARIANTS[method]
        return preset, over + extra
    return method, extra


def needs_experts(method: str) -> bool:
    return base_method(method)[0] in TRAJECTORY


def expert_config(args, IF: int) -> RunConfig:
    """The expert stores of a column: the LAD preset's experts (representation + classifier experts), shared by
    MTT, DATM and LAD so that they are compared on the same trajectories."""
    profile = "cpu" if args.profile == "cpu" else None
    # experts long enough for every column's start window (LAD's released configurations differ per IPC)
    epochs = max([load_preset("lad", profile).experts.train.epochs] +
                 [load_preset(r, profile).experts.train.epochs for r in
                  (released_preset("lad", IF, ipc) for ipc in _ints(args.ipcs)) if r])
    return load_preset("lad", profile, [f"data.imbalance_factor={IF}", f"data.root={args.root}",
                                        f"experts.train.epochs={epochs}"])


def plan(args, table: Table) -> list[dict]:
    """Every cell of the table with what it will run and its state (done / partial / to do); computes nothing."""
    rows = []
    seen = set()
    for IF, ipc in columns(args):
        for m in args.methods.split(","):
            key = cell_key(IF, ipc, m)
            if key in seen:
                continue
            seen.add(key)
            state = "done" if (table.cells_dir / f"{key}.json").is_file() else (
                "running" if (table.cells_dir / f"{key}.lock").is_file()
                and not lock_is_stale(table.cells_dir / f"{key}.lock") else
                "partial" if (table.work / key / "checkpoint.safetensors").is_file() else "to do")
            if m in FULL_DATA:
                rows.append({"cell": key, "IF": IF, "ipc": None, "method": m, "preset": "-", "state": state,
                             "what": f"full long-tailed set, {args.full_epochs} epochs"})
                continue
            preset, cfg = method_config(args, m, IF, ipc)
            d = cfg.distill
            one_shot = getattr(DISTILLERS[d.method], "one_shot", False)
            what = f"ipc {d.ipc}, " + ("one-shot selection" if one_shot else f"{d.iterations} iterations")
            if needs_experts(m):
                what += ", phases " + ", ".join(f"{ph.name}(N={ph.syn_steps}, M={ph.expert_epochs}, "
                                                f"start<{ph.max_start_epoch}, {ph.match})" for ph in d.phases)
            if needs_experts(m):
                e = expert_config(args, IF).experts
                what += f"; experts {e.num_experts} x {e.train.epochs} epochs"
            rows.append({"cell": key, "IF": IF, "ipc": ipc, "method": m, "preset": preset, "state": state,
                         "what": what})
    return rows


def fill_experts(cfg, data, experts_dir: Path, table: Table, key: str, poll_s: float = 15.0) -> None:
    """Train this process's share of the experts, then wait until the store is complete: experts that another
    process is training are waited for, and those of a process that died are taken over and trained here.
    The wall time until the store is complete is recorded as ``cells/<key>.json`` by the process that trained in
    it and saw it complete first (a store that was complete before is not re-timed)."""
    need = {"representation": cfg.num_experts, "classifier": cfg.num_experts if cfg.classifier_experts else 0}
    t0, trained = time.time(), 0
    while True:
        res = train_experts(cfg, data, experts_dir, device=table.device, progress=False, rank=table.rank,
                            world=table.world)
        trained += sum(res["trained"].values())
        missing = {k: n - res["available"].get(k, 0) for k, n in need.items() if res["available"].get(k, 0) < n}
        if not missing:
            path = table.cells_dir / f"{key}.json"
            if trained and not path.is_file():
                save_json(path, {"seconds": time.time() - t0, "experts": need, "threads": torch.get_num_threads()})
            return
        if table.world > 1:  # under torchrun the barrier that follows does the waiting
            return
        _log(f"waiting for experts another process is training: {missing}")
        time.sleep(poll_s)


def lad_cifar10lt(args, table: Table) -> None:
    methods = args.methods.split(",")
    for IF in _ints(args.ifs):
        base = expert_config(args, IF)
        data = prepare_data(base.data)
        experts_dir = table.work / f"experts-if{IF}"
        if any(needs_experts(m) for m in methods):
            _log(f"IF {IF}: experts")
            fill_experts(base.experts, data, experts_dir, table, f"experts-if{IF}")
            barrier()
        for ipc in _ints(args.ipcs):
            for m in methods:
                key = cell_key(IF, ipc, m)
                if m in FULL_DATA:
                    proto = base.protocol_config()
                    tcfg = TrainConfig(epochs=args.full_epochs, lr=0.01, batch_size=256, schedule="cosine", dsa=True)
                    full_runs = 1 if args.profile == "cpu" else args.runs  # cpu: one seed (time)
                    table.cell(key, lambda: run_full(data, m, proto.model, tcfg, runs=full_runs, device=table.device,
                                                     crt_epochs=10))
                    continue
                _, cfg = method_config(args, m, IF, ipc)
                needs = needs_experts(m)
                table.cell(key, lambda: _distill_cell(table, cfg, data, key, experts_dir if needs else None,
                                                      args.runs))


def collect_cells(args, table: Table) -> dict:
    """{column name: {method: cell}} for the finished cells of the requested columns."""
    results: dict = {}
    for IF, ipc in columns(args):
        for m in args.methods.split(","):
            path = table.cells_dir / f"{cell_key(IF, ipc, m)}.json"
            if path.is_file():
                results.setdefault(col_name(IF, ipc), {})[m] = json.loads(path.read_text())
    return results


def _fmt(ms) -> str:
    return f"{100 * ms['mean']:.1f}±{100 * ms['std']:.1f}" if ms and ms.get("mean") is not None else "–"


def _paper(IF: int, ipc: int, method: str) -> str:
    return PAPER_LAD_C10.get(IF, {}).get(ipc, {}).get(method, "–")


def write_lad_report(args, results: dict, out_md: Path, class_names) -> None:
    cols = _filled_columns(args, results)
    methods = args.methods.split(",")
    lines = [f"# LAD Table 1 (CIFAR-10-LT) at the `{args.profile}` profile", "",
             f"Command: `{_command(args)}`  ",
             f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, device {args.device or 'auto'}; "
             f"torch threads of the processes that computed the cells: {_threads(results)}; report written "
             f"{time.strftime('%Y-%m-%d')}.", "", "Scale (what differs from the paper):", ""]
    if args.profile == "cpu":
        lines += [f"- {k}: {v}" for k, v in CPU_SCALE.items()]
    else:
        lines += [f"- {k}: {v}" for k, v in GPU_SCALE.items()]
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
    lines += _cost_lines(args, results)
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
        lines += ["", f"![per-class accuracy IF {IF} IPC {ipc}]({_perclass_png(args, IF, ipc)})"]
    lines += ["", f"![accuracy vs IF](lad-cifar10lt-{args.profile}-vs-if.png)", ""]
    lines += ["## Reading", "", _reading(results, cols), ""]
    notes = out_md.with_name(out_md.stem + "-notes.md")
    if notes.is_file():  # a hand-written analysis of this table, kept beside it
        lines += [f"Analysis of these figures (why orderings do or do not hold at this scale): [{notes.name}]({notes.name})",
                  ""]
    atomic_write_text(out_md, "\n".join(lines) + "\n")


def _threads(results: dict) -> str:
    found = sorted({r["threads"] for row in results.values() for r in row.values() if r.get("threads")})
    return ", ".join(map(str, found)) if found else "not recorded in these cells"


def _cost_lines(args, results: dict) -> list[str]:
    """Compute spent: the cells' seconds and the expert stores' wall time, per IF and in total, and the part of it
    spent on the default methods (the table the issue asks for) when other methods are present too."""
    work = work_dir(args)
    default = set(DEFAULT_METHODS.split(","))
    out, total, core = [], 0.0, 0.0
    for IF in _ints(args.ifs):
        seen, cells, core_cells = set(), 0.0, 0.0
        for ipc in _ints(args.ipcs):
            for m, r in results.get(col_name(IF, ipc), {}).items():
                if cell_key(IF, ipc, m) not in seen:
                    seen.add(cell_key(IF, ipc, m))
                    cells += r.get("seconds", 0.0)
                    is_core = m in default and (m in FULL_DATA or ipc in _ints(default_ipcs(args.profile)))
                    core_cells += r.get("seconds", 0.0) if is_core else 0.0
        exp = work / "cells" / f"experts-if{IF}.json"
        e = json.loads(exp.read_text())["seconds"] if exp.is_file() else None
        total += cells + (e or 0.0)
        core += core_cells + (e or 0.0)
        out.append(f"- IF {IF}: {len(seen)} cells {cells / 60:.0f} min (default methods at the profile's default IPC: "
                   f"{core_cells / 60:.0f} min); "
                   "expert store " + (f"{e / 60:.0f} min" if e is not None else "not timed") + ".")
    out.append(f"- Total compute (sum over processes, 1 thread each unless stated): {total / 3600:.2f} h; the default "
               f"methods ({DEFAULT_METHODS}) at IPC {default_ipcs(args.profile)} with the expert stores: {core / 3600:.2f} h.")
    return ["Cost:", ""] + out


def _filled_columns(args, results: dict) -> list[tuple[int, int]]:
    """The requested columns that have at least one finished distillation cell (full-data cells are shared by
    every IPC of an IF, so they alone do not make a column); all requested columns when none has."""
    filled = [c for c in columns(args)
              if any(m not in FULL_DATA for m in results.get(col_name(*c), {}))]
    return filled or columns(args)


def _perclass_png(args, IF: int, ipc: int) -> str:
    return f"lad-cifar10lt-{args.profile}-perclass-if{IF}-ipc{ipc}.png"


def _command(args) -> str:
    """The command line that reproduces this report (the arguments that differ from the defaults)."""
    cmd = f"python benchmarks/reproduce.py --profile {args.profile} --table {args.table}"
    if args.ifs != "10,100":
        cmd += f" --ifs {args.ifs}"
    if args.ipcs != default_ipcs(args.profile):
        cmd += f" --ipcs {args.ipcs}"
    if args.methods != DEFAULT_METHODS:
        cmd += f" --methods {args.methods}"
    for v in args.variant:
        cmd += f" --variant {v}"
    if args.runs != 3:
        cmd += f" --runs {args.runs}"
    if args.full_epochs != default_full_epochs(args.profile):
        cmd += f" --full-epochs {args.full_epochs}"
    return cmd


def _reading(results: dict, cols) -> str:
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
                         f"{100 * acc['lad']:.1f}; the paper's ablation (IF 100, IPC 50, lad.md §6.6, unverified): "
                         f"44.3 / 57.1 / 54.8 / 64.0 - 'both components are needed' "
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


def plots(args, results, out_dir: Path, class_names) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def save(fig, name: str) -> None:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(out_dir / name, buf.getvalue())

    for IF, ipc in _filled_columns(args, results):
        row = {m: r for m, r in results.get(col_name(IF, ipc), {}).items() if r}
        if not row:
            continue
        if len(row) > 10:  # a readable chart: the default methods only (every row is in the tables)
            default = DEFAULT_METHODS.split(",")
            row = {m: r for m, r in row.items() if m in default} or row
        fig, ax = plt.subplots(figsize=(10, 3.5))
        w = 0.8 / len(row)
        for i, (m, r) in enumerate(row.items()):
            ax.bar(np.arange(len(class_names)) + (i - (len(row) - 1) / 2) * w, np.array(r["summary"]["per_class"]) * 100,
                   w, label=m, color=plt.cm.tab10(i % 10))
        ax.set_xticks(range(len(class_names)))
        ax.set_xticklabels(class_names, fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"CIFAR-10-LT IF {IF}, IPC {ipc} ({args.profile} profile): per-class accuracy, head → tail")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save(fig, _perclass_png(args, IF, ipc))
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    ifs, ipcs = _ints(args.ifs), _ints(args.ipcs)
    bases = []  # one colour per base method; the variant sets the line style
    for m in args.methods.split(","):
        b = base_method(m)[0] if not m.endswith(INIT_SUFFIX) else m[: -len(INIT_SUFFIX)]
        if b not in bases:
            bases.append(b)
    for m in args.methods.split(","):
        b = base_method(m)[0] if not m.endswith(INIT_SUFFIX) else m[: -len(INIT_SUFFIX)]
        style = (":" if m.endswith(INIT_SUFFIX) else "-." if "@" in m else "--" if m in FULL_DATA
                 else (0, (5, 2)) if m in VARIANTS else "-")
        for ipc in ([None] if m in FULL_DATA else ipcs):
            xs = [IF for IF in ifs if results.get(col_name(IF, ipc or ipcs[0]), {}).get(m)]
            ys = [100 * results[col_name(IF, ipc or ipcs[0])][m]["summary"]["accuracy"]["mean"] for IF in xs]
            if xs:
                label = m if ipc is None or len(ipcs) == 1 else f"{m} IPC {ipc}"
                ax.plot(xs, ys, marker="o", linestyle=style, color=plt.cm.tab20(bases.index(b) % 20), label=label)
    ax.set_xscale("log")
    ax.set_xticks(ifs)
    ax.set_xticklabels([str(i) for i in ifs])
    ax.set_xlabel("imbalance factor")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"CIFAR-10-LT ({args.profile} profile); dotted: initial set only, dash-dot: more iterations")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(args.methods.split(",")) < 14
              else 2)
    save(fig, f"lad-cifar10lt-{args.profile}-vs-if.png")


def work_dir(args) -> Path:
    """Where a table's cells, expert stores and distilled sets live (``--work``)."""
    return Path(args.work or f"runs/reproduce/{args.table}-{args.profile}")


def default_full_epochs(profile: str) -> int:
    return 30 if profile == "cpu" else 200


def default_ipcs(profile: str) -> str:
    return "10" if profile == "cpu" else "10,50"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--table", choices=["lad-cifar10lt", "two-stage"], default="lad-cifar10lt")
    p.add_argument("--root", default=CIFAR)
    p.add_argument("--ifs", default="10,100")
    p.add_argument("--ipcs", default=None, help="images per class, comma-separated (default: 10 for cpu, 10,50 for gpu)")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--full-epochs", type=int, default=None, help="full-data epochs (default: 30 cpu, 200 gpu)")
    p.add_argument("--device", default=None)
    p.add_argument("--work", default=None)
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the finished cells; compute nothing")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PRESET:key=value,...",
                   help="a named variant of a preset, usable in --methods (repeatable); e.g. "
                        "lad-ce=lad:distill.phases.0.inner_loss=soft_ce")
    p.add_argument("--plan", action="store_true",
                   help="print every cell with its preset, scale and state (done / partial / to do); compute nothing")
    args = p.parse_args(argv)
    for v in args.variant:
        name, preset, over = parse_variant(v)
        VARIANTS[name] = (preset, over)
    if args.ipcs is None:
        args.ipcs = default_ipcs(args.profile)
    if args.full_epochs is None:
        args.full_epochs = default_full_epochs(args.profile)
    with dist_context():
        return _main(args)


def _main(args) -> int:
    if args.profile == "gpu":
        args.runs = max(args.runs, 5)
    device = resolve_device(args.device)
    table = Table(work_dir(args), device, args.profile)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.table == "two-stage":
        if args.plan or args.report_only:
            raise SystemExit("--plan and --report-only are for --table lad-cifar10lt; the two-stage table resumes "
                             "from its cells (benchmarks/two_stage_table.py)")
        from two_stage_table import two_stage_table  # noqa: E402  (benchmarks/two_stage_table.py)

        return two_stage_table(args, table, out_dir)
    if args.plan:
        rows = plan(args, table)
        for r in rows:
            print(f"{r['cell']:28s} {r['state']:8s} preset {r['preset']:24s} {r['what']}")
        print(f"{len(rows)} cells: {sum(r['state'] == 'done' for r in rows)} done, "
              f"{sum(r['state'] == 'running' for r in rows)} running, "
              f"{sum(r['state'] == 'partial' for r in rows)} partial, {sum(r['state'] == 'to do' for r in rows)} to do")
        return 0
    stem = out_dir / f"lad-cifar10lt-{args.profile}"

    def write() -> None:
        results = collect_cells(args, table)
        save_json(stem.with_suffix(".json"), {"profile": args.profile, "scale": CPU_SCALE if args.profile == "cpu"
                                              else GPU_SCALE, "command": _command(args), "paper": PAPER_LAD_C10, "results": results})
        plots(args, results, out_dir, CIFAR10_CLASSES)
        write_lad_report(args, results, stem.with_suffix(".md"), CIFAR10_CLASSES)

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


if __name__ == "__main__":
    sys.exit(main())
