"""Image decoding and resizing into uint8 ``(H, W, C)`` arrays, and a tree's class-labelled files into ImageSets."""

from __future__ import annotations

import io

import numpy as np

from ...errors import LtddError
from .base import ImageSet, _one_line
from .tree import _Tree


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    gray = arr.ndim == 2 or arr.shape[-1] == 1
    im = Image.fromarray(arr.reshape(arr.shape[0], arr.shape[1]) if gray else arr)
    out = np.asarray(im.resize((size, size), Image.BILINEAR))
    return out[..., None] if gray else out


def _resize_all(images: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or (images.shape[1] == size and images.shape[2] == size):
        return images
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)
    for i in range(images.shape[0]):
        out[i] = _resize(images[i], size)
    return out


_GRAY_MODES = ("1", "L", "LA")


def _decode_image(data: bytes, where: str, image_size: int | None) -> np.ndarray:
    """Bytes of any Pillow-readable file -> uint8 (H, W, 1) for grayscale or (H, W, 3) otherwise."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = im.convert("L") if im.mode in _GRAY_MODES else im.convert("RGB")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise LtddError(f"cannot read image {where}: {_one_line(e)}") from None
    return arr[..., None] if arr.ndim == 2 else arr



def _decode_splits(tree: _Tree, classes: list[str], train_groups: dict[str, list[str]],
                   test_groups: dict[str, list[str]], image_size: int | None,
                   names: list[str] | None = None) -> tuple[ImageSet, ImageSet]:
    """Decode the files of both splits (one pass through the tree) into uint8 ImageSets labelled by the index in
    ``classes`` (shown as ``names``, default the keys); all images must have one size (or ``image_size`` resizes
    them); grey images are broadcast to RGB when any image is colour."""
    wanted = [f for c in classes for f in train_groups[c]] + [f for c in classes for f in test_groups[c]]
    decoded: dict[str, np.ndarray] = {}
    first: tuple[str, tuple[int, int]] | None = None
    for fname, data in tree.read_many(wanted):
        arr = _decode_image(data, tree.where(fname), image_size)
        if first is None:
            first = (fname, arr.shape[:2])
        elif arr.shape[:2] != first[1]:
            h, w = arr.shape[:2]
            raise LtddError(
                f"image {tree.where(fname)} is {w}x{h} but {tree.where(first[0])} is {first[1][1]}x{first[1][0]}; "
                "all images must have the same size (or set image_size to resize them)"
            )
        decoded[fname] = arr
    channels = 3 if any(a.shape[-1] == 3 for a in decoded.values()) else 1

    def build(groups: dict[str, list[str]]) -> ImageSet:
        files = [f for c in classes for f in groups[c]]
        labels = np.concatenate([np.full(len(groups[c]), i, dtype=np.int64) for i, c in enumerate(classes)])
        h, w = first[1]  # type: ignore[index]
        images = np.empty((len(files), h, w, channels), dtype=np.uint8)
        for i, f in enumerate(files):
            images[i] = decoded[f]  # a (H, W, 1) grey image broadcasts to 3 channels
        return ImageSet(images, labels, list(names or classes))

    return build(train_groups), build(test_groups)

