"""Initialisation of synthetic images and soft labels (lad.md §4.2–§4.3).

Images are ordered class by class, IPC per class (a balanced synthetic set).

- ``real``: IPC random real images of the class;
- ``correct``: real images that a given classifier (the first classifier expert's final weights) classifies
  correctly, scanned in a random order in batches until IPC are found;
- ``noise``: standard normal noise (in model input space).

When a class has fewer usable images than IPC, ``duplicate`` repeats the found ones cyclically (the LAD policy);
otherwise the rest is filled with noise. A class with no usable image at all gets noise.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import LtddError


def init_images(data, ipc: int, mode: str, *, generator: torch.Generator,
                classify: Callable[[torch.Tensor], torch.Tensor] | None = None, duplicate: bool = True,
                scan_batch: int = 256) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Returns (images (C*IPC, ch, H, W), labels (C*IPC,), real_index (C*IPC,) into train_x or -1 for noise)."""
    if ipc < 1:
        raise LtddError(f"ipc must be >= 1, got {ipc}")
    if mode not in ("real", "correct", "noise"):
        raise LtddError(f"unknown image init '{mode}' (known: real, correct, noise)")
    if mode == "correct" and classify is None:
        raise LtddError("image init 'correct' needs a classifier (expert)")
    shape = (ipc, data.channels, *data.im_size)
    images, labels, sources = [], [], []
    for c in range(data.num_classes):
        pool = torch.nonzero(data.train_y == c).flatten()
        pool = pool[torch.randperm(len(pool), generator=generator)]
        chosen: list[int] = []
        if mode == "real":
            chosen = pool[:ipc].tolist()
        elif mode == "correct":
            for start in range(0, len(pool), scan_batch):
                idx = pool[start:start + scan_batch]
                with torch.no_grad():
                    pred = classify(data.train_x[idx]).argmax(1).cpu()
                chosen.extend(idx[pred == c].tolist())
                if len(chosen) >= ipc:
                    break
            chosen = chosen[:ipc]
        if chosen and len(chosen) < ipc and duplicate:
            chosen = [chosen[i % len(chosen)] for i in range(ipc)]
        block = torch.randn(shape, generator=generator)
        src = [-1] * ipc
        if chosen:
            block[:len(chosen)] = data.train_x[torch.tensor(chosen)].float().cpu()
            src[:len(chosen)] = chosen
        images.append(block)
        labels.append(torch.full((ipc,), c, dtype=torch.long))
        sources.extend(src)
    return torch.cat(images), torch.cat(labels), sources


def init_soft_labels(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mode: str,
                     expert_logits: list[Callable[[torch.Tensor], torch.Tensor]] | None = None,
                     onehot_scale: float = 1.0) -> torch.Tensor:
    """Soft-label logits for the synthetic images.

    - ``experts_correct``: average the logits of only those experts that predict the image's class (lad.md §4.3);
      when none does, the logits are all zero (a uniform label);
    - ``expert``: the logits of the first expert, unfiltered;
    - ``onehot``: ``onehot_scale`` at the true class, 0 elsewhere.
    """
    if mode == "onehot":
        return torch.nn.functional.one_hot(labels, num_classes).float() * onehot_scale
    if not expert_logits:
        raise LtddError(f"soft-label init '{mode}' needs experts")
    if mode == "expert":
        with torch.no_grad():
            return expert_logits[0](images).float().cpu()
    if mode != "experts_correct":
        raise LtddError(f"unknown soft-label init '{mode}' (known: experts_correct, expert, onehot)")
    total = torch.zeros(len(images), num_classes)
    count = torch.zeros(len(images), 1)
    with torch.no_grad():
        for fn in expert_logits:
            logits = fn(images).float().cpu()
            ok = (logits.argmax(1) == labels).float().unsqueeze(1)
            total += logits * ok
            count += ok
    return total / count.clamp_min(1.0)
