"""Flat-parameter views of a model and ``torch.func`` forward passes, for trajectory matching.

Trajectory-matching methods (MTT, DATM, LAD) treat the student network's parameters as one 1-D vector θ, take
differentiable SGD steps on it and compare it with expert checkpoints, often restricted to the backbone or the
classifier. :class:`ParamLayout` records where each parameter lives inside that vector; :func:`functional_forward`
runs the unchanged ``nn.Module`` with parameters taken from a (differentiable) flat vector.

The classifier is identified by name: it is every parameter whose name starts with ``classifier.``; everything else is
the backbone. No code here depends on parameter offsets or model-specific constants.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ltdd.errors import LtddError

__all__ = ["ParamLayout", "functional_forward", "functional_embed", "load_flat", "CLASSIFIER_PREFIX", "GROUPS"]

CLASSIFIER_PREFIX = "classifier."
GROUPS = ("all", "backbone", "classifier")


class ParamLayout:
    """Names, shapes, sizes and offsets of ``model.named_parameters()`` (in that order) in a flat vector.

    Attributes: ``names`` (list[str]), ``shapes`` (list[torch.Size]), ``numels`` (list[int]), ``offsets``
    (list[int], start of each parameter in the flat vector) and ``total`` (int).
    """

    def __init__(self, model: nn.Module):
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.numels: list[int] = []
        self.offsets: list[int] = []
        offset = 0
        for name, p in model.named_parameters():
            self.names.append(name)
            self.shapes.append(p.shape)
            self.numels.append(p.numel())
            self.offsets.append(offset)
            offset += p.numel()
        self.total: int = offset
        self._is_classifier = [n.startswith(CLASSIFIER_PREFIX) for n in self.names]

    # ------------------------------------------------------------------ groups
    @staticmethod
    def _check_kind(kind: str) -> str:
        if kind not in GROUPS:
            raise ValueError(f"unknown parameter group {kind!r}; expected one of: {', '.join(GROUPS)}")
        return kind

    def _in_group(self, i: int, kind: str) -> bool:
        if kind == "all":
            return True
        return self._is_classifier[i] == (kind == "classifier")

    def group_names(self, kind: str) -> list[str]:
        """Names of the parameters in group ``kind`` ("all", "backbone" or "classifier")."""
        kind = self._check_kind(kind)
        return [n for i, n in enumerate(self.names) if self._in_group(i, kind)]

    def group_slices(self, kind: str) -> list[slice]:
        """The group's coordinates as a list of contiguous ``slice``s of the flat vector (adjacent runs merged)."""
        kind = self._check_kind(kind)
        slices: list[slice] = []
        for i, (off, n) in enumerate(zip(self.offsets, self.numels)):
            if not self._in_group(i, kind) or n == 0:
                continue
            if slices and slices[-1].stop == off:
                slices[-1] = slice(slices[-1].start, off + n)
            else:
                slices.append(slice(off, off + n))
        return slices

    def mask(self, kind: str, device: torch.device | str | None = None) -> Tensor:
        """Boolean 1-D mask of length ``total`` selecting group ``kind``."""
        m = torch.zeros(self.total, dtype=torch.bool, device=device)
        for s in self.group_slices(kind):
            m[s] = True
        return m

    def select(self, flat: Tensor, kind: str) -> Tensor:
        """The coordinates of ``flat`` in group ``kind`` as a 1-D tensor (differentiable; a view when contiguous)."""
        self._check_flat(flat)
        slices = self.group_slices(kind)
        if len(slices) == 1:
            return flat[slices[0]]
        if not slices:
            return flat[:0]
        return torch.cat([flat[s] for s in slices])

    @property
    def backbone_size(self) -> int:
        return sum(n for n, c in zip(self.numels, self._is_classifier) if not c)

    @property
    def classifier_size(self) -> int:
        return sum(n for n, c in zip(self.numels, self._is_classifier) if c)

    def __len__(self) -> int:
        return self.total

    def __repr__(self) -> str:
        return (
            f"ParamLayout({len(self.names)} tensors, total={self.total}, backbone={self.backbone_size}, "
            f"classifier={self.classifier_size})"
        )

    # ------------------------------------------------------------ conversion
    def _check_flat(self, flat: Tensor) -> None:
        if not isinstance(flat, Tensor) or flat.dim() != 1 or flat.numel() != self.total:
            got = tuple(flat.shape) if isinstance(flat, Tensor) else type(flat).__name__
            raise LtddError(f"flat parameter vector has shape {got}, expected ({self.total},) for this model")

    def flatten(self, params: Mapping[str, Tensor] | nn.Module) -> Tensor:
        """Concatenate parameters into one 1-D tensor in layout order.

        A mapping (name → tensor) is concatenated differentiably; an ``nn.Module`` gives a detached copy of its
        current parameters (ready for ``.requires_grad_()``).
        """
        if isinstance(params, nn.Module):
            named = dict(params.named_parameters())
            detach = True
        else:
            named = params
            detach = False
        missing = [n for n in self.names if n not in named]
        if missing:
            raise LtddError(f"parameters do not match the layout: missing {', '.join(missing[:5])}")
        parts = []
        for name, shape in zip(self.names, self.shapes):
            t = named[name]
            if t.shape != shape:
                raise LtddError(f"parameter {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            parts.append(t.detach().reshape(-1) if detach else t.reshape(-1))
        if not parts:
            return torch.zeros(0)
        return torch.cat(parts)

    def flatten_grad(self, model: nn.Module) -> Tensor:
        """The module's ``.grad``s as one detached 1-D tensor (zeros where a parameter has no gradient)."""
        named = dict(model.named_parameters())
        parts = []
        for name in self.names:
            p = named[name]
            parts.append(torch.zeros_like(p).reshape(-1) if p.grad is None else p.grad.detach().reshape(-1))
        return torch.cat(parts)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``flat`` into a name → tensor dict of views (gradients flow back to ``flat``)."""
        self._check_flat(flat)
        chunks = torch.split(flat, self.numels)
        return {name: chunk.view(shape) for name, chunk, shape in zip(self.names, chunks, self.shapes)}


def _call(module: nn.Module, params: dict[str, Tensor], buffers: Mapping[str, Tensor] | None, x: Tensor) -> Tensor:
    if buffers is None:
        return functional_call(module, params, (x,))
    return functional_call(module, (params, dict(buffers)), (x,))


def functional_forward(
    model: nn.Module, layout: ParamLayout, flat: Tensor, x: Tensor, buffers: Mapping[str, Tensor] | None = None
) -> Tensor:
    """``model(x)`` with parameters taken from ``flat`` (differentiable w.r.t. ``flat`` and ``x``).

    ``buffers`` (e.g. batch-norm running statistics) replaces the module's buffers for this call; in train mode
    batch norm updates the tensors in ``buffers`` in place (or the module's own buffers when ``buffers`` is None).
    The module's parameters are not touched.
    """
    return _call(model, layout.unflatten(flat), buffers, x)


class _EmbedCall(nn.Module):
    """Wraps a model so that ``forward`` is its ``embed``; parameter names gain the prefix ``m.``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x: Tensor) -> Tensor:
        return self.m.embed(x)


def functional_embed(
    model: nn.Module, layout: ParamLayout, flat: Tensor, x: Tensor, buffers: Mapping[str, Tensor] | None = None
) -> Tensor:
    """``model.embed(x)`` (penultimate features, ``(N, feat_dim)``) with parameters taken from ``flat``."""
    if not hasattr(model, "embed"):
        raise LtddError(f"model {type(model).__name__} has no embed()")
    params = {"m." + k: v for k, v in layout.unflatten(flat).items()}
    bufs = None if buffers is None else {"m." + k: v for k, v in buffers.items()}
    return _call(_EmbedCall(model), params, bufs, x)


@torch.no_grad()
def load_flat(model: nn.Module, layout: ParamLayout, flat: Tensor) -> None:
    """Copy the flat vector into the module's parameters in place (no autograd history)."""
    views = layout.unflatten(flat.detach())
    named = dict(model.named_parameters())
    if list(named) != layout.names or any(named[n].shape != s for n, s in zip(layout.names, layout.shapes)):
        raise LtddError("model parameters do not match the layout (different architecture or sizes)")
    for name, value in views.items():
        named[name].copy_(value)
