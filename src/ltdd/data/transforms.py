"""Fitted preprocessing: per-channel normalisation, ZCA whitening, and the :class:`Preprocessor` that chains them.

All transforms are fitted on the long-tailed train set only and then applied, as the same function, to train, test,
probe and synthetic images. ``__call__`` works batched on any device and keeps gradients (distillation
back-propagates through it); ``inverse`` maps back for visualisation.

Spaces:

* *pixels*: float ``(N, C, H, W)`` in [0, 1] (uint8 / 255);
* *model space*: what networks see: pixels, then optionally normalised, then optionally ZCA-whitened.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LtddError

__all__ = ["Normalizer", "ZCA", "Preprocessor", "to_float_pixels"]

_CHUNK = 2048  # images per block when converting large uint8 arrays


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def _check_nchw(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} expects (N, C, H, W) input, got shape {tuple(x.shape)}")


def to_float_pixels(x) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` (or ``(N, H, W)``) numpy/tensor -> float32 ``(N, C, H, W)`` in [0, 1]."""
    t = _as_tensor(x)
    if t.dtype != torch.uint8:
        raise ValueError(f"to_float_pixels expects uint8 images, got {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    if t.ndim != 4:
        raise ValueError(f"to_float_pixels expects (N, H, W, C) images, got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


class Normalizer:
    """Per-channel ``(x - mean) / std`` with mean and (population) std fitted on float images ``(N, C, H, W)``."""

    def __init__(self) -> None:
        self.mean: torch.Tensor | None = None  # (C,) float32
        self.std: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, x) -> "Normalizer":
        x = _as_tensor(x)
        _check_nchw(x, "Normalizer.fit")
        C = x.shape[1]
        s = torch.zeros(C, dtype=torch.float64)
        s2 = torch.zeros(C, dtype=torch.float64)
        n = 0
        for i in range(0, x.shape[0], _CHUNK):
            b = x[i: i + _CHUNK].detach().to("cpu", torch.float64).transpose(0, 1).reshape(C, -1)
            s += b.sum(1)
            s2 += (b * b).sum(1)
            n += b.shape[1]
        if n == 0:
            raise LtddError("cannot fit the normaliser on an empty image set")
        mean = s / n
        var = (s2 / n - mean * mean).clamp_min(0.0)
        std = var.sqrt()
        std[std < 1e-8] = 1.0  # a constant channel is centred, not blown up
        self.mean, self.std = mean.float(), std.float()
        return self

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError("Normalizer used before fit() or load_state_dict()")
        if x.shape[1] != self.mean.numel():
            raise LtddError(f"normaliser was fitted on {self.mean.numel()} channels, got images with {x.shape[1]}")
        shape = (1, -1, 1, 1)
        return (self.mean.to(x.device, x.dtype).view(shape), self.std.to(x.device, x.dtype).view(shape))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw(x, "Normalizer")
        mean, std = self._params(x)
        return (x - mean) / std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw(x, "Normalizer.inverse")
        mean, std = self._params(x)
        return x * std + mean

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError("Normalizer.state_dict() before fit()")
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "Normalizer":
        self.mean = torch.as_tensor(state["mean"]).detach().to("cpu", torch.float32).clone()
        self.std = torch.as_tensor(state["std"]).detach().to("cpu", torch.float32).clone()
        return self


class ZCA:
    """ZCA whitening of flattened images (kornia ``ZCAWhitening(eps=0.1)`` semantics).

    Fit (float64): ``mean`` over images, unbiased covariance ``S = U diag(s) U^T``,
    ``W = U diag(1/sqrt(s + eps)) U^T``; the inverse is ``U diag(sqrt(s + eps)) U^T``.
    Apply: ``(x.flatten(1) - mean) @ W``; inverse: ``y @ W_inv + mean``.
    """

    def __init__(self, eps: float = 0.1) -> None:
        if not eps > 0:
            raise LtddError(f"zca_eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.mean: torch.Tensor | None = None  # (D,) float32
        self.matrix: torch.Tensor | None = None  # (D, D) float32
        self.inverse_matrix: torch.Tensor | None = None
        self.shape: tuple[int, ...] | None = None  # (C, H, W) fitted on
        self._device_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def fitted(self) -> bool:
        return self.matrix is not None

    def fit(self, x) -> "ZCA":
        x = _as_tensor(x)
        _check_nchw(x, "ZCA.fit")
        n = x.shape[0]
        if n < 2:
            raise LtddError(f"ZCA needs at least 2 images to fit, got {n}")
        D = int(np.prod(x.shape[1:]))
        total = torch.zeros(D, dtype=torch.float64)
        for i in range(0, n, _CHUNK):
            total += x[i: i + _CHUNK].detach().to("cpu", torch.float64).reshape(-1, D).sum(0)
        mean = total / n
        cov = torch.zeros(D, D, dtype=torch.float64)
        for i in range(0, n, _CHUNK):
            b = x[i: i + _CHUNK].detach().to("cpu", torch.float64).reshape(-1, D) - mean
            cov.addmm_(b.T, b)
        cov /= n - 1
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(0.0)
        self.mean = mean.float()
        self.matrix = ((evecs * (evals + self.eps).rsqrt()) @ evecs.T).float()
        self.inverse_matrix = ((evecs * (evals + self.eps).sqrt()) @ evecs.T).float()
        self.shape = tuple(int(s) for s in x.shape[1:])
        self._device_cache = {}
        return self

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.matrix is None or self.mean is None or self.inverse_matrix is None:
            raise RuntimeError("ZCA used before fit() or load_state_dict()")
        D = self.mean.numel()
        if x.ndim < 2 or int(np.prod(x.shape[1:])) != D:
            want = "x".join(map(str, self.shape)) if self.shape else str(D)
            raise LtddError(f"ZCA was fitted on images of {want} values, got shape {tuple(x.shape[1:])}")
        key = (x.device, x.dtype)
        if key not in self._device_cache:
            self._device_cache[key] = (
                self.mean.to(x.device, x.dtype),
                self.matrix.to(x.device, x.dtype),
                self.inverse_matrix.to(x.device, x.dtype),
            )
        return self._device_cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean, mat, _ = self._params(x)
        return ((x.reshape(x.shape[0], -1) - mean) @ mat).reshape(x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        mean, _, inv = self._params(x)
        return (x.reshape(x.shape[0], -1) @ inv + mean).reshape(x.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.matrix is None or self.mean is None or self.inverse_matrix is None:
            raise RuntimeError("ZCA.state_dict() before fit()")
        return {"mean": self.mean.clone(), "matrix": self.matrix.clone(), "inverse": self.inverse_matrix.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "ZCA":
        mean = torch.as_tensor(state["mean"]).detach().to("cpu", torch.float32).clone().reshape(-1)
        mat = torch.as_tensor(state["matrix"]).detach().to("cpu", torch.float32).clone()
        inv = torch.as_tensor(state["inverse"]).detach().to("cpu", torch.float32).clone()
        D = mean.numel()
        if mat.shape != (D, D) or inv.shape != (D, D):
            raise LtddError(f"ZCA state is inconsistent: mean has {D} values, matrix {tuple(mat.shape)}")
        self.mean, self.matrix, self.inverse_matrix = mean, mat, inv
        self.shape = None
        self._device_cache = {}
        return self


class Preprocessor:
    """uint8 NHWC images -> float32 NCHW tensors in model space: ``/255``, then optional :class:`Normalizer`,
    then optional :class:`ZCA`. Fit on the long-tailed train set only; apply to everything else unchanged."""

    def __init__(self, normalize: bool = True, zca: bool = False, zca_eps: float = 0.1) -> None:
        self.normalize = bool(normalize)
        self.zca = bool(zca)
        self.zca_eps = float(zca_eps)
        self.normalizer: Normalizer | None = Normalizer() if self.normalize else None
        self.whitener: ZCA | None = ZCA(self.zca_eps) if self.zca else None
        self.fitted = not (self.normalize or self.zca)

    # -- fitting ---------------------------------------------------------------------------------------------
    def fit(self, images) -> "Preprocessor":
        """Fit on uint8 ``(N, H, W, C)`` images (numpy or tensor)."""
        pixels = to_float_pixels(images)
        if pixels.shape[0] == 0:
            raise LtddError("cannot fit the preprocessing on an empty train set")
        if self.normalizer is not None:
            self.normalizer.fit(pixels)
            pixels = self.normalizer(pixels)
        if self.whitener is not None:
            self.whitener.fit(pixels)
        self.fitted = True
        return self

    # -- applying --------------------------------------------------------------------------------------------
    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """Float pixels ``(N, C, H, W)`` in [0, 1] -> model space (differentiable, any device)."""
        self._require_fitted()
        if self.normalizer is not None:
            x = self.normalizer(x)
        if self.whitener is not None:
            x = self.whitener(x)
        return x

    def to_pixels(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Model space -> float pixels in [0, 1] (clamped unless ``clamp=False``), e.g. for PNG grids."""
        self._require_fitted()
        if self.whitener is not None:
            x = self.whitener.inverse(x)
        if self.normalizer is not None:
            x = self.normalizer.inverse(x)
        return x.clamp(0.0, 1.0) if clamp else x

    def __call__(self, x, batch_size: int = _CHUNK) -> torch.Tensor:
        """uint8 ``(N, H, W, C)`` numpy/tensor -> float32 model-space ``(N, C, H, W)`` on the CPU (in blocks);
        a float tensor is taken as pixels ``(N, C, H, W)`` in [0, 1] and mapped with :meth:`to_model_space`."""
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return self.to_model_space(x)
        arr = x
        if isinstance(arr, np.ndarray) and arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating):
                return self.to_model_space(torch.as_tensor(arr))
            raise ValueError(f"Preprocessor expects uint8 images or float pixels, got {arr.dtype}")
        t = _as_tensor(arr)
        if t.ndim == 3:
            t = t.unsqueeze(-1)
        if t.dtype != torch.uint8 or t.ndim != 4:
            raise ValueError(f"Preprocessor expects uint8 (N, H, W, C) images, got {t.dtype} {tuple(t.shape)}")
        self._require_fitted()
        n, h, w, c = t.shape
        out = torch.empty((n, c, h, w), dtype=torch.float32)
        with torch.no_grad():
            for i in range(0, n, batch_size):
                out[i: i + batch_size] = self.to_model_space(to_float_pixels(t[i: i + batch_size]))
        return out

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("Preprocessor used before fit() or load_state_dict()")

    # -- persistence -----------------------------------------------------------------------------------------
    def config(self) -> dict:
        """JSON-able description: which steps, eps, and the fitted channel statistics."""
        out: dict = {"normalize": self.normalize, "zca": self.zca, "zca_eps": self.zca_eps, "fitted": self.fitted}
        if self.normalizer is not None and self.normalizer.fitted:
            out["mean"] = [float(v) for v in self.normalizer.mean]  # type: ignore[union-attr]
            out["std"] = [float(v) for v in self.normalizer.std]  # type: ignore[union-attr]
        if self.whitener is not None and self.whitener.fitted:
            out["zca_dim"] = int(self.whitener.mean.numel())  # type: ignore[union-attr]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of tensors (safetensors-friendly). Keys: ``normalizer.mean/std``, ``zca.mean/matrix/inverse``,
        ``zca.eps``; which keys are present says which steps are on."""
        self._require_fitted()
        state: dict[str, torch.Tensor] = {}
        if self.normalizer is not None:
            state.update({f"normalizer.{k}": v for k, v in self.normalizer.state_dict().items()})
        if self.whitener is not None:
            state.update({f"zca.{k}": v for k, v in self.whitener.state_dict().items()})
            state["zca.eps"] = torch.tensor(self.zca_eps, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "Preprocessor":
        """Restore from :meth:`state_dict`; the steps are switched on or off to match the state."""
        keys = set(state)
        norm = {k.split(".", 1)[1]: state[k] for k in keys if k.startswith("normalizer.")}
        zca = {k.split(".", 1)[1]: state[k] for k in keys if k.startswith("zca.") and k != "zca.eps"}
        try:
            self.normalize = bool(norm)
            self.normalizer = Normalizer().load_state_dict(norm) if norm else None
            self.zca = bool(zca)
            if "zca.eps" in state:
                self.zca_eps = float(torch.as_tensor(state["zca.eps"]).item())
            self.whitener = ZCA(self.zca_eps).load_state_dict(zca) if zca else None
        except KeyError as e:
            raise LtddError(f"preprocessor state lacks the entry {e.args[0]!r}") from None
        self.fitted = True
        return self

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Preprocessor":
        return cls(normalize=False, zca=False).load_state_dict(state)
