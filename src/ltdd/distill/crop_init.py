"""RLDD's initialisation from confidence-ranked real crops (beyond-lad.md §1.3).

Every real image of a class gets K random crops (a random-resized crop: area fraction ~ U(scale), aspect ratio
log-uniform in ``ratio``, position uniform, resized back to the image size with bilinear sampling, in model input
space). Each crop is scored by the teacher's negative cross-entropy on the image's true class, i.e. its
log-probability ``log softmax(teacher(crop))_c``. Then, per class, multi-round selection (:func:`select_multi_round`):
each round every real image offers its best crop not yet used; the top-scoring offers fill the remaining slots; repeat
until IPC crops are chosen. A head class is filled in one round by the best crops of its best images (at most one
per image); a tail class with n < IPC images takes every image's best crop, then every image's second best, and so
on - always crops of its own images. So that the rounds never run dry, a class draws max(K, ceil(IPC / n)) crops per
image. A class without training images is filled with N(0, 1) noise (as the other initialisations do).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LtddError

__all__ = ["sample_boxes", "apply_boxes", "select_multi_round", "teacher_crop_init"]


def sample_boxes(n: int, k: int, generator: torch.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> Tensor:
    """(n, k, 4) crop boxes (top, left, height, width) as fractions of the image."""
    lo, hi = float(scale[0]), float(scale[1])
    if not 0 < lo <= hi <= 1:
        raise LtddError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {list(scale)}")
    if not 0 < ratio[0] <= ratio[1]:
        raise LtddError(f"crop ratio must satisfy 0 < lo <= hi, got {list(ratio)}")
    u = torch.rand(n, k, 4, generator=generator, dtype=torch.float64)
    area = lo + (hi - lo) * u[..., 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    top = (1 - h) * u[..., 2]
    left = (1 - w) * u[..., 3]
    return torch.stack([top, left, h, w], -1)


def apply_boxes(x: Tensor, boxes: Tensor) -> Tensor:
    """Crops of ``x`` (n, C, H, W) at ``boxes`` (n, k, 4), each resized to (H, W): (n * k, C, H, W), image-major."""
    n, k = boxes.shape[:2]
    b = boxes.reshape(n * k, 4).to(x.device, x.dtype)
    top, left, h, w = b.unbind(1)
    theta = torch.zeros(n * k, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = w  # output x in [-1, 1] -> input x = centre + w * x (align_corners=False: edges at -1 / 1)
    theta[:, 0, 2] = 2 * (left + w / 2) - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * (top + h / 2) - 1
    src = x.repeat_interleave(k, 0)
    grid = F.affine_grid(theta, list(src.shape), align_corners=False)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


def select_multi_round(scores: list[Tensor], ipc: int) -> list[tuple[int, int]]:
    """Multi-round selection: (image, crop) pairs in selection order, at most ``ipc``.

    ``scores[i]`` holds the scores of image i's crops. Each round every image with a crop left offers its best unused
    one; the offers are ranked by score (ties: lower image index first) and the best fill the remaining slots.
    Fewer than ``ipc`` pairs come back only when every crop has been used.
    """
    order = [torch.argsort(s.double(), descending=True, stable=True).tolist() for s in scores]
    nxt = [0] * len(scores)
    chosen: list[tuple[int, int]] = []
    while len(chosen) < ipc:
        offers = [(float(scores[i][order[i][nxt[i]]]), i) for i in range(len(scores)) if nxt[i] < len(order[i])]
        if not offers:
            break
        offers.sort(key=lambda t: (-t[0], t[1]))
        for _, i in offers[:ipc - len(chosen)]:
            chosen.append((i, order[i][nxt[i]]))
            nxt[i] += 1
    return chosen


@torch.no_grad()
def teacher_crop_init(data, ipc: int, teacher: nn.Module, generator: torch.Generator, *, crops_per_image: int = 5,
                      scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), batch_size: int = 512, device=None):
    """(images (C*IPC, ch, H, W) class by class, labels, sources): ``sources[j]`` is the train index the crop came
    from, or -1 for noise."""
    if ipc < 1:
        raise LtddError(f"ipc must be >= 1, got {ipc}")
    if crops_per_image < 1:
        raise LtddError(f"crops_per_image must be >= 1, got {crops_per_image}")
    device = device or next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    images, labels, sources = [], [], []
    for c in range(data.num_classes):
        pool = torch.nonzero(data.train_y == c).flatten()
        block = torch.randn(ipc, data.channels, *data.im_size, generator=generator)
        src = [-1] * ipc
        if len(pool):
            k = max(int(crops_per_image), math.ceil(ipc / len(pool)))
            boxes = sample_boxes(len(pool), k, generator, scale, ratio)
            per_chunk = max(1, batch_size // k)
            scores = []
            for s in range(0, len(pool), per_chunk):
                crops = apply_boxes(data.train_x[pool[s:s + per_chunk]].float(), boxes[s:s + per_chunk])
                logp = F.log_softmax(teacher(crops.to(device)).float(), 1)[:, c].cpu()
                scores.extend(logp.view(-1, k).unbind(0))
            picks = select_multi_round(scores, ipc)
            for j, (i, crop) in enumerate(picks):
                block[j] = apply_boxes(data.train_x[pool[i:i + 1]].float(), boxes[i:i + 1, crop:crop + 1])[0].cpu()
                src[j] = int(pool[i])
        images.append(block)
        labels.append(torch.full((ipc,), c, dtype=torch.long))
        sources.extend(src)
    teacher.train(was_training)
    return torch.cat(images), torch.cat(labels), sources
