"""Distribution matching: DM (Zhao & Bilen, WACV 2023).

One iteration: a freshly randomly initialised network (its seed drawn from the run's generator; never trained, only
its ``embed`` - the penultimate features - is used). For every class c, a real minibatch B_c (``batch_real`` images,
all of them when the class has fewer) and the class's synthetic images S_c get the same Siamese DSA draw; the loss

    sum_c || mean_{x in B_c} embed(DSA(x)) - mean_{s in S_c} embed(DSA(s)) ||^2

is minimised by one SGD step on the images (DM: ``lr_img`` 1.0, ``momentum_img`` 0.5, 20000 iterations, real init).

``distill.options`` (defaults in brackets):

- ``model`` [{name: convnet, args: {}}]: the embedding network (ConvNet-3, width 128);
- ``batch_real`` [256]: real images per class and iteration.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig, to_dict
from .base import register_distiller
from .gradient_matching import SyntheticImageDistiller, draw_seed

__all__ = ["DistributionMatching"]


@register_distiller("dm")
class DistributionMatching(SyntheticImageDistiller):
    OPTIONS = {"model": to_dict(ModelConfig()), "batch_real": 256}

    def fresh_network(self, seed: int) -> nn.Module:
        net = super().fresh_network(seed)
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def class_loss(self, net: nn.Module, c: int, generator: torch.Generator) -> torch.Tensor:
        real, syn = self.siamese(self.real_batch(c, generator), self.syn_batch(c), generator)
        with torch.no_grad():
            mean_real = net.embed(real).mean(0)
        mean_syn = net.embed(syn).mean(0)
        return (mean_real - mean_syn).pow(2).sum()

    def matching_loss(self, net: nn.Module, generator: torch.Generator) -> torch.Tensor:
        total = None
        for c in self.classes():
            d = self.class_loss(net, c, generator)
            total = d if total is None else total + d
        return total if total is not None else torch.zeros((), device=self.device)

    def objective(self, seed: int) -> float:
        """The loss on a fixed network and fixed real batches/augmentations (both from ``seed``); for tests and
        monitoring - it touches neither the run's generator nor the images."""
        g = torch.Generator()
        g.manual_seed(seed)
        with torch.no_grad():
            return float(self.matching_loss(self.fresh_network(seed), g))

    def step(self, iteration: int) -> dict:
        net = self.fresh_network(draw_seed(self.generator))
        loss = self.matching_loss(net, self.generator)
        self.opt_img.zero_grad(set_to_none=True)
        if loss.requires_grad:  # False only when no class has a real image
            loss.backward(inputs=[self.images])
            self.opt_img.step()
        # DM reports the loss averaged over classes
        return {"loss": float(loss.detach()) / max(1, len(self.classes()))}
