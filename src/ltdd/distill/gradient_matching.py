"""Gradient matching: DC (Zhao, Mopuri & Bilen, ICLR 2021) and DSA (Zhao & Bilen, ICML 2021).

One outer iteration of the run loop (two-stage.md §4.1):

1. a freshly randomly initialised network theta_0 (its seed drawn from the run's generator);
2. ``outer_loop`` times: for every class c, a real minibatch B_c (``batch_real`` images of class c, all of them
   when the class has fewer) and the class's synthetic images S_c; with DSA the *same* Siamese augmentation
   parameters are applied to B_c and S_c. The loss is

       sum_c d(grad_theta CE(S_c; theta_t), grad_theta CE(B_c; theta_t))

   and one SGD step (``lr_img``, ``momentum_img``) is taken on the images;
3. between two outer steps the network trains on the current synthetic set for ``inner_loop`` epochs (SGD ``lr_net``,
   no momentum, batch ``batch_train``, per-sample DSA when DSA is on) with :func:`ltdd.train.train_model`.

The distance d (the DC "ours" metric) sums over layers, and within a layer over output units o, the cosine
dissimilarity ``1 - <g_o^syn, g_o^real> / (|g_o^syn| |g_o^real| + eps)`` between the gradient rows of the weight
reshaped to ``(out, -1)``. 1-D parameters (biases, norm affine parameters) are left out, so their gradients are never
computed.

``distill.options`` (defaults in brackets):

- ``model`` [{name: convnet, args: {}}]: the network (ConvNet-3, width 128) - a mapping like ``ModelConfig``;
- ``outer_loop`` / ``inner_loop`` [by IPC, DC's table: 1 -> 1/1, 10 -> 10/50, 20 -> 20/25, 30 -> 30/20,
  40 -> 40/15, 50 -> 50/10; another IPC takes the nearest listed IPC's values, ties to the smaller];
- ``lr_net`` [0.01], ``momentum_net`` [0.0]: the inner network's SGD;
- ``batch_real`` [256]: real images per class and outer step;
- ``batch_train`` [256]: synthetic minibatch of the inner network training;
- ``eps`` [1e-6]: the cosine denominator's guard.

The synthetic images start from noise or real images (``distill.image_init``; ``correct`` needs experts and is not
supported here); classes with fewer real images than IPC follow ``distill.duplicate`` (see ``init_images``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DistillConfig, ModelConfig, TrainConfig, from_dict, to_dict
from ..errors import LtddError
from ..models import create_model
from ..synset import SyntheticSet
from ..train import train_model
from .base import LOOP_FIELDS, Distiller, load_optimiser_tensors, optimiser_tensors, register_distiller
from .init import init_images

__all__ = ["GradientMatching", "DSAGradientMatching", "SyntheticImageDistiller", "gradient_match_distance",
           "layer_distance", "matched_parameters", "dc_loops", "seeded_model", "draw_seed", "model_config"]

# DC's outer_loop / inner_loop per IPC (the official code's table)
DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def dc_loops(ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop) for an IPC: DC's table, or the nearest listed IPC (ties to the smaller)."""
    if ipc in DC_LOOPS:
        return DC_LOOPS[ipc]
    nearest = min(DC_LOOPS, key=lambda k: (abs(k - ipc), k))
    return DC_LOOPS[nearest]


# ---- helpers shared by the baselines ---------------------------------------------------------------------------


def draw_seed(generator: torch.Generator) -> int:
    """A fresh integer seed drawn from (and advancing) ``generator``."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def model_config(options: dict) -> ModelConfig:
    """``options["model"]`` as a ModelConfig (default: ConvNet-3, width 128)."""
    raw = options.get("model")
    if raw is None:
        return ModelConfig()
    if isinstance(raw, str):
        return ModelConfig(raw, {})
    if not isinstance(raw, dict):
        raise LtddError(f"distill.options.model must be a mapping like {{name: convnet, args: {{width: 32}}}}, "
                        f"got {raw!r}")
    return from_dict(ModelConfig, raw, "distill.options.model")


def seeded_model(model_cfg: ModelConfig, data, seed: int, device=None) -> nn.Module:
    """A randomly initialised network whose weights depend only on ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_model(model_cfg.name, data.num_classes, data.channels, data.im_size, **model_cfg.args)
    return net.to(device or torch.device("cpu"))


def matched_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters gradient matching compares: every parameter with at least 2 dimensions (no biases/norms)."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]


def layer_distance(g_syn: torch.Tensor, g_real: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """sum over output units o of ``1 - cos(g_syn[o], g_real[o])`` (rows of the gradient reshaped to (out, -1)).

    1-D gradients (biases, norm affine parameters) give 0: they are not matched.
    """
    if g_syn.shape != g_real.shape:
        raise LtddError(f"gradient shapes differ: {tuple(g_syn.shape)} vs {tuple(g_real.shape)}")
    if g_syn.dim() < 2:
        return g_syn.new_zeros(())
    a = g_syn.reshape(g_syn.shape[0], -1)
    b = g_real.reshape(g_real.shape[0], -1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return (1.0 - cos).sum()


def gradient_match_distance(g_syn, g_real, eps: float = 1e-6) -> torch.Tensor:
    """The DC layer-wise distance summed over layers (lists of per-parameter gradients, same order)."""
    g_syn, g_real = list(g_syn), list(g_real)
    if len(g_syn) != len(g_real):
        raise LtddError(f"{len(g_syn)} synthetic vs {len(g_real)} real gradients")
    total = None
    for a, b in zip(g_syn, g_real):
        d = layer_distance(a, b, eps)
        total = d if total is None else total + d
    return total if total is not None else torch.zeros(())


# ---- the state every image-learning baseline shares ------------------------------------------------------------


class SyntheticImageDistiller(Distiller):
    """Learnable images (hard labels, no soft labels, no learned step size) with one SGD optimiser.

    Subclasses list their ``distill.options`` keys with defaults in ``OPTIONS``; unknown keys are an error.
    """

    OPTIONS: dict = {}
    READS = LOOP_FIELDS | {"image_init", "lr_img", "momentum_img", "dsa", "dsa_strategy"}
    default_init = "noise"

    @classmethod
    def reads(cls, cfg: DistillConfig) -> set[str]:
        out = super().reads(cfg)
        return out if cfg.dsa else out - {"dsa_strategy"}

    def __init__(self, cfg: DistillConfig, data, *, experts_dir=None, device=torch.device("cpu")):
        super().__init__(cfg, data, experts_dir=experts_dir, device=device)
        self.model_cfg = model_config(self.opts)
        for key in ("batch_real",):
            if key in self.opts and int(self.opts[key]) < 1:
                raise LtddError(f"distill.options.{key} must be >= 1, got {self.opts[key]}")
        self.dsa = None
        if cfg.dsa and cfg.dsa_strategy not in ("", "none"):
            from ..data.augment import DSA

            self.dsa = DSA(cfg.dsa_strategy)
        self.class_idx = [torch.nonzero(data.train_y == c).flatten() for c in range(data.num_classes)]
        self.images = None
        self.labels = None
        self.opt_img = None

    # ---- state ---------------------------------------------------------------------------------------------------
    def initialise(self) -> None:
        cfg = self.cfg
        if cfg.image_init not in ("noise", "real"):
            raise LtddError(f"method '{self.method_name}' initialises images from 'noise' or 'real', "
                            f"not '{cfg.image_init}'")
        images, labels, sources = init_images(self.data, cfg.ipc, cfg.image_init, generator=self.generator,
                                              duplicate=cfg.duplicate)
        self.init_sources = sources
        self.images = images.to(self.device).requires_grad_(True)
        self.labels = labels.to(self.device)
        self._make_optimiser()

    def _make_optimiser(self) -> None:
        self.opt_img = torch.optim.SGD([self.images], lr=self.cfg.lr_img, momentum=self.cfg.momentum_img)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images.detach().cpu(), "labels": self.labels.cpu()}
        out.update(optimiser_tensors("opt_img", self.opt_img))
        return out

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        self.images = t["images"].to(self.device).clone().requires_grad_(True)
        self.labels = t["labels"].to(self.device).clone()
        self._make_optimiser()
        load_optimiser_tensors("opt_img", self.opt_img, t)

    def synthetic_set(self) -> SyntheticSet:
        return SyntheticSet(self.images.detach().cpu(), self.labels.cpu(), None, None)

    # ---- batches -------------------------------------------------------------------------------------------------
    def fresh_network(self, seed: int) -> nn.Module:
        net = seeded_model(self.model_cfg, self.data, seed, self.device)
        net.train()
        return net

    def real_batch(self, c: int, generator: torch.Generator) -> torch.Tensor:
        """``batch_real`` random real images of class c (all of them when the class has fewer)."""
        idx = self.class_idx[c]
        n = int(self.opts["batch_real"])
        if len(idx) > n:
            idx = idx[torch.randperm(len(idx), generator=generator)[:n]]
        return self.data.train_x[idx].to(self.device)

    def syn_batch(self, c: int) -> torch.Tensor:
        ipc = self.cfg.ipc
        return self.images[c * ipc:(c + 1) * ipc]

    def siamese(self, real: torch.Tensor, syn: torch.Tensor, generator: torch.Generator):
        """The same DSA draw applied to the real and the synthetic batch (identity without DSA)."""
        if self.dsa is None:
            return real, syn
        p = self.dsa.sample(len(real), generator=generator, device=self.device, siamese=True)
        return self.dsa.apply(real, p), self.dsa.apply(syn, p)

    def classes(self) -> list[int]:
        """Classes with at least one real image (a class without any has nothing to match)."""
        return [c for c in range(self.data.num_classes) if len(self.class_idx[c])]


# ---- DC / DSA ----------------------------------------------------------------------------------------------------


@register_distiller("dc")
class GradientMatching(SyntheticImageDistiller):
    OPTIONS = {"model": to_dict(ModelConfig()), "outer_loop": None, "inner_loop": None, "lr_net": 0.01,
               "momentum_net": 0.0, "batch_real": 256, "batch_train": 256, "eps": 1e-6}

    def __init__(self, cfg: DistillConfig, data, *, experts_dir=None, device=torch.device("cpu")):
        super().__init__(cfg, data, experts_dir=experts_dir, device=device)
        outer, inner = dc_loops(cfg.ipc)
        self.outer_loop = int(self.opts["outer_loop"] if self.opts["outer_loop"] is not None else outer)
        self.inner_loop = int(self.opts["inner_loop"] if self.opts["inner_loop"] is not None else inner)
        if self.outer_loop < 1 or self.inner_loop < 0:
            raise LtddError(f"outer_loop must be >= 1 and inner_loop >= 0 (got {self.outer_loop}, {self.inner_loop})")
        self.eps = float(self.opts["eps"])
        self.inner_cfg = TrainConfig(epochs=self.inner_loop, lr=float(self.opts["lr_net"]),
                                     momentum=float(self.opts["momentum_net"]), weight_decay=0.0,
                                     batch_size=int(self.opts["batch_train"]), schedule="constant",
                                     dsa=self.dsa is not None, dsa_strategy=cfg.dsa_strategy)

    def class_loss(self, net: nn.Module, params: list[torch.Tensor], c: int, generator: torch.Generator,
                   create_graph: bool = True) -> torch.Tensor:
        """d(grad CE(S_c), grad CE(B_c)) on ``net`` (differentiable w.r.t. the images when ``create_graph``)."""
        real, syn = self.siamese(self.real_batch(c, generator), self.syn_batch(c), generator)
        y_real = torch.full((len(real),), c, dtype=torch.long, device=self.device)
        y_syn = torch.full((len(syn),), c, dtype=torch.long, device=self.device)
        g_real = torch.autograd.grad(F.cross_entropy(net(real), y_real), params)
        g_real = [g.detach() for g in g_real]
        g_syn = torch.autograd.grad(F.cross_entropy(net(syn), y_syn), params, create_graph=create_graph)
        return gradient_match_distance(g_syn, g_real, self.eps)

    def matching_loss(self, net: nn.Module, generator: torch.Generator, create_graph: bool = True) -> torch.Tensor:
        params = [p for _, p in matched_parameters(net)]
        total = None
        for c in self.classes():
            d = self.class_loss(net, params, c, generator, create_graph)
            total = d if total is None else total + d
        return total if total is not None else torch.zeros((), device=self.device)

    def objective(self, seed: int) -> float:
        """The matching loss on a fixed network and fixed real batches/augmentations (both from ``seed``); for tests
        and monitoring - it touches neither the run's generator nor the images."""
        g = torch.Generator()
        g.manual_seed(seed)
        net = self.fresh_network(seed)
        return float(self.matching_loss(net, g, create_graph=False).detach())

    def train_network(self, net: nn.Module) -> None:
        if self.inner_loop < 1:
            return
        train_model(net, self.images.detach(), self.labels, self.inner_cfg, num_classes=self.data.num_classes,
                    seed=draw_seed(self.generator))
        net.train()

    def step(self, iteration: int) -> dict:
        net = self.fresh_network(draw_seed(self.generator))
        total = 0.0
        first = 0.0
        for ol in range(self.outer_loop):
            loss = self.matching_loss(net, self.generator)
            self.opt_img.zero_grad(set_to_none=True)
            if loss.requires_grad:  # False only when no class has a real image
                loss.backward(inputs=[self.images])
                self.opt_img.step()
            value = float(loss.detach())
            total += value
            if ol == 0:
                first = value
            if ol == self.outer_loop - 1:
                break
            self.train_network(net)
        n = max(1, len(self.classes()))
        # DC reports the loss averaged over classes and outer steps
        return {"loss": total / (self.outer_loop * n), "loss_first": first / n}


@register_distiller("dsa")
class DSAGradientMatching(GradientMatching):
    """DC with Differentiable Siamese Augmentation (needs ``distill.dsa: true``)."""

    def __init__(self, cfg: DistillConfig, data, *, experts_dir=None, device=torch.device("cpu")):
        if not cfg.dsa or cfg.dsa_strategy in ("", "none"):
            raise LtddError("method 'dsa' needs distill.dsa=true and a DSA strategy (or use method 'dc')")
        super().__init__(cfg, data, experts_dir=experts_dir, device=device)
