"""The whole pipeline in one call: data -> experts -> distillation -> evaluation -> report.

``ltdd run`` calls this; from Python: ``run_pipeline(load_preset("quickstart"), "runs/q")``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import RunConfig, TrainConfig, save_json, save_yaml


def run_pipeline(cfg: RunConfig, out_dir: str | Path, *, device=None, echo=print, full_data: bool = True) -> dict:
    from .data import prepare_data
    from .distill import DISTILLERS, distill
    from .evaluate import format_summary
    from .experts import train_experts
    from .lt_methods import run_full
    from .report import write_report

    device = device or torch.device("cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(out / "config.yaml", cfg)
    t0 = time.time()
    data = prepare_data(cfg.data)
    save_json(out / "data.json", data.describe())
    echo(f"data: {data.name}, {len(data.train_y)} train images (counts {data.train_counts}), "
         f"{len(data.test_y)} test images")
    experts_dir = None
    method_cls = DISTILLERS.get(cfg.distill.method)
    if method_cls is not None and method_cls.needs_experts:
        experts_dir = out / "experts"
        res = train_experts(cfg.experts, data, experts_dir, device=device, progress=True)
        echo(f"experts: {res['available']} in {res['seconds']:.0f} s")
    res = distill(cfg, data, out / "distilled", experts_dir=experts_dir, device=device, resume=False)
    echo(f"distilled ({cfg.distill.method}, IPC {cfg.distill.ipc}) in {res['seconds']:.0f} s: "
         f"{format_summary(res['eval'])}")
    if full_data:
        proto = cfg.protocol_config()
        tcfg = TrainConfig(epochs=max(10, proto.train.epochs // 10), lr=0.01, batch_size=proto.train.batch_size,
                           schedule="cosine", dsa=proto.train.dsa, dsa_strategy=proto.train.dsa_strategy)
        full = run_full(data, "erm", proto.model, tcfg, runs=1, device=device)
        save_json(out / "full_data.json", full)
        echo(f"full-data ERM on the long-tailed set: {format_summary(full['summary'])}")
    report = write_report(out)
    summary = {"seconds": time.time() - t0, "report": str(report)}
    save_json(out / "summary.json", summary)
    return summary
