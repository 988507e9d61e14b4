"""Model registry (timm-style).

Architectures register a factory function with :func:`register_model`; everything else builds models with
:func:`create_model` so that a model name in a config maps to exactly one constructor::

    @register_model("convnet")
    def convnet(num_classes, channels=3, im_size=(32, 32), *, depth=3, width=128, ...): ...

    model = create_model("convnet", num_classes=10, channels=3, im_size=32, norm="instancenorm")

Every factory receives ``num_classes``, ``channels`` and ``im_size`` (normalised to an ``(H, W)`` tuple of ints) plus
the architecture's own keyword options. Options a factory does not accept are reported as :class:`LtddError`.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Callable

from torch import nn

from ltdd.errors import LtddError

__all__ = ["register_model", "create_model", "list_models", "is_model", "normalize_im_size"]

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``fn`` as the factory for model ``name`` (lower case, unique)."""
    key = name.lower()

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if key in _MODEL_ENTRYPOINTS and _MODEL_ENTRYPOINTS[key] is not fn:
            raise ValueError(f"model {key!r} is already registered")
        _MODEL_ENTRYPOINTS[key] = fn
        return fn

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a shell-style ``pattern`` (e.g. ``"convnet*"``)."""
    names = sorted(_MODEL_ENTRYPOINTS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern.lower())]
    return names


def is_model(name: str) -> bool:
    return name.lower() in _MODEL_ENTRYPOINTS


def normalize_im_size(im_size) -> tuple[int, int]:
    """``32`` or ``(32, 32)`` or ``[28, 28]`` → ``(H, W)``; anything else is an :class:`LtddError`."""
    if isinstance(im_size, int) and not isinstance(im_size, bool):
        size = (im_size, im_size)
    else:
        try:
            size = tuple(int(s) for s in im_size)
        except (TypeError, ValueError):
            raise LtddError(f"bad image size {im_size!r}: expected an int or (height, width)") from None
    if len(size) != 2 or min(size) < 1:
        raise LtddError(f"bad image size {im_size!r}: expected an int or (height, width) of positive ints")
    return size


def create_model(name: str, num_classes: int, channels: int = 3, im_size=(32, 32), **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    Raises :class:`LtddError` for an unknown name (listing the known ones), a bad size or an option the architecture
    does not have.
    """
    key = str(name).lower()
    fn = _MODEL_ENTRYPOINTS.get(key)
    if fn is None:
        raise LtddError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if int(num_classes) < 1:
        raise LtddError(f"model {key}: num_classes must be >= 1, got {num_classes}")
    if int(channels) < 1:
        raise LtddError(f"model {key}: channels must be >= 1, got {channels}")
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [n for n in params if n not in ("num_classes", "channels", "im_size")]
        bad = sorted(k for k in kwargs if k not in allowed)
        if bad:
            raise LtddError(
                f"model {key} has no option {', '.join(bad)}; its options are: {', '.join(allowed) or '(none)'}"
            )
    return fn(num_classes=int(num_classes), channels=int(channels), im_size=normalize_im_size(im_size), **kwargs)
