"""Resumable training: the whole state of a training run (weights and buffers, optimizer momentum, sampler and
augmentation random states, next epoch) in one safetensors file written atomically, and its reading.

A run resumed from the checkpoint continues exactly as the uninterrupted run would have (same batches, same
augmentations, same updates; bit for bit on CPU, where the kernels are deterministic). The file records what it belongs to (training configuration, seed, data shapes and a
digest of the labels); a checkpoint of another training is refused in one line rather than silently continued.
Nothing is unpickled: tensors are safetensors, the rest is JSON in its metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import LtddError
from .files import atomic_write_file
from .typed import material

__all__ = ["training_identity", "save_training_checkpoint", "load_training_checkpoint"]

FORMAT = "ltdd-training-checkpoint-1"


def training_identity(cfg, *, seed: int, x: torch.Tensor, y: torch.Tensor, num_classes: int, lr: float,
                      class_counts, model: nn.Module | None = None, extra: dict | None = None) -> str:
    """What a checkpoint must match to be continued: the training configuration (fields at their default left out,
    so a configuration field added later does not orphan a checkpoint), seed, learning rate, image shape, number
    of classes, the class counts the losses read, the labels themselves (a digest) and the model's parameter and
    buffer names and shapes, and ``extra`` (what else the caller's result depends on)."""
    h = hashlib.sha256()
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()} if model is not None else None
    material_ = {"train": material(cfg), "seed": int(seed), "lr": float(lr), "x_shape": list(x.shape),
                 "y_shape": list(y.shape), "y_dtype": str(y.dtype), "num_classes": int(num_classes),
                 "class_counts": [float(c) for c in np.asarray(class_counts).ravel()], "labels": h.hexdigest()[:16],
                 "model": shapes, "extra": extra}
    return hashlib.sha256(json.dumps(material_, sort_keys=True).encode()).hexdigest()[:16]


def save_training_checkpoint(path: str | Path, *, identity: str, next_epoch: int, model: nn.Module,
                             opt: torch.optim.Optimizer, params: list, generator: torch.Generator,
                             rng: np.random.Generator, seconds: float = 0.0) -> None:
    """Write the state after ``next_epoch`` epochs atomically (a kill leaves the previous checkpoint or this one);
    ``seconds``: the training seconds spent to reach it, over every run that contributed."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{i}"] = buf.detach().cpu().contiguous().clone()
    tensors["rng.augment"] = generator.get_state().clone()
    meta = {"format": FORMAT, "identity": identity, "next_epoch": str(int(next_epoch)),
            "params": str(len(params)), "numpy_rng": json.dumps(rng.bit_generator.state),
            "seconds": repr(float(seconds))}
    atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_training_checkpoint(path: str | Path, *, identity: str, model: nn.Module, opt: torch.optim.Optimizer,
                             params: list, generator: torch.Generator, rng: np.random.Generator) -> tuple[int, float]:
    """Restore the state saved at ``path`` into the given run and return ``(epoch to continue from, training seconds
    spent so far)`` (``(0, 0.0)`` when there is no checkpoint). A file that is not a training checkpoint, or one of
    another training, is an error."""
    path = Path(path)
    if not path.is_file():
        return 0, 0.0
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise LtddError(f"{path}: not a readable training checkpoint ({type(e).__name__}); remove it to start "
                        f"the training over") from None
    if meta.get("format") != FORMAT:
        raise LtddError(f"{path}: not an ltdd training checkpoint; remove it to start the training over")
    if meta.get("identity") != identity or int(meta.get("params", -1)) != len(params):
        raise LtddError(f"{path}: a checkpoint of another training (other configuration, seed or data); remove it "
                        f"to start this training over")
    device = next(model.parameters()).device
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise LtddError(f"{path}: a checkpoint of another model; remove it to start this training over") from None
    for i, p in enumerate(params):
        buf = tensors.get(f"momentum.{i}")
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.to(device)
    generator.set_state(tensors["rng.augment"])
    rng.bit_generator.state = json.loads(meta["numpy_rng"])
    return int(meta["next_epoch"]), float(meta.get("seconds", 0.0))

