"""From a :class:`~ltdd.config.DataConfig` to tensors: load the source, cut the long-tailed split, fit the
preprocessing on that split only, and apply the same preprocessing to the balanced test set (and the probe split)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import DataConfig
from ..errors import LtddError
from .longtail import LongTailSplit, class_groups, make_longtail, probe_split
from .cache import prepared_key, prepared_path, read_prepared, worth_caching, write_prepared
from .sources import SourceData, _resolve_cache_dir, load_source
from .transforms import Preprocessor

__all__ = ["PreparedData", "prepare_data"]


@dataclass
class PreparedData:
    name: str
    class_names: list[str]
    num_classes: int
    channels: int
    im_size: tuple[int, int]
    train_x: torch.Tensor  # float32 (N, C, H, W), model input space, long-tailed split only
    train_y: torch.Tensor  # int64
    test_x: torch.Tensor  # balanced test set, same preprocessing
    test_y: torch.Tensor
    train_counts: list[int]
    test_counts: list[int]
    split: LongTailSplit
    preprocessor: Preprocessor
    probe_x: torch.Tensor | None = None
    probe_y: torch.Tensor | None = None
    groups: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])

    def class_priors(self) -> torch.Tensor:
        """Training class frequencies ``train_counts / sum`` as float32 ``(num_classes,)``."""
        counts = torch.tensor(self.train_counts, dtype=torch.float32)
        return counts / counts.sum()

    def class_indices(self, c: int) -> torch.Tensor:
        """Positions in ``train_x`` of the images of class ``c``."""
        return torch.nonzero(self.train_y == c, as_tuple=False).flatten()

    @classmethod
    def from_tensors(cls, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     *, name: str = "tensors", class_names: list[str] | None = None,
                     num_classes: int | None = None, preprocessor: Preprocessor | None = None) -> "PreparedData":
        """Prepared data from tensors already in model space (tests, notebooks): the split is "all of train_x"
        (its class counts define the imbalance), the preprocessing is the identity unless one is given."""
        train_y, test_y = train_y.long(), test_y.long()
        k = int(num_classes or (max(int(train_y.max()), int(test_y.max())) + 1))
        counts = [int((train_y == c).sum()) for c in range(k)]
        order = sorted(range(k), key=lambda c: (-counts[c], c))
        nonzero = [c for c in counts if c > 0]
        split = LongTailSplit(indices=np.arange(len(train_y)), counts=counts, class_order=order,
                              imbalance_factor=max(nonzero) / min(nonzero) if nonzero else 1.0, profile="given",
                              seed=0, n_max=max(counts) if counts else 0)
        return cls(name=name, class_names=list(class_names or [str(c) for c in range(k)]), num_classes=k,
                   channels=int(train_x.shape[1]), im_size=(int(train_x.shape[2]), int(train_x.shape[3])),
                   train_x=train_x.float(), train_y=train_y, test_x=test_x.float(), test_y=test_y,
                   train_counts=counts, test_counts=[int((test_y == c).sum()) for c in range(k)], split=split,
                   preprocessor=preprocessor or Preprocessor(normalize=False, zca=False),
                   groups=class_groups(counts, class_order=order))

    def fingerprint(self) -> dict:
        """Dataset, split and preprocessing (:func:`ltdd.data.fingerprint.fingerprint`)."""
        from .fingerprint import fingerprint

        return fingerprint(self)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "channels": self.channels,
            "im_size": list(self.im_size),
            "train_counts": list(self.train_counts),
            "test_counts": list(self.test_counts),
            "num_train": self.num_train,
            "num_test": self.num_test,
            "num_probe": 0 if self.probe_y is None else int(self.probe_y.shape[0]),
            "imbalance_factor": float(self.split.imbalance_factor),
            "measured_imbalance": (
                max(self.train_counts) / max(1, min(self.train_counts)) if self.train_counts else None
            ),
            "n_max": int(self.split.n_max),
            "profile": self.split.profile,
            "seed": int(self.split.seed),
            "class_order": list(self.split.class_order),
            "groups": {k: list(v) for k, v in self.groups.items()},
            "transform": self.preprocessor.config(),
        }


def _counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()


_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def expand_root(root: str | None) -> str | None:
    """A dataset root with ``$VAR`` / ``${VAR}`` replaced from the environment (the packaged presets say
    ``${LTDD_DATA}/...``, so they do not depend on the working directory); an unset variable is an error naming it."""
    if root is None or "$" not in str(root):
        return root

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        value = os.environ.get(name)
        if not value:
            raise LtddError(f"data.root '{root}' needs the environment variable {name} (the folder that holds your "
                            f"datasets): set {name}=/path/to/data, or pass --set data.root=PATH")
        return value.rstrip("/")

    return _VAR.sub(sub, str(root))


def prepare_data(cfg: DataConfig, *, cache_dir=None, cache_prepared: bool | None = None) -> PreparedData:
    """Load ``cfg.dataset``, build its long-tailed split and preprocess train / test / probe tensors.

    ``cache_dir``: the data cache folder (``None``: ``$LTDD_CACHE_DIR`` or ``~/.cache/ltdd``; ``False``: no
    caching at all). ``cache_prepared``: store the fitted preprocessing and the preprocessed tensors there
    (:mod:`ltdd.data.cache`); ``None`` does so when it pays (ZCA on images as large as CIFAR's), ``True`` always,
    ``False`` never. A cached result is bit-for-bit the one computed without the cache.
    """
    imbalance = cfg.resolved_imbalance_factor()
    if cfg.label_kind not in ("fine", "coarse"):
        raise LtddError(f"label_kind must be 'fine' or 'coarse', got '{cfg.label_kind}'")
    src: SourceData = load_source(
        cfg.dataset,
        expand_root(cfg.root),
        label_kind=cfg.label_kind,
        image_size=cfg.image_size,
        test_per_class=cfg.test_per_class,
        seed=cfg.seed,
        cache_dir=cache_dir,
    )
    names = src.train.class_names
    C = len(names)
    if src.test.class_names != names:
        raise LtddError(f"dataset '{src.name}': test classes differ from train classes")
    split = make_longtail(
        src.train.labels,
        C,
        imbalance,
        max_per_class=cfg.max_per_class,
        profile=cfg.profile,
        seed=cfg.seed,
        class_order=cfg.class_order,
        class_names=names,
    )
    train_images = src.train.images[split.indices]
    train_labels = src.train.labels[split.indices]
    pidx = None
    if cfg.probe_per_class and cfg.probe_per_class > 0:
        pidx = probe_split(src.train.labels, C, split.indices, cfg.probe_per_class, seed=cfg.seed)

    pre = Preprocessor(normalize=cfg.normalize, zca=cfg.zca, zca_eps=cfg.zca_eps)
    _, h, w, channels = src.train.images.shape
    num_rows = len(train_images) + len(src.test.images) + (0 if pidx is None else len(pidx))
    folder = None if cache_prepared is False else _resolve_cache_dir(cache_dir)
    if folder is not None and not (cache_prepared or worth_caching(pre, num_rows, h * w * channels)):
        folder = None

    shapes = {"train_x": (len(train_images), channels, h, w), "test_x": (len(src.test.images), channels, h, w)}
    if pidx is not None:
        shapes["probe_x"] = (len(pidx), channels, h, w)
    hit = key = path = None
    if folder is not None:
        probe = None if pidx is None else (pidx, src.train.images[pidx], src.train.labels[pidx])
        key = prepared_key(src.name, train_images, train_labels, src.test.images, src.test.labels, split.indices,
                           pre, probe)
        path = prepared_path(folder, key)
        hit = read_prepared(path, key, shapes)
    if hit is not None:
        pre, tensors = hit
        if pre.whitener is not None:
            pre.whitener.shape = (int(channels), int(h), int(w))
    else:
        pre.fit(train_images)
        tensors = {"train_x": pre(train_images), "test_x": pre(src.test.images)}
        if pidx is not None:
            tensors["probe_x"] = pre(src.train.images[pidx])
        if folder is not None:
            write_prepared(path, key, pre, tensors)
    train_x, test_x = tensors["train_x"], tensors["test_x"]
    probe_x = tensors.get("probe_x")
    probe_y = None if pidx is None else torch.from_numpy(src.train.labels[pidx].astype(np.int64))

    train_counts = _counts(train_labels, C)
    return PreparedData(
        name=src.name,
        class_names=list(names),
        num_classes=C,
        channels=int(channels),
        im_size=(int(h), int(w)),
        train_x=train_x,
        train_y=torch.from_numpy(train_labels.astype(np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(src.test.labels.astype(np.int64)),
        train_counts=train_counts,
        test_counts=_counts(src.test.labels, C),
        split=split,
        preprocessor=pre,
        probe_x=probe_x,
        probe_y=probe_y,
        groups=class_groups(train_counts, class_order=split.class_order),
    )
