"""Coreset baselines (one-shot: the run loop takes 0 iterations): random, herding and K-center selection.

Every method writes IPC real images per class, class by class, hard labels. A class with fewer images than IPC
contributes all of them (in selection order) and is then filled by ``distill.duplicate``: repeated cyclically (the
LAD policy) or filled with N(0, 1) noise; a class without images gets noise.

- ``random``: IPC random images per class (``init_images(mode="real")``, so exactly the engine's real init).
- ``herding`` (Welling 2009; the iCaRL exemplar selection): greedily add the image whose inclusion brings the running
  mean of the selected features closest (Euclidean) to the class mean; no image is picked twice.
- ``kcenter`` (K-center greedy, Sener & Savarese 2018): start from the image closest to the class mean (``start:
  mean``; ``start: random`` draws it from the run's generator instead), then repeatedly add the image farthest from
  the selected set (largest Euclidean distance to its nearest selected image).

Ties go to the lowest index. Features are the penultimate embedding (``embed``) of ``options.feature_model``:

- ``random`` (default): a randomly initialised network ``options.model`` (default ConvNet-3 width 128) whose seed is
  drawn from the run's generator (so it follows ``distill.seed``);
- ``experts``: the final weights of the first representation expert of the store passed with ``--experts``;
- any other string: the path of an expert store (same: first representation expert's final weights; the network is
  the store's model).

``distill.options`` (herding / kcenter; ``random`` has none), defaults in brackets: ``model``
[{name: convnet, args: {}}], ``feature_model`` [random], ``feature_norm`` [none | l2: unit-length features, as iCaRL],
``feature_batch`` [512], and for kcenter ``start`` [mean].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..config import DistillConfig, ModelConfig, from_dict, to_dict
from ..errors import LtddError
from ..synset import SyntheticSet
from .base import Distiller, register_distiller
from .gradient_matching import draw_seed, model_config, seeded_model
from .init import init_images

__all__ = ["herding_select", "kcenter_select", "RandomSelection", "Herding", "KCenter", "fill_class"]


# ---- selection on a feature matrix ---------------------------------------------------------------------------


def herding_select(features: torch.Tensor, k: int) -> list[int]:
    """Greedy herding: row indices (in selection order, at most ``min(k, n)``) whose running mean tracks the mean.

    Step t picks argmin_i || mu - (sum_{j selected} f_j + f_i) / t ||^2 over the unselected rows i.
    """
    n = len(features)
    if n == 0 or k < 1:
        return []
    f = features.detach().double().reshape(n, -1)
    mu = f.mean(0)
    running = torch.zeros_like(mu)
    free = torch.ones(n, dtype=torch.bool)
    chosen: list[int] = []
    for t in range(1, min(k, n) + 1):
        dist = ((running[None] + f) / t - mu[None]).pow(2).sum(1)
        dist[~free] = float("inf")
        i = int(torch.argmin(dist))  # the first minimum: ties go to the lowest index
        chosen.append(i)
        free[i] = False
        running += f[i]
    return chosen


def kcenter_select(features: torch.Tensor, k: int, first: int | None = None) -> list[int]:
    """K-center greedy: row indices (selection order, at most ``min(k, n)``).

    The first centre is ``first`` (default: the row closest to the mean); each next one is the row whose distance
    to its nearest selected centre is largest.
    """
    n = len(features)
    if n == 0 or k < 1:
        return []
    f = features.detach().double().reshape(n, -1)
    if first is None:
        first = int(torch.argmin((f - f.mean(0)[None]).pow(2).sum(1)))
    if not 0 <= first < n:
        raise LtddError(f"first centre {first} out of range for {n} points")
    chosen = [first]
    free = torch.ones(n, dtype=torch.bool)
    free[first] = False
    nearest = (f - f[first][None]).pow(2).sum(1)
    while len(chosen) < min(k, n):
        d = nearest.clone()
        d[~free] = -1.0  # never re-pick a centre (duplicates of a centre are at distance 0 and stay eligible)
        i = int(torch.argmax(d))
        chosen.append(i)
        free[i] = False
        nearest = torch.minimum(nearest, (f - f[i][None]).pow(2).sum(1))
    return chosen


def fill_class(data, chosen: list[int], ipc: int, duplicate: bool, generator: torch.Generator):
    """IPC images of one class from the chosen train indices: cyclic duplicates or noise for the missing ones.

    Returns (images (ipc, C, H, W), sources (train index or -1 for noise))."""
    chosen = list(chosen)[:ipc]
    if chosen and len(chosen) < ipc and duplicate:
        chosen = [chosen[i % len(chosen)] for i in range(ipc)]
    shape = (ipc, data.channels, *data.im_size)
    if len(chosen) < ipc:
        block = torch.randn(shape, generator=generator)
    else:
        block = torch.empty(shape)
    sources = [-1] * ipc
    if chosen:
        block[:len(chosen)] = data.train_x[torch.tensor(chosen)].float().cpu()
        sources[:len(chosen)] = chosen
    return block, sources


# ---- distillers ------------------------------------------------------------------------------------------------


class _Coreset(Distiller):
    """Selected real images as the synthetic set; one-shot (no iterations)."""

    one_shot = True
    OPTIONS: dict = {}

    def __init__(self, cfg: DistillConfig, data, *, experts_dir=None, device=torch.device("cpu")):
        super().__init__(cfg, data, experts_dir=experts_dir, device=device)
        if cfg.ipc < 1:
            raise LtddError(f"ipc must be >= 1, got {cfg.ipc}")
        self.images = self.labels = None
        self.sources: list[int] = []

    def select(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        raise NotImplementedError

    def initialise(self) -> None:
        images, labels, sources = self.select()
        self.images, self.labels, self.sources = images, labels, list(sources)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"images": self.images, "labels": self.labels, "sources": torch.tensor(self.sources, dtype=torch.long)}

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self.images = t["images"].clone()
        self.labels = t["labels"].clone()
        self.sources = t["sources"].tolist() if "sources" in t else []

    def synthetic_set(self) -> SyntheticSet:
        return SyntheticSet(self.images, self.labels, None, None)


@register_distiller("random")
class RandomSelection(_Coreset):
    def select(self):
        return init_images(self.data, self.cfg.ipc, "real", generator=self.generator, duplicate=self.cfg.duplicate)


class _FeatureCoreset(_Coreset):
    OPTIONS = {"model": to_dict(ModelConfig()), "feature_model": "random", "feature_norm": "none",
               "feature_batch": 512}

    def __init__(self, cfg: DistillConfig, data, *, experts_dir=None, device=torch.device("cpu")):
        super().__init__(cfg, data, experts_dir=experts_dir, device=device)
        if self.opts["feature_norm"] not in ("none", "l2"):
            raise LtddError(f"unknown feature_norm '{self.opts['feature_norm']}' (known: none, l2)")
        self.model_cfg = model_config(self.opts)

    def order(self, features: torch.Tensor, k: int) -> list[int]:
        raise NotImplementedError

    def feature_network(self):
        from ..experts import TrajectoryStore
        from ..models import create_model
        from ..models.functional import ParamLayout, load_flat

        which = self.opts["feature_model"]
        if which == "random":
            return seeded_model(self.model_cfg, self.data, draw_seed(self.generator), self.device)
        root = self.experts_dir if which == "experts" else which
        if root is None:
            raise LtddError("feature_model 'experts' needs an expert store (--experts DIR)")
        store = TrajectoryStore(root)
        meta = store.meta()
        mcfg = from_dict(ModelConfig, meta["model"])
        net = create_model(mcfg.name, self.data.num_classes, self.data.channels, self.data.im_size, **mcfg.args)
        layout = ParamLayout(net)
        store.check(mcfg, self.data, layout)
        indices = store.indices("representation")
        if not indices:
            raise LtddError(f"expert store {root} has no representation experts")
        load_flat(net, layout, store.load("representation", indices[0]).final)
        return net.to(self.device)

    def embed_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        net = self.feature_network()
        net.eval()
        bs = int(self.opts["feature_batch"])

        def fn(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = [net.embed(x[i:i + bs].to(self.device)).double().cpu() for i in range(0, len(x), bs)]
            f = torch.cat(out) if out else torch.zeros(0, getattr(net, "feat_dim", 1), dtype=torch.float64)
            return F.normalize(f, dim=1) if self.opts["feature_norm"] == "l2" else f

        return fn

    def select(self):
        embed = self.embed_fn()
        ipc = self.cfg.ipc
        images, labels, sources = [], [], []
        for c in range(self.data.num_classes):
            idx = torch.nonzero(self.data.train_y == c).flatten()
            chosen = []
            if len(idx):
                picked = self.order(embed(self.data.train_x[idx]), ipc)
                chosen = idx[torch.tensor(picked, dtype=torch.long)].tolist()
            block, src = fill_class(self.data, chosen, ipc, self.cfg.duplicate, self.generator)
            images.append(block)
            labels.append(torch.full((ipc,), c, dtype=torch.long))
            sources.extend(src)
        return torch.cat(images), torch.cat(labels), sources


@register_distiller("herding")
class Herding(_FeatureCoreset):
    def order(self, features, k):
        return herding_select(features, k)


@register_distiller("kcenter")
class KCenter(_FeatureCoreset):
    OPTIONS = {**_FeatureCoreset.OPTIONS, "start": "mean"}

    def __init__(self, cfg: DistillConfig, data, *, experts_dir=None, device=torch.device("cpu")):
        super().__init__(cfg, data, experts_dir=experts_dir, device=device)
        if self.opts["start"] not in ("mean", "random"):
            raise LtddError(f"unknown kcenter start '{self.opts['start']}' (known: mean, random)")

    def order(self, features, k):
        first = None
        if self.opts["start"] == "random" and len(features):
            first = int(torch.randint(len(features), (1,), generator=self.generator))
        return kcenter_select(features, k, first)
