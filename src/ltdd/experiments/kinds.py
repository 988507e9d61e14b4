"""What a cell computes: distil a set and evaluate it, fill an expert store, train on the full data, two-stage rows.

A method's initial set (``<method>-init``) is a distil-and-evaluate cell whose configuration has zero iterations.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import RunConfig, read_jsonl, save_json, to_dict
from ..errors import LtddError
from ..evaluate import Metrics
from .cells import Cell, CellTable, log

__all__ = ["ensure_distilled", "distill_evaluate", "hard_label_set", "fill_experts", "full_data", "ROUTINGS",
           "flat_row_metrics", "two_stage_row_metrics"]


def ensure_distilled(cfg: RunConfig, data, out: Path, *, experts_dir=None, device=None) -> float:
    """Distil into ``out`` unless it holds a finished set; an interrupted run resumes from its checkpoint.
    Returns the seconds spent here."""
    from ..distill import distill

    t0 = time.time()
    if not (out / "distilled.safetensors").is_file():
        resume = (out / "checkpoint.safetensors").is_file()
        distill(cfg, data, out, experts_dir=experts_dir, device=device, resume=resume, evaluate=False,
                progress=False)
    return time.time() - t0


def distill_evaluate(cfg: RunConfig, data, out: Path, *, experts_dir=None, runs: int, device=None) -> dict:
    """Distil (or finish distilling) the set of ``cfg`` into ``out``, then evaluate it with the config's protocol."""
    from ..distill.run import peak_memory_mb
    from ..evaluate import run_protocol
    from ..synset import SyntheticSet

    t_distill = ensure_distilled(cfg, data, out, experts_dir=experts_dir, device=device)
    syn = SyntheticSet.load(out)
    res = run_protocol(syn.images, syn.labels, data, cfg.protocol_config(), soft_labels=syn.soft_labels, lr=syn.lr,
                       device=device, runs=runs, seed=cfg.distill.seed)
    save_json(out / "eval.json", res.to_dict())
    return {"summary": res.summary, "runs": [m.to_dict() for m in res.runs], "lr": res.lr,
            "distill_seconds": t_distill, "eval_seconds": res.seconds, "seconds": t_distill + res.seconds,
            "peak_memory_mb": peak_memory_mb(torch.device(device or "cpu")), "config": cfg.distill.method}


def hard_label_set(cfg: RunConfig, data, out: Path, *, experts_dir=None, device=None) -> dict:
    """Distil a hard-label set (GM / MTT of the two-stage paper) into ``out``; returns what the report says of it:
    iterations, config, mean matching loss (and learned step size) over the first and last 10 logged iterations."""
    from ..synset import SyntheticSet

    name = out.name
    if not (out / "distilled.safetensors").is_file():
        log(f"distilling {name} ({cfg.distill.method}, {cfg.distill.iterations} iterations)"
            + (" - resuming" if (out / "checkpoint.safetensors").is_file() else ""))
    seconds = ensure_distilled(cfg, data, out, experts_dir=experts_dir, device=device)
    syn = SyntheticSet.load(out)
    if syn.soft_labels is not None:
        raise LtddError(f"{name}: this table expects hard-label distilled sets (the paper's GM / MTT)")
    recs = [r for r in read_jsonl(out / "log.jsonl") if "loss" in r] if (out / "log.jsonl").is_file() else []
    # mean matching loss over the first / last 10 logged iterations (single iterations swing with the start epoch)
    w = min(10, len(recs))
    trace = {k: {"loss": float(np.mean([r["loss"] for r in part])), "lr": part[-1 if k == "last" else 0].get("lr"),
                 "iterations": [part[0].get("iteration"), part[-1].get("iteration")]}
             for k, part in (("first", recs[:w]), ("last", recs[-w:]))} if recs else {}
    return {"lr": syn.lr, "seconds": seconds, "iterations": int(cfg.distill.iterations),
            "config": to_dict(cfg.distill), "loss_trace": trace,
            "distill_seconds_logged": float(sum(r.get("seconds", 0.0) for r in recs))}


def fill_experts(cfg, data, experts_dir: Path, table: CellTable, cell: Cell, poll_s: float = 15.0) -> dict:
    """Train this process's share of the experts, then wait until the store is complete: experts that another
    process is training are waited for, and those of a process that died are taken over and trained here.
    The wall time until the store is complete is recorded as the cell by the process that trained in it and saw it
    complete first (a store that was complete before is not re-timed). Returns the experts trained here per kind."""
    from ..experts import train_experts

    if cfg.kind == "debiased":
        need = {"observer": 1, "teacher": 1}
    else:
        need = {"representation": cfg.num_experts, "classifier": cfg.num_experts if cfg.classifier_experts else 0}
    t0, trained = time.time(), {}
    while True:
        res = train_experts(cfg, data, experts_dir, device=table.device, progress=False, rank=table.rank,
                            world=table.world)
        for k, n in res["trained"].items():
            trained[k] = trained.get(k, 0) + n
        missing = {k: n - res["available"].get(k, 0) for k, n in need.items() if res["available"].get(k, 0) < n}
        if not missing:
            if sum(trained.values()) and table.fresh(cell) is None:
                table.save(cell, {"seconds": time.time() - t0, "experts": need, "threads": torch.get_num_threads()})
            return trained
        if table.world > 1:  # under torchrun the barrier that follows does the waiting
            return trained
        log(f"waiting for experts another process is training: {missing}")
        time.sleep(poll_s)


def full_data(data, method: str, model_cfg, train_cfg, *, runs: int, device=None, crt_epochs: int = 10,
              checkpoint_dir=None) -> dict:
    """A long-tail method (erm, crt, balanced_softmax, ...) trained on the whole long-tailed set; resumable run by
    run (and within a run) with ``checkpoint_dir`` (the cell's work folder)."""
    from ..lt_methods import run_full

    return run_full(data, method, model_cfg, train_cfg, runs=runs, device=device, crt_epochs=crt_epochs,
                    checkpoint_dir=checkpoint_dir)


# ----------------------------------------------------------------------------------------------------------------
# two-stage rows, from the stored test-set logits of their networks

ROUTINGS = {"hard": ("hard", 0.0), "soft": ("soft", 0.0), "hard_prior": ("hard", 1.0), "soft_prior": ("soft", 1.0)}


def flat_row_metrics(data, logits: torch.Tensor, groups, n_train: int) -> Metrics:
    """A flat row: test metrics with the group accuracy of its predictions and its training images."""
    from ..two_stage import flat_metrics_from_logits

    return flat_metrics_from_logits(logits, data, groups, n_train)


def two_stage_row_metrics(data, groups, priors, z: torch.Tensor, intra_logits: list, n_train: int) -> Metrics:
    """Metrics of hard routing (the paper) with the other routings of the same networks (soft routing, the
    group-prior correction with tau = 1) as extra scalars: ``acc_<r>``, ``class_std_<r>``, ``worst_<r>``,
    ``group_accuracy_<r>``; plus ``within_group_accuracy`` and ``group<i>_recall`` of hard routing."""
    from ..two_stage import TwoStageClassifier, metrics_from_outputs

    clf = TwoStageClassifier(nn.Identity(), [nn.Identity() for _ in groups], groups, data.num_classes,
                             group_priors=priors)
    local = [torch.log_softmax(lg, 1) for lg in intra_logits]
    out, extra = None, {}
    for name, (routing, tau) in ROUTINGS.items():
        m = metrics_from_outputs(clf, data, z, local, routing, tau)
        extra[f"acc_{name}"] = m.accuracy
        extra[f"class_std_{name}"] = m.class_std
        extra[f"worst_{name}"] = m.worst_accuracy
        extra[f"group_accuracy_{name}"] = m.extra["group_accuracy"]
        if name == "hard":
            out = m
    recall = out.extra.pop("group_recall")
    for k in ("routing", "group_prior_tau"):
        out.extra.pop(k)
    out.extra.update({f"group{gi + 1}_recall": r for gi, r in enumerate(recall)})
    out.extra.update(extra)
    out.extra["train_images"] = int(n_train)
    out.extra["group_priors"] = [float(p) for p in priors]
    return out
