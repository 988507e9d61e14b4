"""Full-data training on the long-tailed split: the reference rows of every results table.

Methods (all through the one training loop):
- ``erm``: plain cross-entropy, instance-balanced sampling.
- ``resample``: class-balanced re-sampling.
- ``balanced_softmax``: CE on logits + log prior (Ren et al. 2020).
- ``logit_adjust``: CE on logits + tau log prior (Menon et al. 2021, loss form).
- ``crt``: classifier re-training (Kang et al. 2020): train ERM, then re-initialise the linear classifier and
  re-train it on the frozen backbone with class-balanced sampling.

With ``checkpoint_dir``, a training is resumable: each stage keeps its state there (:mod:`ltdd.train_checkpoint`),
cRT's first stage stays until its second ends, and :func:`run_full` keeps each finished run's metrics, so a killed
multi-run row continues with the run it was in.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from .config import ModelConfig, TrainConfig, save_json
from .errors import LtddError
from .evaluate import Metrics, summarise, test_metrics
from .train import train_model

METHODS = ("erm", "resample", "balanced_softmax", "logit_adjust", "crt")


def _stage_one_config(method: str, cfg: TrainConfig) -> TrainConfig:
    if method in ("erm", "crt"):
        return dataclasses.replace(cfg, loss="ce", sampler="instance")
    if method == "resample":
        return dataclasses.replace(cfg, loss="ce", sampler="class_balanced")
    if method == "balanced_softmax":
        return dataclasses.replace(cfg, loss="balanced_softmax", sampler="instance")
    if method == "logit_adjust":
        return dataclasses.replace(cfg, loss="logit_adjust", sampler="instance")
    raise LtddError(f"unknown long-tail method '{method}' (known: {', '.join(METHODS)})")


def _checkpoint(checkpoint_dir, method: str, seed: int, stage: str) -> Path | None:
    return None if checkpoint_dir is None else Path(checkpoint_dir) / f"{method}-seed{seed}-{stage}.ckpt.safetensors"


def remove_checkpoints(checkpoint_dir, method: str, seed: int) -> None:
    """Remove what :func:`train_full` kept in ``checkpoint_dir`` for (method, seed), once its result is saved."""
    for stage in ("stage1", "stage2"):
        _checkpoint(checkpoint_dir, method, seed, stage).unlink(missing_ok=True)


def train_full(data, method: str, model_cfg: ModelConfig, cfg: TrainConfig, *, crt_epochs: int = 10,
               device=None, seed: int = 0, progress: bool = False, checkpoint_dir: str | Path | None = None,
               timing: dict | None = None):
    """Train one network on the whole long-tailed training set with ``method``; returns (model, Metrics).

    ``checkpoint_dir``: where the stages keep their resumable state; the files stay (holding the finished state)
    until the caller has saved what it makes of the network and calls :func:`remove_checkpoints`. ``timing``:
    filled with ``seconds_before``, the training seconds spent by earlier, interrupted calls."""
    from .models import create_model

    keep = checkpoint_dir is not None
    t1: dict = {}
    t2: dict = {}
    stage1 = _stage_one_config(method, cfg)
    torch.manual_seed(seed)
    model = create_model(model_cfg.name, data.num_classes, data.channels, data.im_size, **model_cfg.args)
    model = model.to(device) if device is not None else model
    train_model(model, data.train_x, data.train_y, stage1, num_classes=data.num_classes,
                class_counts=data.train_counts, seed=seed, progress=progress, desc=f"{method}",
                checkpoint=_checkpoint(checkpoint_dir, method, seed, "stage1"), keep_checkpoint=keep, timing=t1)
    if method == "crt":
        crt_stage(model, data, cfg, crt_epochs=crt_epochs, seed=seed, progress=progress,
                  checkpoint=_checkpoint(checkpoint_dir, method, seed, "stage2"), keep_checkpoint=keep, timing=t2)
    if timing is not None:
        timing["seconds_before"] = t1["seconds_before"] + t2.get("seconds_before", 0.0)
    return model, test_metrics(model, data)


def crt_stage(model, data, cfg: TrainConfig, *, crt_epochs: int = 10, seed: int = 0, progress: bool = False,
              checkpoint: str | Path | None = None, keep_checkpoint: bool = False, timing: dict | None = None):
    """cRT's second stage, in place: re-initialise the linear classifier and re-train it on the frozen backbone
    with class-balanced sampling. ``seed`` is the run's seed (stage two uses ``seed + 1``). The re-initialisation
    draws from the global torch generator, which the training loop does not use: a resumed cRT draws the same."""
    model.classifier.reset_parameters()
    stage2 = dataclasses.replace(cfg, epochs=crt_epochs, sampler="class_balanced", loss="ce",
                                 trainable="classifier", weight_decay=0.0, schedule="cosine")
    train_model(model, data.train_x, data.train_y, stage2, num_classes=data.num_classes,
                class_counts=data.train_counts, seed=seed + 1, progress=progress, desc="crt classifier",
                checkpoint=checkpoint, keep_checkpoint=keep_checkpoint, timing=timing)
    return model


def run_full(data, method: str, model_cfg: ModelConfig, cfg: TrainConfig, *, runs: int = 1, device=None,
             seed: int = 0, crt_epochs: int = 10, progress: bool = False,
             checkpoint_dir: str | Path | None = None) -> dict:
    """``runs`` networks (seeds ``seed * 1000 + r``) trained with ``method``, summarised. With ``checkpoint_dir``,
    each finished run's metrics and seconds are kept there (``<method>-run<r>.json``, with what determines them) and
    reused, and the run in progress resumes from its checkpoint."""
    from .train_checkpoint import training_identity
    from .typed import material

    results: list[Metrics] = []
    seconds = 0.0
    for r in range(runs):
        s = seed * 1000 + r
        done = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{method}-run{r}.json"
        ident = None
        if done is not None:
            ident = training_identity(cfg, seed=s, x=data.train_x, y=data.train_y, num_classes=data.num_classes,
                                      lr=cfg.lr, class_counts=data.train_counts,
                                      extra={"method": method, "model": material(model_cfg),
                                             "crt_epochs": int(crt_epochs)})
            if done.is_file():
                rec = json.loads(done.read_text())
                if rec.get("identity") == ident:
                    results.append(Metrics(**rec["metrics"]))
                    seconds += float(rec["seconds"])
                    continue
        t0 = time.time()
        timing: dict = {}
        _, m = train_full(data, method, model_cfg, cfg, crt_epochs=crt_epochs, device=device, seed=s,
                          progress=progress, checkpoint_dir=checkpoint_dir, timing=timing)
        results.append(m)
        run_s = time.time() - t0 + timing["seconds_before"]  # with the training an interrupted call did
        seconds += run_s
        if done is not None:
            save_json(done, {"identity": ident, "metrics": m.to_dict(), "seconds": run_s})
            remove_checkpoints(checkpoint_dir, method, s)
    return {"method": method, "summary": summarise(results), "runs": [m.to_dict() for m in results],
            "seconds": seconds}
