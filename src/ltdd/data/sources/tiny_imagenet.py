"""The ``tiny_imagenet`` source: Tiny-ImageNet-200 read from its official zip or folder, without re-organising it.

200 classes x 500 train images (64x64); the labelled val split (50 per class, labels from ``val_annotations.txt`` or
``val/<wnid>/`` sub-folders) is the test set; ``words.txt`` gives the class names. Decoded arrays are cached.
"""

from __future__ import annotations

from ...errors import LtddError
from .base import SourceData, _require_root, register_source
from .decoded_cache import _cached, _file_stat
from .images import _decode_splits
from .tree import _hidden, _is_archive, _Tree

TINY_LAYOUT = ("the official tiny-imagenet-200 folder or tiny-imagenet-200.zip: train/<wnid>/images/*.JPEG and "
               "val/images/*.JPEG labelled by val/val_annotations.txt (or val/<wnid>/ sub-folders)")


def _tiny_prefix(names: list[str], where: str) -> str:
    """The folder prefix ('' or 'tiny-imagenet-200/') that holds train/<wnid>/images/."""
    prefixes = set()
    for n in names:
        parts = n.split("/")
        if len(parts) >= 4 and parts[-2] == "images" and parts[-4] == "train" and not _hidden(n):
            prefixes.add("/".join(parts[:-4]))
    if not prefixes:
        raise LtddError(f"{where} has no train/<wnid>/images/ folders (expected {TINY_LAYOUT})")
    if len(prefixes) > 1:
        raise LtddError(f"{where} holds several Tiny-ImageNet trees ({', '.join(sorted(prefixes)[:3])}); "
                        "point root at one of them")
    prefix = prefixes.pop()
    return prefix + "/" if prefix else ""


def _read_text(tree: _Tree, name: str) -> str:
    for _, data in tree.read_many([name]):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise LtddError(f"{tree.where(name)} is not UTF-8 text") from None
    raise LtddError(f"cannot read {tree.where(name)}")


def _read_tiny_imagenet(tree: _Tree, image_size: int | None) -> SourceData:
    names = [n for n in tree.names() if not _hidden(n)]
    name_set = set(names)
    prefix = _tiny_prefix(names, str(tree.root))
    train: dict[str, list[str]] = {}
    for n in names:
        parts = n[len(prefix):].split("/")
        if n.startswith(prefix) and len(parts) == 4 and parts[0] == "train" and parts[2] == "images":
            train.setdefault(parts[1], []).append(n)
    classes = sorted(train)  # the order torchvision's ImageFolder gives the train folders
    wnids_file = prefix + "wnids.txt"
    if wnids_file in name_set:
        listed = [ln.strip() for ln in _read_text(tree, wnids_file).splitlines() if ln.strip()]
        if set(listed) != set(classes):
            missing = sorted(set(listed) - set(classes))
            extra = sorted(set(classes) - set(listed))
            raise LtddError(f"{tree.where(wnids_file)} and the train/ folders disagree (no train/<wnid>/images for "
                            f"{missing[:5]}; not listed: {extra[:5]})")
    val: dict[str, list[str]] = {c: [] for c in classes}
    ann = prefix + "val/val_annotations.txt"
    if ann in name_set:
        label_of: dict[str, str] = {}
        for i, line in enumerate(_read_text(tree, ann).splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise LtddError(f"{tree.where(ann)} line {i}: expected '<file>\\t<wnid>\\t...', got {line[:60]!r}")
            label_of[fields[0].strip()] = fields[1].strip()
        images = sorted(n for n in names if n.startswith(prefix + "val/images/") and n.count("/") == prefix.count("/") + 2)
        for n in images:
            base = n.rsplit("/", 1)[1]
            if base not in label_of:
                raise LtddError(f"{tree.where(n)} has no line in {tree.where(ann)}")
            wnid = label_of[base]
            if wnid not in val:
                raise LtddError(f"{tree.where(ann)} labels {base} as {wnid}, which has no train/{wnid}/ folder")
            val[wnid].append(n)
        present = {n.rsplit("/", 1)[1] for n in images}
        absent = sorted(set(label_of) - present)
        if absent:
            raise LtddError(f"{tree.where(ann)} names {len(absent)} file(s) missing from val/images/ "
                            f"(first: {absent[0]})")
    else:  # val re-organised into class folders (what upstream LAD expects): val/<wnid>/[images/]<file>
        for n in names:
            parts = n[len(prefix):].split("/")
            if n.startswith(prefix) and parts[0] == "val" and len(parts) in (3, 4) and parts[1] in val \
                    and (len(parts) == 3 or parts[2] == "images"):
                val[parts[1]].append(n)
    empty = [c for c in classes if not val[c]]
    if empty:
        raise LtddError(f"{tree.root}: no validation images for {len(empty)} class(es) (first: {empty[0]}); "
                        f"expected {TINY_LAYOUT}")
    for files in val.values():
        files.sort()
    for files in train.values():
        files.sort()
    words = {}
    if prefix + "words.txt" in name_set:
        for line in _read_text(tree, prefix + "words.txt").splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.split(",")[0].strip()
    shown = [words.get(c) or c for c in classes]
    if len(set(shown)) != len(shown):  # two synsets with one first word: keep them apart
        shown = [f"{w} ({c})" if shown.count(w) > 1 else w for w, c in zip(shown, classes)]
    train_set, test_set = _decode_splits(tree, classes, train, val, image_size, shown)
    return SourceData("tiny_imagenet", train_set, test_set)


@register_source("tiny_imagenet")
def _load_tiny_imagenet(root, *, label_kind="fine", image_size=None, test_per_class=50, seed=0, cache_dir=None):
    """Tiny-ImageNet-200: 200 classes x 500 train images (64x64); the labelled val split (50 per class) is the test
    set. Reads the official zip or folder directly (no re-organisation of val/ needed)."""
    path = _require_root(root, "tiny_imagenet", TINY_LAYOUT)
    opts = {"image_size": image_size}
    if path.is_dir():
        tree = _Tree(path)
        return _cached("tiny_imagenet", {**tree.fingerprint(), **opts}, cache_dir,
                       lambda: _read_tiny_imagenet(tree, image_size))
    if not _is_archive(path):
        raise LtddError(f"{path} is neither a folder nor a .tar/.tar.gz/.tgz/.zip archive (expected {TINY_LAYOUT})")

    def build() -> SourceData:
        with _Tree(path) as tree:
            return _read_tiny_imagenet(tree, image_size)

    return _cached("tiny_imagenet", {**_file_stat(path), **opts}, cache_dir, build)

