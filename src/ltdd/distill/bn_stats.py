"""Class-fair batch-norm statistics (RLDD, beyond-lad.md §1.2) and the BN-matching loss of its recovery (§1.4).

**The pass.** The frozen observer (eval mode: its layers normalise with their own running statistics, so every
layer sees what it sees at inference) runs once over the long-tailed train set. At every batch-norm layer l the
input activations ``a`` (N, ch, H, W) of each class c update exact cumulative per-class moments with the dynamic
momentum ``alpha_t^c = B_t^c / (N_{t-1}^c + B_t^c)`` (B_t^c: the batch's images of class c, N_{t-1}^c: those seen
before)::

    mu^c  <- mu^c + alpha (m_b - mu^c)
    var^c <- (1 - alpha) var^c + alpha v_b + alpha (1 - alpha) (m_b - mu^c_old)^2

where m_b, v_b are the batch's class-c mean and (biased) variance over its images and spatial positions. This is
the exact pooled mean / variance of every class-c activation seen so far (Chan et al.'s merge), so the result does
not depend on the order of the pass or its batch size, and every sample counts once. Sums run in float64.

**The targets.** Per class: (mu_l^c, var_l^c) as above ("sigma" is the variance throughout, as BN's
``running_var``). The recovery target is the uniform average over the classes that have training images::

    mu_l = (1/C) sum_c mu_l^c,     var_l = (1/C) sum_c var_l^c              (``variance: class_mean``, the spec's
                                                                             "sigma likewise")

``variance: mixture`` instead takes the variance of the class-balanced mixture, ``(1/C) sum_c [var_l^c +
(mu_l^c - mu_l)^2]`` (what a batch with the same number of images of every class has in expectation). The ablation
target (``running_targets``) is the observer's own running statistics, accumulated over the long-tailed stream.

**The loss.** For a batch S of synthetic images with labels y, at every BN layer l, with mean / var over the batch's
images and positions::

    L_global = sum_l ||mu_l(S) - mu_l||_2 + ||var_l(S) - var_l||_2
    L_class  = (1/|C_S|) sum_{c in C_S} sum_l ||mu_l(S_c) - mu_l^c||_2 + ||var_l(S_c) - var_l^c||_2

(C_S: the classes of the batch that have training images; the class-wise term is averaged over them so that it is
on the scale of the global one.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LtddError

__all__ = ["ClassMoments", "bn_layers", "capture_bn_inputs", "class_bn_moments", "fair_targets", "running_targets",
           "bn_matching_loss", "VARIANCES"]

VARIANCES = ("class_mean", "mixture")


@dataclass
class ClassMoments:
    """Exact cumulative per-class moments of one layer's input channels (float64)."""

    count: Tensor  # (C,) images seen per class
    mean: Tensor  # (C, ch)
    var: Tensor  # (C, ch), biased, over images and spatial positions

    @classmethod
    def zeros(cls, num_classes: int, channels: int) -> "ClassMoments":
        z = torch.zeros(num_classes, channels, dtype=torch.float64)
        return cls(torch.zeros(num_classes, dtype=torch.float64), z.clone(), z.clone())

    def update(self, a: Tensor, y: Tensor) -> None:
        """Fold in a batch of activations ``a`` (B, ch, ...) with labels ``y`` (B,)."""
        a = a.detach().to(device="cpu", dtype=torch.float64)
        y = y.detach().cpu()
        flat = a.reshape(a.shape[0], a.shape[1], -1)
        m_i = flat.mean(-1)  # per image and channel
        v_i = flat.var(-1, unbiased=False)
        onehot = F.one_hot(y, self.count.numel()).to(torch.float64)  # (B, C)
        b = onehot.sum(0)
        m_b = (onehot.t() @ m_i) / b.clamp_min(1.0)[:, None]
        # within-class variance of the batch: mean of the images' own variances plus the spread of their means
        v_b = (onehot.t() @ (v_i + (m_i - m_b[y]).square())) / b.clamp_min(1.0)[:, None]
        alpha = (b / (self.count + b).clamp_min(1.0))[:, None]  # the dynamic momentum; 0 for absent classes
        delta = m_b - self.mean
        self.mean = self.mean + alpha * delta
        self.var = (1 - alpha) * self.var + alpha * v_b + alpha * (1 - alpha) * delta.square()
        self.count = self.count + b


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's batch-norm layers by name (in module order)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@contextmanager
def capture_bn_inputs(model: nn.Module):
    """Within the block, ``store[name]`` is the input of BN layer ``name`` in the last forward (differentiable)."""
    store: dict[str, Tensor] = {}
    handles = []
    for name, m in bn_layers(model).items():
        def hook(_mod, inputs, name=name):
            store[name] = inputs[0]

        handles.append(m.register_forward_pre_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def class_bn_moments(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int = 512,
                     device=None) -> dict[str, ClassMoments]:
    """One pass of the frozen ``model`` (eval mode) over (x, y) in the given order and batch size: the exact
    per-class moments of every BN layer's input."""
    layers = bn_layers(model)
    if not layers:
        raise LtddError("the observer has no batch-norm layers: class-fair statistics need BN (use e.g. resnet32 or "
                        "convnet with norm: batchnorm)")
    if batch_size < 1:
        raise LtddError(f"stats batch size must be >= 1, got {batch_size}")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    moments = {n: ClassMoments.zeros(num_classes, m.num_features) for n, m in layers.items()}
    try:
        with capture_bn_inputs(model) as store:
            for i in range(0, len(x), batch_size):
                yb = y[i:i + batch_size]
                model(x[i:i + batch_size].to(device))
                for n, mom in moments.items():
                    mom.update(store[n], yb)
    finally:
        model.train(was_training)
    return moments


def fair_targets(moments: dict[str, ClassMoments], variance: str = "class_mean") -> dict[str, tuple[Tensor, Tensor]]:
    """(mu_l, var_l) per layer: the uniform average over the classes with training images (see the module doc)."""
    if variance not in VARIANCES:
        raise LtddError(f"unknown BN target variance '{variance}' (known: {', '.join(VARIANCES)})")
    out = {}
    for n, m in moments.items():
        present = m.count > 0
        if not present.any():
            raise LtddError("no class has images: nothing to compute BN statistics from")
        mu = m.mean[present].mean(0)
        var = m.var[present].mean(0)
        if variance == "mixture":
            var = var + (m.mean[present] - mu).square().mean(0)
        out[n] = (mu, var)
    return out


def running_targets(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """The observer's own running statistics (accumulated over the long-tailed stream): the ablation's target."""
    out = {}
    for n, m in bn_layers(model).items():
        if m.running_mean is None or m.running_var is None:
            raise LtddError(f"BN layer {n} tracks no running statistics")
        out[n] = (m.running_mean.detach().double().cpu(), m.running_var.detach().double().cpu())
    return out


def _moments(a: Tensor) -> tuple[Tensor, Tensor]:
    dims = [0] + list(range(2, a.dim()))
    return a.mean(dims), a.var(dims, unbiased=False)


def bn_matching_loss(acts: dict[str, Tensor], labels: Tensor, targets: dict[str, tuple[Tensor, Tensor]],
                     per_class: dict[str, ClassMoments] | None = None) -> tuple[Tensor, Tensor]:
    """(L_global, L_class) of one synthetic batch (see the module doc); L_class is 0 without ``per_class``."""
    if set(acts) != set(targets):
        raise LtddError("the BN targets do not match the observer's BN layers")
    ref = next(iter(acts.values()))
    glob = ref.new_zeros(())
    cls = ref.new_zeros(())
    for n, a in acts.items():
        mu_t, var_t = (t.to(a.device, a.dtype) for t in targets[n])
        mu, var = _moments(a)
        glob = glob + torch.linalg.vector_norm(mu - mu_t) + torch.linalg.vector_norm(var - var_t)
    if per_class is not None:
        labels = labels.to(ref.device)
        classes = [c for c in labels.unique().tolist() if float(next(iter(per_class.values())).count[c]) > 0]
        for c in classes:
            sel = labels == c
            for n, a in acts.items():
                m = per_class[n]
                mu, var = _moments(a[sel])
                cls = cls + torch.linalg.vector_norm(mu - m.mean[c].to(a.device, a.dtype)) \
                    + torch.linalg.vector_norm(var - m.var[c].to(a.device, a.dtype))
        cls = cls / max(1, len(classes))
    return glob, cls
