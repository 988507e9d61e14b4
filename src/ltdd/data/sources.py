"""Raw image sources: CIFAR-10/100 (python pickles), ImageFolder trees or archives, Tiny-ImageNet-200 in its
official layout, and scikit-learn's digits.

Every loader returns a :class:`SourceData` holding uint8 NHWC arrays for a train pool and a (balanced) test set.
Long-tailed subsampling happens later (:mod:`ltdd.data.longtail`); a source is always the full data.

Loaders are registered by name with :func:`register_source`; :func:`load_source` dispatches on the name.

Decoded arrays of the file-based sources are cached as ``.npz`` files (no pickle) in a cache folder, keyed by the
loader, the resolved source path, its size and modification time and the loader options, so the second load of a
JPEG archive takes a fraction of a second.

CIFAR pickles are read with a restricted unpickler that admits only numpy array reconstruction: a pickle that refers
to anything else (``os.system``, ``builtins.eval``, ...) is refused before any of it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import pickle
import stat as stat_mod
import tarfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..config import atomic_write_bytes
from ..errors import LtddError

__all__ = [
    "ImageSet",
    "SourceData",
    "load_source",
    "list_sources",
    "register_source",
    "default_cache_dir",
    "restricted_pickle_load",
]

CACHE_FORMAT_VERSION = 1
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")
CIFAR10_META = "batches.meta"
CIFAR100_FILES = ("train", "test")
CIFAR100_META = "meta"


# ----------------------------------------------------------------------------------------------------------------
# containers


@dataclass
class ImageSet:
    """Images as uint8 ``(N, H, W, C)`` with ``C`` 1 or 3, integer labels ``(N,)`` and the class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.class_names = [str(c) for c in self.class_names]
        if self.images.dtype != np.uint8:
            raise ValueError(f"ImageSet.images must be uint8, got {self.images.dtype}")
        if self.images.ndim != 4 or self.images.shape[-1] not in (1, 3):
            raise ValueError(f"ImageSet.images must be (N, H, W, C) with C in (1, 3), got {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"ImageSet.labels must have shape ({self.images.shape[0]},), got {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self) -> list[int]:
        """Images per class, indexed by label."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(int).tolist()


@dataclass
class SourceData:
    """A named dataset: the full train pool and the test set (same classes, same image size)."""

    name: str
    train: ImageSet
    test: ImageSet

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


# ----------------------------------------------------------------------------------------------------------------
# registry

Loader = Callable[..., SourceData]
_REGISTRY: dict[str, Loader] = {}


def register_source(name: str) -> Callable[[Loader], Loader]:
    """Decorator adding a loader ``fn(root, *, label_kind, image_size, test_per_class, seed, cache_dir)``."""

    def deco(fn: Loader) -> Loader:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_sources() -> list[str]:
    return sorted(_REGISTRY)


def load_source(
    name: str,
    root: str | Path | None = None,
    *,
    label_kind: str = "fine",
    image_size: int | None = None,
    test_per_class: int = 50,
    seed: int = 0,
    cache_dir: str | Path | None | bool = None,
) -> SourceData:
    """Load the full train pool and test set of source ``name``.

    ``cache_dir``: folder for decoded ``.npz`` caches; ``None`` means ``$LTDD_CACHE_DIR`` or ``~/.cache/ltdd``;
    ``False`` disables caching.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise LtddError(f"unknown dataset '{name}' (known: {', '.join(list_sources())})")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
        raise LtddError(f"image_size must be a positive integer, got {image_size!r}")
    return _REGISTRY[key](
        root,
        label_kind=label_kind,
        image_size=None if image_size is None else int(image_size),
        test_per_class=test_per_class,
        seed=seed,
        cache_dir=cache_dir,
    )


# ----------------------------------------------------------------------------------------------------------------
# cache


def default_cache_dir() -> Path:
    env = os.environ.get("LTDD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/ltdd").expanduser()


def _resolve_cache_dir(cache_dir: str | Path | None | bool) -> Path | None:
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir).expanduser()


def _file_stat(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cache_file(cache_dir: Path, loader: str, fingerprint: dict) -> Path:
    blob = json.dumps({"v": CACHE_FORMAT_VERSION, "loader": loader, **fingerprint}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]
    return cache_dir / f"{loader}-{digest}.npz"


def _cache_read(path: Path) -> SourceData | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(s) for s in z["class_names"].tolist()]
            name = str(z["name"].item())
            train = ImageSet(z["train_images"], z["train_labels"], names)
            test = ImageSet(z["test_images"], z["test_labels"], names)
        return SourceData(name, train, test)
    except FileNotFoundError:
        return None
    except Exception as e:  # a truncated or foreign file: rebuild it
        warnings.warn(f"ignoring unreadable data cache {path}: {e}", stacklevel=3)
        return None


def _cache_write(path: Path, data: SourceData) -> None:
    buf = io.BytesIO()
    np.savez(
        buf,
        name=np.array(data.name),
        class_names=np.array(data.train.class_names, dtype=str),
        train_images=data.train.images,
        train_labels=data.train.labels,
        test_images=data.test.images,
        test_labels=data.test.labels,
    )
    try:
        atomic_write_bytes(path, buf.getbuffer())
    except OSError as e:
        warnings.warn(f"could not write data cache {path}: {e}", stacklevel=3)


def _cached(
    loader: str, fingerprint: dict, cache_dir: str | Path | None | bool, build: Callable[[], SourceData]
) -> SourceData:
    folder = _resolve_cache_dir(cache_dir)
    if folder is None:
        return build()
    path = _cache_file(folder, loader, fingerprint)
    hit = _cache_read(path)
    if hit is not None:
        return hit
    data = build()
    _cache_write(path, data)
    return data


# ----------------------------------------------------------------------------------------------------------------
# trees: a folder, a tar archive or a zip archive, seen as a list of relative posix file names


def _is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(ARCHIVE_SUFFIXES)


def _clean_member(name: str) -> str:
    """Archive member name without leading './' or '/' components."""
    while True:
        if name.startswith("./"):
            name = name[2:]
        elif name.startswith("/"):
            name = name[1:]
        else:
            return name


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


class _Tree:
    """Read-only view of a folder or archive; names are posix paths relative to the root, regular files only."""

    def __init__(self, root: Path):
        self.root = root
        self._tar: tarfile.TarFile | None = None
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, object] = {}
        self.stats: dict[str, tuple[int, int]] = {}
        self.dir_names: set[str] = set()  # folders seen (posix, trailing '/'), to report empty class folders
        if root.is_dir():
            self.kind = "dir"
            self._walk()
        elif _is_archive(root):
            try:
                if root.name.lower().endswith(".zip"):
                    self.kind = "zip"
                    self._zip = zipfile.ZipFile(root)
                    for info in self._zip.infolist():
                        if not info.is_dir():
                            self._members[_clean_member(info.filename)] = info
                        else:
                            self.dir_names.add(_clean_member(info.filename).rstrip("/") + "/")
                else:
                    self.kind = "tar"
                    self._tar = tarfile.open(root, "r:*")
                    for m in self._tar.getmembers():
                        if m.isfile():
                            self._members[_clean_member(m.name)] = m
                        elif m.isdir():
                            self.dir_names.add(_clean_member(m.name).rstrip("/") + "/")
            except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
                self.close()
                raise LtddError(f"cannot read archive {root}: {_one_line(e)}") from None
        else:
            raise LtddError(f"{root} is neither a folder nor a .tar/.tar.gz/.tgz/.zip archive")

    def _walk(self) -> None:
        base = str(self.root)
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, base)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            if rel_dir:
                self.dir_names.add(rel_dir)
            for fn in filenames:
                if fn.startswith("."):
                    continue
                full = os.path.join(dirpath, fn)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                if stat_mod.S_ISREG(st.st_mode):
                    self.stats[rel_dir + fn] = (st.st_size, st.st_mtime_ns)

    def names(self) -> list[str]:
        return list(self.stats) if self.kind == "dir" else list(self._members)

    def where(self, name: str) -> str:
        """How to name a member in an error message."""
        if self.kind == "dir":
            return str(self.root / name)
        return f"{self.root}:{name}"

    def fingerprint(self) -> dict:
        if self.kind == "dir":
            h = hashlib.sha256()
            for name in sorted(self.stats):
                size, mtime = self.stats[name]
                h.update(f"{name}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
            return {"path": str(self.root.resolve()), "tree": h.hexdigest()}
        return _file_stat(self.root)

    def read_many(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        """Yield ``(name, bytes)`` for the wanted names, in storage order (one forward pass through a tar.gz)."""
        wanted = set(names)
        if self.kind == "dir":
            for name in sorted(wanted):
                try:
                    yield name, (self.root / name).read_bytes()
                except OSError as e:
                    raise LtddError(f"cannot read {self.root / name}: {_one_line(e)}") from None
            return
        order = [n for n in self._members if n in wanted]
        for name in order:
            try:
                if self._zip is not None:
                    data = self._zip.read(self._members[name])  # type: ignore[arg-type]
                else:
                    f = self._tar.extractfile(self._members[name])  # type: ignore[union-attr,arg-type]
                    data = f.read() if f is not None else b""
            except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise LtddError(f"cannot read {self.where(name)}: {_one_line(e)}") from None
            yield name, data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> "_Tree":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _require_root(root: str | Path | None, loader: str, layout: str) -> Path:
    if root is None or str(root).strip() == "":
        raise LtddError(f"dataset '{loader}' needs a root: {layout}")
    path = Path(root).expanduser()
    if not path.exists():
        raise LtddError(f"data root {path} does not exist (expected {layout})")
    return path


# ----------------------------------------------------------------------------------------------------------------
# images


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


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder

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


# ----------------------------------------------------------------------------------------------------------------
# Tiny-ImageNet-200 in its official layout

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


# ----------------------------------------------------------------------------------------------------------------
# CIFAR python pickles, read with a restricted unpickler


class _Refused(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray as _ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma  # type: ignore[no-redef]
    return {
        ("numpy.core.multiarray", "_reconstruct"): _ma._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _ma._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need; anything else raises before it can run."""

    def find_class(self, module: str, name: str):  # noqa: D401
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj


def restricted_pickle_load(data: bytes, where: str, loader: str = "cifar") -> object:
    """Unpickle ``data`` admitting only dict/list/str/bytes/int and numpy arrays; ``where`` names it in errors."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Refused as e:
        raise LtddError(
            f"{loader} loader refuses to load {where}: it references {e} (only numpy arrays, dicts, lists, "
            "strings and numbers are allowed in a dataset pickle)"
        ) from None
    except Exception as e:
        raise LtddError(f"cannot read {where} as a {loader} pickle: {_one_line(e)}") from None


def _get(d: dict, key: str, where: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise LtddError(f"{where} has no '{key}' entry; is it a CIFAR python batch?")


def _as_str(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)


def _cifar_batch(obj, where: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise LtddError(f"{where} does not hold a dict; is it a CIFAR python batch?")
    data = np.asarray(_get(obj, "data", where))
    labels = np.asarray(_get(obj, label_key, where), dtype=np.int64).reshape(-1)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise LtddError(
            f"{where}: expected data of shape (N, 3072) and N labels, got {data.shape} and {labels.shape[0]}"
        )
    images = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _cifar_spec(variant: str, label_kind: str):
    if variant == "cifar10":
        return CIFAR10_FOLDER, list(CIFAR10_FILES[:5]), [CIFAR10_FILES[5]], CIFAR10_META, "labels", "label_names"
    if label_kind not in ("fine", "coarse"):
        raise LtddError(f"label_kind must be 'fine' or 'coarse', got '{label_kind}'")
    return (CIFAR100_FOLDER, ["train"], ["test"], CIFAR100_META, f"{label_kind}_labels", f"{label_kind}_label_names")


def _read_cifar_pickles(read: Callable[[list[str]], dict[str, tuple[bytes, str]]], variant: str, label_kind: str,
                        image_size: int | None) -> SourceData:
    """``read(names)`` returns ``{name: (bytes, where)}`` for the batch files (relative to the batches folder)."""
    _, train_files, test_files, meta_file, label_key, names_key = _cifar_spec(variant, label_kind)
    blobs = read(train_files + test_files + [meta_file])
    meta_bytes, meta_where = blobs[meta_file]
    meta = restricted_pickle_load(meta_bytes, meta_where, variant)
    if not isinstance(meta, dict):
        raise LtddError(f"{meta_where} does not hold a dict; is it the CIFAR meta file?")
    class_names = [_as_str(v) for v in _get(meta, names_key, meta_where)]

    def part(files: list[str]) -> ImageSet:
        ims, labs = [], []
        for f in files:
            data, where = blobs[f]
            im, lab = _cifar_batch(restricted_pickle_load(data, where, variant), where, label_key)
            if lab.size and (lab.min() < 0 or lab.max() >= len(class_names)):
                raise LtddError(f"{where}: labels outside 0..{len(class_names) - 1}")
            ims.append(im)
            labs.append(lab)
        images = np.concatenate(ims) if len(ims) > 1 else ims[0]
        return ImageSet(_resize_all(images, image_size), np.concatenate(labs), class_names)

    return SourceData(variant, part(train_files), part(test_files))


def _find_cifar_dir(path: Path, variant: str) -> Path | None:
    folder, train_files, _, meta, _, _ = _cifar_spec(variant, "fine")
    for cand in (path / folder, path):
        if (cand / train_files[0]).is_file() or (cand / meta).is_file():
            return cand
    return None


def _looks_like_imagefolder_dir(path: Path) -> bool:
    if (path / "train").is_dir():
        return True
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return len(subdirs) == 1 and (subdirs[0] / "train").is_dir()


def _load_cifar(variant: str, root, label_kind: str, image_size: int | None, cache_dir) -> SourceData:
    folder, train_files, test_files, meta_file, _, _ = _cifar_spec(variant, label_kind)
    layout = (
        f"a folder holding {folder}/ ({', '.join(train_files + test_files)}, {meta_file}), that folder itself, "
        f"or an ImageFolder tree/archive with train/ and test/"
    )
    path = _require_root(root, variant, layout)
    opts = {"label_kind": label_kind, "image_size": image_size}

    def no_coarse() -> None:
        if variant == "cifar100" and label_kind != "fine":
            raise LtddError(f"{path} is an ImageFolder tree, which has only one label kind; use label_kind=fine")

    if path.is_dir():
        batches = _find_cifar_dir(path, variant)
        if batches is None:
            if _looks_like_imagefolder_dir(path):
                no_coarse()
                return _load_imagefolder_path(path, variant, image_size, cache_dir)
            raise LtddError(f"{path} holds no CIFAR batches (expected {layout})")
        files = train_files + test_files + [meta_file]
        for f in files:
            if not (batches / f).is_file():
                raise LtddError(f"{variant}: missing {batches / f} (expected {layout})")
        fp = {"files": [_file_stat(batches / f) for f in files], **opts}

        def read_dir(names: list[str]) -> dict[str, tuple[bytes, str]]:
            return {n: ((batches / n).read_bytes(), str(batches / n)) for n in names}

        return _cached(variant, fp, cache_dir, lambda: _read_cifar_pickles(read_dir, variant, label_kind, image_size))

    if not _is_archive(path):
        raise LtddError(f"{path} is neither a folder nor a .tar/.tar.gz/.tgz/.zip archive (expected {layout})")

    def build() -> SourceData:
        with _Tree(path) as tree:
            names = [n for n in tree.names() if not _hidden(n)]
            # the official archive (cifar-10-python.tar.gz) holds cifar-10-batches-py/<files>
            base = None
            for n in names:
                parts = n.split("/")
                if parts[-1] == train_files[0] and (len(parts) == 1 or parts[-2] == folder):
                    base = "/".join(parts[:-1])
                    base = base + "/" if base else ""
                    break
            if base is None:
                no_coarse()
                return _read_imagefolder(tree, variant, image_size)

            def read_archive(wanted: list[str]) -> dict[str, tuple[bytes, str]]:
                full = {base + w: w for w in wanted}
                got = {full[n]: (b, tree.where(n)) for n, b in tree.read_many(full)}
                for w in wanted:
                    if w not in got:
                        raise LtddError(f"{variant}: {path} has no {base + w} (expected {layout})")
                return got

            return _read_cifar_pickles(read_archive, variant, label_kind, image_size)

    return _cached(variant, {**_file_stat(path), **opts}, cache_dir, build)


@register_source("cifar10")
def _load_cifar10(root, *, label_kind="fine", image_size=None, test_per_class=50, seed=0, cache_dir=None):
    return _load_cifar("cifar10", root, "fine", image_size, cache_dir)


@register_source("cifar100")
def _load_cifar100(root, *, label_kind="fine", image_size=None, test_per_class=50, seed=0, cache_dir=None):
    return _load_cifar("cifar100", root, label_kind, image_size, cache_dir)


# ----------------------------------------------------------------------------------------------------------------
# digits (ships with scikit-learn, no download, no cache)


@register_source("digits")
def _load_digits(root=None, *, label_kind="fine", image_size=None, test_per_class=50, seed=0, cache_dir=None):
    from sklearn.datasets import load_digits

    size = 16 if image_size is None else int(image_size)
    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    small = np.clip(np.rint(raw * 255.0 / 16.0), 0, 255).astype(np.uint8)
    images = np.stack([_resize(im[..., None], size) for im in small])  # (N, size, size, 1)
    num_classes = 10
    test_per_class = int(test_per_class)
    if test_per_class < 0:
        raise LtddError(f"test_per_class must be >= 0, got {test_per_class}")
    test_idx = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if test_per_class >= idx.size:
            raise LtddError(
                f"digits: test_per_class={test_per_class} leaves no training images for class '{c}' "
                f"(it has {idx.size} images)"
            )
        rng = np.random.RandomState(int(seed) + c)
        test_idx.append(idx[rng.permutation(idx.size)[:test_per_class]])
    test_idx_arr = np.sort(np.concatenate(test_idx)).astype(np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[test_idx_arr] = False
    train_idx = np.flatnonzero(mask)
    names = [str(c) for c in range(num_classes)]
    return SourceData(
        "digits",
        ImageSet(np.ascontiguousarray(images[train_idx]), labels[train_idx], names),
        ImageSet(np.ascontiguousarray(images[test_idx_arr]), labels[test_idx_arr], names),
    )
