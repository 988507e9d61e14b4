"""Distillation methods behind one interface, and the shared outer loop."""

from . import engine  # noqa: F401  (registers "tm")
from . import coreset, distribution_matching, gradient_matching  # noqa: F401  (random herding kcenter dc dsa dm)
from . import rldd  # noqa: F401  (registers "rldd")
from .base import DISTILLERS, Distiller, DivergenceError, make_distiller, register_distiller
from .run import distill

__all__ = ["DISTILLERS", "Distiller", "DivergenceError", "distill", "make_distiller", "register_distiller"]
