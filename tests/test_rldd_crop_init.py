"""RLDD's initialisation from teacher-scored real crops with multi-round selection (ltdd.distill.crop_init)."""

from __future__ import annotations

import pytest
import torch

from ltdd.distill.crop_init import apply_boxes, sample_boxes, select_multi_round, teacher_crop_init
from ltdd.models import create_model

from conftest import make_tiny_data

SCORES = [torch.tensor([0.9, 0.8, 0.1]), torch.tensor([0.5, 0.95]), torch.tensor([0.3])]


def test_multi_round_selection_hand_written():
    # round 1 offers image 0's 0.9, image 1's 0.95, image 2's 0.3
    assert select_multi_round(SCORES, 2) == [(1, 1), (0, 0)]
    # at most one crop per image per round: image 2's 0.3 comes before image 0's second crop (0.8)
    assert select_multi_round(SCORES, 3) == [(1, 1), (0, 0), (2, 0)]
    # round 2: image 0's 0.8, image 1's 0.5 (image 2 has no crop left)
    assert select_multi_round(SCORES, 5) == [(1, 1), (0, 0), (2, 0), (0, 1), (1, 0)]
    # round 3: image 0's last crop; then every crop is used
    assert select_multi_round(SCORES, 9) == [(1, 1), (0, 0), (2, 0), (0, 1), (1, 0), (0, 2)]
    assert select_multi_round([], 3) == []


def test_boxes_and_crops():
    g = torch.Generator().manual_seed(0)
    boxes = sample_boxes(50, 4, g, scale=(0.5, 1.0))
    area = boxes[..., 2] * boxes[..., 3]
    assert boxes.shape == (50, 4, 4) and (area <= 1.0 + 1e-9).all() and (area >= 0.5 * 0.75).all()
    assert ((boxes[..., 0] + boxes[..., 2]) <= 1 + 1e-9).all() and ((boxes[..., 1] + boxes[..., 3]) <= 1 + 1e-9).all()
    x = torch.randn(2, 3, 6, 6)
    full = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).expand(2, 1, 4)
    torch.testing.assert_close(apply_boxes(x, full), x)  # the whole image is the image
    # a central box (top = left = 1/4, half the size) of an image that is linear in the column index: output column
    # j samples input column (j + 1/2) / 2 + 2 - 1/2 = j / 2 + 7/4 (pixel centres, align_corners=False), exactly
    lin = torch.arange(8.0).expand(1, 1, 8, 8).clone()
    crop = apply_boxes(lin, torch.tensor([[[0.25, 0.25, 0.5, 0.5]]], dtype=torch.float64))
    torch.testing.assert_close(crop[0, 0], (torch.arange(8.0) / 2 + 1.75).expand(8, 8))


def _teacher(data):
    torch.manual_seed(0)
    return create_model("convnet", data.num_classes, data.channels, data.im_size, width=4, depth=1).eval()


def test_tail_class_is_filled_with_crops_of_its_own_images():
    data = make_tiny_data(counts=(12, 6, 3))
    ipc = 5
    images, labels, sources = teacher_crop_init(data, ipc, _teacher(data), torch.Generator().manual_seed(0),
                                                crops_per_image=2)
    assert labels.tolist() == sum(([c] * ipc for c in range(3)), [])
    for c in range(3):
        src = sources[c * ipc:(c + 1) * ipc]
        assert all(s >= 0 and int(data.train_y[s]) == c for s in src)  # never another class's image
    # head class: one crop per image (12 images, 5 slots); tail (3 images): rounds of at most one crop per image
    assert len(set(sources[:ipc])) == ipc
    tail = sources[2 * ipc:]
    assert sorted(set(tail)) == torch.nonzero(data.train_y == 2).flatten().tolist()
    assert max(tail.count(s) for s in tail) == 2
    assert torch.isfinite(images).all()


def test_crops_are_ranked_by_the_teacher():
    """With a teacher that scores crops by their brightness, the head class's chosen crops are the brightest of
    the per-image best crops, and each chosen image is a crop of its source."""
    data = make_tiny_data(counts=(12, 6, 3))

    class Bright(torch.nn.Module):  # logit of every class = mean brightness: log-probability is constant ...
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # ... unless class c's logit grows with the brightness
            m = x.mean((1, 2, 3))
            return torch.stack([m, torch.zeros_like(m), torch.zeros_like(m)], 1) + 0 * self.w

    ipc, k = 4, 3
    g = torch.Generator().manual_seed(5)
    images, _, sources = teacher_crop_init(data, ipc, Bright(), g, crops_per_image=k)
    pool = torch.nonzero(data.train_y == 0).flatten()
    # replay the draw: the same generator state gives the same boxes for class 0 (the first draw after the noise)
    g2 = torch.Generator().manual_seed(5)
    torch.randn(ipc, data.channels, *data.im_size, generator=g2)
    boxes = sample_boxes(len(pool), k, g2)
    crops = apply_boxes(data.train_x[pool].float(), boxes).view(len(pool), k, *data.train_x.shape[1:])
    best = crops.mean((2, 3, 4)).max(1).values  # each image's best crop (higher brightness, higher log p_0)
    expected = pool[torch.argsort(best, descending=True)[:ipc]].tolist()
    assert sources[:ipc] == expected
    for j in range(ipc):
        i = pool.tolist().index(sources[j])
        assert any(torch.allclose(images[j], crops[i, c], atol=1e-6) for c in range(k))


def test_class_without_images_gets_noise():
    data = make_tiny_data(counts=(6, 4, 3))
    data.train_y[data.train_y == 2] = 1  # class 2 has no training image left
    images, labels, sources = teacher_crop_init(data, 2, _teacher(data), torch.Generator().manual_seed(0))
    assert sources[4:] == [-1, -1] and labels[4:].tolist() == [2, 2]


@pytest.mark.parametrize("ipc", [1, 7])
def test_every_slot_filled(ipc):
    data = make_tiny_data(counts=(12, 6, 3))
    images, labels, sources = teacher_crop_init(data, ipc, _teacher(data), torch.Generator().manual_seed(1),
                                                crops_per_image=1)
    assert images.shape == (3 * ipc, 1, 8, 8) and min(sources) >= 0
