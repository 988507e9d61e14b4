"""Full-data training on the long-tailed split: the reference rows of every results table.

Methods (all through the one training loop):
- ``erm``: plain cross-entropy, instance-balanced sampling.
- ``resample``: class-balanced re-sampling.
- ``balanced_softmax``: CE on logits + log prior (Ren et al. 2020).
- ``logit_adjust``: CE on logits + tau log prior (Menon et al. 2021, loss form).
- ``crt``: classifier re-training (Kang et al. 2020): train ERM, then re-initialise the linear classifier and
  re-train it on the frozen backbone with class-balanced sampling.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .config import ModelConfig, TrainConfig
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


def train_full(data, method: str, model_cfg: ModelConfig, cfg: TrainConfig, *, crt_epochs: int = 10,
               device=None, seed: int = 0, progress: bool = False):
    """Train one network on the whole long-tailed training set with ``method``; returns (model, Metrics)."""
    from .models import create_model

    stage1 = _stage_one_config(method, cfg)
    torch.manual_seed(seed)
    model = create_model(model_cfg.name, data.num_classes, data.channels, data.im_size, **model_cfg.args)
    model = model.to(device) if device is not None else model
    train_model(model, data.train_x, data.train_y, stage1, num_classes=data.num_classes,
                class_counts=data.train_counts, seed=seed, progress=progress, desc=f"{method}")
    if method == "crt":
        crt_stage(model, data, cfg, crt_epochs=crt_epochs, seed=seed, progress=progress)
    return model, test_metrics(model, data)


def crt_stage(model, data, cfg: TrainConfig, *, crt_epochs: int = 10, seed: int = 0, progress: bool = False):
    """cRT's second stage, in place: re-initialise the linear classifier and re-train it on the frozen backbone
    with class-balanced sampling. ``seed`` is the run's seed (stage two uses ``seed + 1``)."""
    model.classifier.reset_parameters()
    stage2 = dataclasses.replace(cfg, epochs=crt_epochs, sampler="class_balanced", loss="ce",
                                 trainable="classifier", weight_decay=0.0, schedule="cosine")
    train_model(model, data.train_x, data.train_y, stage2, num_classes=data.num_classes,
                class_counts=data.train_counts, seed=seed + 1, progress=progress, desc="crt classifier")
    return model


def run_full(data, method: str, model_cfg: ModelConfig, cfg: TrainConfig, *, runs: int = 1, device=None,
             seed: int = 0, crt_epochs: int = 10, progress: bool = False) -> dict:
    t0 = time.time()
    results: list[Metrics] = []
    for r in range(runs):
        _, m = train_full(data, method, model_cfg, cfg, crt_epochs=crt_epochs, device=device,
                          seed=seed * 1000 + r, progress=progress)
        results.append(m)
    return {"method": method, "summary": summarise(results), "runs": [m.to_dict() for m in results],
            "seconds": time.time() - t0}
