"""The ``imagefolder`` source: ``train/<class>/<image>`` and ``test/<class>/<image>`` in a folder or an archive.

The archive may be a .tar, .tar.gz, .tgz or .zip, and train/ may sit inside a top folder (e.g. the one a zip
unpacks to); ``val/`` stands in for a missing ``test/``. Decoded arrays are cached (:mod:`.decoded_cache`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ...errors import LtddError
from .base import SourceData, _require_root, register_source
from .decoded_cache import _cached, _file_stat
from .images import _decode_splits
from .tree import _hidden, _is_archive, _Tree

IMAGEFOLDER_LAYOUT = "a folder or .tar/.tar.gz/.tgz/.zip archive with train/<class>/<image> and test/<class>/<image>"


def _imagefolder_layout(names: list[str], where: str) -> tuple[str, str, str]:
    """Find ``prefix`` (possibly empty) such that ``prefix/train/<class>/...`` holds files; returns
    ``(prefix, train_dir, test_dir)`` with the dirs as full posix prefixes ending in '/'."""
    prefixes: set[tuple[str, ...]] = set()
    for n in names:
        if _hidden(n):
            continue
        parts = n.split("/")
        for i, p in enumerate(parts[:-2]):
            if p == "train":
                prefixes.add(tuple(parts[:i]))
    if not prefixes:
        raise LtddError(f"{where} has no train/ folder with class sub-folders (expected {IMAGEFOLDER_LAYOUT})")
    shortest = min(len(p) for p in prefixes)
    best = sorted(p for p in prefixes if len(p) == shortest)
    if len(best) > 1:
        shown = ", ".join("/".join(p + ("train",)) for p in best[:3])
        raise LtddError(f"{where} holds several train/ folders ({shown}); point root at one of them")
    prefix = "/".join(best[0]) + "/" if best[0] else ""
    test_dir = None
    for cand in ("test", "val"):
        d = f"{prefix}{cand}/"
        if any(n.startswith(d) and n.count("/") >= d.count("/") + 1 and not _hidden(n) for n in names):
            test_dir = d
            break
    if test_dir is None:
        raise LtddError(f"{where} has {prefix}train/ but no {prefix}test/ (or val/) folder next to it")
    return prefix, f"{prefix}train/", test_dir


def _group_by_class(names: list[str], split_dir: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        if not n.startswith(split_dir) or _hidden(n):
            continue
        rest = n[len(split_dir):]
        if "/" not in rest:
            continue  # a loose file directly in train/ is not an image of any class
        cls = rest.split("/", 1)[0]
        out.setdefault(cls, []).append(n)
    for files in out.values():
        files.sort()
    return out


def _read_imagefolder(tree: _Tree, name: str, image_size: int | None) -> SourceData:
    names = tree.names()
    _, train_dir, test_dir = _imagefolder_layout(names, str(tree.root))
    train_groups = _group_by_class(names, train_dir)
    test_groups = _group_by_class(names, test_dir)
    for split_dir, groups in ((train_dir, train_groups), (test_dir, test_groups)):
        for d in sorted(tree.dir_names):
            depth_ok = d.startswith(split_dir) and d.count("/") == split_dir.count("/") + 1
            if depth_ok and not _hidden(d[:-1]) and d[len(split_dir):-1] not in groups:
                raise LtddError(f"class folder {tree.where(d[:-1])} has no images")
    classes = sorted(train_groups)
    if not classes:
        raise LtddError(f"{tree.where(train_dir)} has no class sub-folders with images (expected {IMAGEFOLDER_LAYOUT})")
    if set(test_groups) != set(classes):
        missing = sorted(set(classes) - set(test_groups))
        extra = sorted(set(test_groups) - set(classes))
        detail = "; ".join(
            s for s in (f"missing in {test_dir}: {missing[:5]}" if missing else "",
                        f"not in {train_dir}: {extra[:5]}" if extra else "") if s
        )
        raise LtddError(f"{tree.root}: test classes differ from train classes ({detail})")

    return SourceData(name, *_decode_splits(tree, classes, train_groups, test_groups, image_size))


def _load_imagefolder_path(path: Path, name: str, image_size: int | None, cache_dir) -> SourceData:
    opts = {"image_size": image_size}
    if path.is_dir():
        tree = _Tree(path)  # the walk is needed for the fingerprint of a folder anyway
        data = _cached("imagefolder", {**tree.fingerprint(), **opts}, cache_dir,
                       lambda: _read_imagefolder(tree, name, image_size))
    else:

        def build_archive() -> SourceData:
            with _Tree(path) as tree:
                return _read_imagefolder(tree, name, image_size)

        data = _cached("imagefolder", {**_file_stat(path), **opts}, cache_dir, build_archive)
    return dataclasses.replace(data, name=name)


@register_source("imagefolder")
def _load_imagefolder(root, *, label_kind="fine", image_size=None, test_per_class=50, seed=0, cache_dir=None):
    path = _require_root(root, "imagefolder", IMAGEFOLDER_LAYOUT)
    if not path.is_dir() and not _is_archive(path):
        raise LtddError(
            f"{path} is neither a folder nor a .tar/.tar.gz/.tgz/.zip archive (expected {IMAGEFOLDER_LAYOUT})"
        )
    return _load_imagefolder_path(path, "imagefolder", image_size, cache_dir)

