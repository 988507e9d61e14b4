"""The whole pipeline in one call: data -> experts -> distillation -> reference rows -> evaluation -> report.

``ltdd run`` calls this; from Python: ``run_pipeline(load_preset("quickstart"), "runs/q")``.

Besides the distilled set, the run evaluates the sets it should be judged against, all under the same evaluation
protocol (same network, epochs, runs and evaluation seeds):

- ``initial``: the distiller's own starting point (the same config with 0 iterations: for LAD, real images the
  classifier expert gets right with the experts' soft labels and the initial step size). Distilled minus initial is
  what the iterations themselves bought.
- ``random``: IPC random real images per class from the long-tailed training set with hard labels (the papers'
  "Random" row; the library's random coreset, so a class with fewer than IPC images is repeated cyclically exactly
  as the distiller's initialisation does).
- ``full``: the whole long-tailed training set with hard labels (plain cross-entropy, instance sampling).

The rows go to ``comparison.json`` in the run folder (and into the report); the last line printed reads them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from .config import DistillConfig, RunConfig, save_json, save_yaml, to_dict

COMPARISON = "comparison.json"


def method_label(cfg: DistillConfig) -> str:
    """A reader's name for a distillation config: trajectory matching is LAD when it matches classifier experts or
    uses the class-frequency-weighted (DAM) inner loss, DATM when it learns soft labels, else MTT."""
    if cfg.method != "tm":
        return cfg.method.upper() if cfg.method in ("dc", "dsa", "dm") else cfg.method
    if any(ph.store == "classifier" or ph.inner_loss == "dam" for ph in cfg.phases):
        return "LAD"
    return "DATM" if cfg.soft_labels else "MTT"


def initial_config(cfg: RunConfig) -> RunConfig:
    """The same run stopped before its first iteration: the distiller's own initial set."""
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, iterations=0))


def random_config(cfg: RunConfig) -> RunConfig:
    """IPC random real images per class with hard labels, same seed and duplication policy as ``cfg``."""
    d = cfg.distill
    rnd = DistillConfig(method="random", ipc=d.ipc, duplicate=d.duplicate, seed=d.seed)  # what 'random' reads
    return dataclasses.replace(cfg, distill=rnd)


def label_mode(cfg: DistillConfig, which: str) -> str:
    """How a row's set is labelled (and which step size it is evaluated with)."""
    if which == "random":
        return "hard labels"
    if which == "full":
        return "hard labels (every training image)"
    if cfg.method == "rldd":  # its teacher's logits on the images, the protocol's step size
        return "teacher soft labels (the initial crops')" if which == "initial" else "teacher soft labels"
    if cfg.method != "tm":  # coresets, DC, DSA, DM: hard labels, the protocol's step size
        return "hard labels"
    if which == "initial":
        lab = f"expert soft labels ({cfg.label_init}, not learned)" if cfg.soft_labels else "hard labels"
        return f"{lab}, step size {cfg.lr_init:g}"
    return f"{'learned soft labels' if cfg.soft_labels else 'hard labels'}, learned step size"


def full_data_eval(data, cfg: RunConfig, *, device=None, runs: int | None = None) -> dict:
    """The evaluation protocol run on the whole long-tailed training set (hard labels, the protocol's lr)."""
    from .evaluate import run_protocol

    proto = cfg.protocol_config()
    res = run_protocol(data.train_x, data.train_y, data, proto, device=device, seed=cfg.distill.seed, runs=runs)
    out = res.to_dict()
    out.update({"method": "erm", "labels": label_mode(cfg.distill, "full"), "images": int(len(data.train_y)),
                "protocol": to_dict(proto)})
    return out


def _row(key: str, name: str, labels: str, images: int, path: str, summary: dict, seconds, lr=None) -> dict:
    return {"key": key, "name": name, "labels": labels, "images": images, "path": path, "summary": summary,
            "seconds": seconds, "lr": lr}


def _acc(row: dict) -> float:
    return 100 * row["summary"]["accuracy"]["mean"]


def reading(rows: list[dict], ipc: int, iterations: int | None = None) -> list[str]:
    """The comparison in words: the headline (distilled vs random real vs full data), then the gains in points
    over random real images and over the distiller's own initial set (what the iterations added)."""
    by = {r["key"]: r for r in rows}
    d = by.get("distilled")
    if d is None:
        return []
    runs = d["summary"]["runs"]
    parts = [f"distilled {ipc} image{'s' if ipc != 1 else ''}/class: {_acc(d):.1f} %"]
    if "random" in by:
        parts.append(f"random real {_acc(by['random']):.1f} %")
    if "full" in by:
        parts.append(f"full data {_acc(by['full']):.1f} %")
    lines = [" vs ".join(parts) + f" (test accuracy, mean of {runs} run{'s' if runs != 1 else ''})"]
    gains = []
    if "random" in by:
        gains.append(f"{_acc(d) - _acc(by['random']):+.1f} points over random real images")
    if "initial" in by:
        its = f"the {iterations} iterations" if iterations else "the iterations"
        gains.append(f"{_acc(d) - _acc(by['initial']):+.1f} over its own initial set ({_acc(by['initial']):.1f} %, "
                     f"{by['initial']['labels']}), which is what {its} added")
    if gains:
        lines.append("distilled set: " + "; ".join(gains))
    return lines


SMALL_IMAGE_VALUES = 1024  # images with at most this many values (e.g. 16x16 grey) run on one CPU thread


def cpu_threads_for(data, device) -> int | None:
    """The intra-op thread count a run should use, or None to leave torch's default.

    On CPU, images as small as the quick start's (16x16 grey) make every tensor op too small for intra-op threads
    to pay off: measured on 2 cores, a distillation iteration took 0.12 s on one thread and 0.31-0.54 s on two
    (more under load), so such runs use one thread unless OMP_NUM_THREADS says otherwise."""
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    values = data.channels * data.im_size[0] * data.im_size[1]
    return 1 if values <= SMALL_IMAGE_VALUES else None


def run_pipeline(cfg: RunConfig, out_dir: str | Path, *, device=None, echo=print, full_data: bool = True,
                 baselines: bool = True) -> dict:
    """Data, experts (when the method needs them), distillation, the reference rows (``baselines``: initial set
    and random real images; ``full_data``: the whole training set), report. Returns a summary dict."""
    from .data import prepare_data

    device = device or torch.device("cpu")
    data = prepare_data(cfg.data)
    threads, before = cpu_threads_for(data, device), torch.get_num_threads()
    if threads is not None and threads != before:
        echo(f"CPU: {threads} thread for these {data.im_size[0]}x{data.im_size[1]} images (faster than "
             f"{before} for tensors this small; set OMP_NUM_THREADS to choose)")
        torch.set_num_threads(threads)
    try:
        return _run(cfg, data, out_dir, device=device, echo=echo, full_data=full_data, baselines=baselines)
    finally:
        torch.set_num_threads(before)


def _run(cfg: RunConfig, data, out_dir, *, device, echo, full_data: bool, baselines: bool) -> dict:
    from .distill import DISTILLERS, distill
    from .evaluate import format_summary
    from .experts import train_experts
    from .report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(out / "config.yaml", cfg)
    t0 = time.time()
    save_json(out / "data.json", data.describe())
    echo(f"data: {data.name}, {len(data.train_y)} train images (counts {data.train_counts}), "
         f"{len(data.test_y)} test images")
    experts_dir = None
    dcfg = cfg.distill
    method_cls = DISTILLERS.get(dcfg.method)
    if method_cls is not None and method_cls.needs_experts:
        experts_dir = out / "experts"
        res = train_experts(cfg.experts, data, experts_dir, device=device, progress=True)
        echo(f"experts: {res['available']} in {res['seconds']:.0f} s")
    name = method_label(dcfg)
    n_syn = dcfg.ipc * data.num_classes
    res = distill(cfg, data, out / "distilled", experts_dir=experts_dir, device=device, resume=False)
    ev = json.loads((out / "distilled" / "eval.json").read_text())
    rows = [_row("distilled", f"distilled ({name})", label_mode(dcfg, "distilled"), n_syn, "distilled/eval.json",
                 res["eval"], res["seconds"], ev.get("lr"))]
    echo(f"distilled ({name}, IPC {dcfg.ipc}, {rows[0]['labels']}) in {res['seconds']:.0f} s: "
         f"{format_summary(res['eval'])}")
    one_shot = bool(getattr(method_cls, "one_shot", False))
    if baselines and not one_shot and dcfg.iterations > 0:
        r0 = distill(initial_config(cfg), data, out / "initial", experts_dir=experts_dir, device=device,
                     progress=False)
        ev0 = json.loads((out / "initial" / "eval.json").read_text())
        rows.append(_row("initial", f"initial set of {name} (iteration 0)", label_mode(dcfg, "initial"), n_syn,
                         "initial/eval.json", r0["eval"], ev0["seconds"], ev0.get("lr")))
        echo(f"{rows[-1]['name']}, {rows[-1]['labels']}: {format_summary(r0['eval'])}")
    if baselines and dcfg.method != "random":
        rr = distill(random_config(cfg), data, out / "random_real", device=device, progress=False)
        evr = json.loads((out / "random_real" / "eval.json").read_text())
        rows.append(_row("random", "random real images", label_mode(dcfg, "random"), n_syn, "random_real/eval.json",
                         rr["eval"], evr["seconds"], evr.get("lr")))
        echo(f"random real images, {dcfg.ipc}/class, hard labels: {format_summary(rr['eval'])}")
    if full_data:
        proto = cfg.protocol_config()
        echo(f"full data: {proto.runs} networks x {proto.train.epochs} epochs on all {len(data.train_y)} training "
             "images (the protocol's own schedule, so the comparison is fair; the slowest row on large data)")
        full = full_data_eval(data, cfg, device=device)
        save_json(out / "full_data.json", full)
        rows.append(_row("full", "full data (ERM)", full["labels"], full["images"], "full_data.json",
                         full["summary"], full["seconds"], full.get("lr")))
        echo(f"full data ({full['images']} images, hard labels, same protocol): {format_summary(full['summary'])}")
    lines = reading(rows, dcfg.ipc, res.get("iterations"))
    save_json(out / COMPARISON, {"method": name, "ipc": dcfg.ipc, "protocol": to_dict(cfg.protocol_config()),
                                 "eval_seed": dcfg.seed, "rows": rows, "reading": lines})
    report = write_report(out)
    summary = {"seconds": time.time() - t0, "report": str(report), "reading": lines,
               "accuracy": {r["key"]: r["summary"]["accuracy"]["mean"] for r in rows}}
    save_json(out / "summary.json", summary)
    for line in lines[1:] + lines[:1]:  # the headline last
        echo(line)
    return summary
