"""The distiller interface every method implements, and the method registry.

A distiller owns learnable synthetic state (images, optional soft-label logits, optional step size) and advances it
one outer iteration at a time. The shared outer loop (``ltdd.distill.run``) does everything else: checkpoints,
resume, guards, logging, evaluation, writing the distilled set.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod

import torch

from ..config import DistillConfig, ExpertConfig, to_dict
from ..errors import LtddError
from ..synset import SyntheticSet

DISTILLERS: dict[str, type["Distiller"]] = {}


def register_distiller(name: str):
    def deco(cls):
        DISTILLERS[name] = cls
        cls.method_name = name
        return cls

    return deco


def make_distiller(cfg: DistillConfig, data, experts_dir=None, device=None) -> "Distiller":
    if cfg.method not in DISTILLERS:
        raise LtddError(f"unknown distillation method '{cfg.method}' (known: {', '.join(sorted(DISTILLERS))})")
    return DISTILLERS[cfg.method](cfg, data, experts_dir=experts_dir, device=device or torch.device("cpu"))


# DistillConfig fields every method reads; a method adds its own in ``Distiller.READS`` / ``Distiller.reads``
COMMON_FIELDS = frozenset({"method", "ipc", "seed", "options", "duplicate"})
# fields of the shared outer loop, read by every iterative method
LOOP_FIELDS = frozenset({"iterations", "checkpoint_every", "eval_every", "log_every"})


def _first_difference(a, b, where: str) -> str | None:
    """The dotted path of the first value that differs between two plain (to_dict) structures."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{where}.{k}"
            d = _first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}.{i}")
            if d:
                return d
        return None
    return None if a == b else where


def check_method_config(run_cfg) -> None:
    """A method's configuration holds only what the method reads: a ``distill`` field the chosen method ignores
    (set to anything but its default), an unknown ``distill.options`` key, or an ``experts`` section for a method
    that uses no experts is an error naming the key."""
    d = run_cfg.distill
    cls = DISTILLERS.get(d.method)
    if cls is None:
        raise LtddError(f"unknown distillation method '{d.method}' (known: {', '.join(sorted(DISTILLERS))})")
    read = cls.reads(d)
    default = DistillConfig()
    for f in dataclasses.fields(DistillConfig):
        if f.name in read:
            continue
        path = _first_difference(to_dict(getattr(default, f.name)), to_dict(getattr(d, f.name)), f"distill.{f.name}")
        if path:
            raise LtddError(f"{path} is set, but method '{d.method}' does not read it with these settings; "
                            f"remove it")
    cls.check_options(d)
    if cls.needs_experts:
        from ..experts import check_expert_config

        if run_cfg.experts.kind != cls.expert_kind:
            raise LtddError(f"experts.kind is '{run_cfg.experts.kind}', but method '{d.method}' needs "
                            f"{cls.expert_kind} experts; set experts.kind={cls.expert_kind}")
        check_expert_config(run_cfg.experts)
    if not cls.needs_experts:
        path = _first_difference(to_dict(ExpertConfig()), to_dict(run_cfg.experts), "experts")
        if path:
            raise LtddError(f"{path} is set, but method '{d.method}' uses no expert trajectories; remove it")


class DivergenceError(LtddError):
    """The run produced NaN/Inf or an exploding step size; the last good checkpoint is kept."""


class Distiller(ABC):
    method_name = "?"
    needs_experts = False
    expert_kind = "trajectory"  # the experts.kind the method needs (when it needs experts)
    OPTIONS: dict = {}  # the method's ``distill.options`` keys and their defaults
    READS: frozenset = frozenset()  # DistillConfig fields the method reads beyond COMMON_FIELDS

    @classmethod
    def reads(cls, cfg: DistillConfig) -> set[str]:
        """The DistillConfig fields this method reads under ``cfg`` (a method may read some only in some modes)."""
        return set(COMMON_FIELDS | cls.READS)

    @classmethod
    def check_options(cls, cfg: DistillConfig) -> dict:
        """``distill.options`` merged over the method's defaults; an unknown key is an error naming it."""
        unknown = sorted(set(cfg.options) - set(cls.OPTIONS))
        if unknown:
            raise LtddError(f"unknown option distill.options.{unknown[0]} for method '{cls.method_name}' "
                            f"(known: {', '.join(sorted(cls.OPTIONS)) or 'none'})")
        return {**cls.OPTIONS, **cfg.options}

    def __init__(self, cfg: DistillConfig, data, *, experts_dir=None, device=torch.device("cpu")):
        self.opts = self.check_options(cfg)
        self.cfg = cfg
        self.data = data
        self.device = device
        self.experts_dir = experts_dir
        self.generator = torch.Generator()
        self.generator.manual_seed(cfg.seed)

    # ---- state ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def initialise(self) -> None:
        """Create the initial synthetic set (called once, not on resume)."""

    def step(self, iteration: int) -> dict:
        """One outer iteration; returns scalars to log. One-shot methods (coresets) never get called."""
        raise NotImplementedError

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume, as tensors (optimiser states included)."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        ...

    def extra_state(self) -> dict:
        """JSON-serialisable state (e.g. expert-sampling positions)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    @abstractmethod
    def synthetic_set(self) -> SyntheticSet:
        ...

    def write_artifacts(self, folder) -> None:
        """Write files that belong beside the distilled set into ``folder`` (e.g. RLDD's teacher for relabelling);
        called before the set is written."""

    def set_meta(self) -> dict:
        """Entries added to the distilled set's metadata (e.g. the name of a file from :meth:`write_artifacts`)."""
        return {}

    # ---- guards --------------------------------------------------------------------------------------------------
    def check(self, iteration: int, losses: dict) -> None:
        for k, v in losses.items():
            if isinstance(v, float) and not torch.isfinite(torch.tensor(v)):
                raise DivergenceError(f"loss '{k}' became {v} at iteration {iteration}")
        syn = self.synthetic_set()
        if not torch.isfinite(syn.images).all():
            raise DivergenceError(f"synthetic images contain NaN/Inf at iteration {iteration}")
        if syn.soft_labels is not None and not torch.isfinite(syn.soft_labels).all():
            raise DivergenceError(f"soft labels contain NaN/Inf at iteration {iteration}")
        if syn.lr is not None:
            if not torch.isfinite(torch.tensor(syn.lr)):
                raise DivergenceError(f"step size became {syn.lr} at iteration {iteration}")
            if syn.lr > self.cfg.lr_init * self.cfg.lr_explode_factor:
                raise DivergenceError(f"step size exploded to {syn.lr:.4g} (> {self.cfg.lr_explode_factor:g} x "
                                      f"lr_init) at iteration {iteration}; lower distill.lr_lr")

    def generator_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def optimiser_tensors(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """SGD momentum buffers as flat tensors (for checkpoints)."""
    out = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"{prefix}.{gi}.{pi}.momentum"] = buf.detach().cpu().clone()
            out[f"{prefix}.{gi}.lr"] = torch.tensor(group["lr"], dtype=torch.float64)
    return out


def load_optimiser_tensors(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    for gi, group in enumerate(opt.param_groups):
        if f"{prefix}.{gi}.lr" in tensors:
            group["lr"] = float(tensors[f"{prefix}.{gi}.lr"])
        for pi, p in enumerate(group["params"]):
            key = f"{prefix}.{gi}.{pi}.momentum"
            if key in tensors:
                opt.state[p]["momentum_buffer"] = tensors[key].to(p.device, p.dtype).clone()
