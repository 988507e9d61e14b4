"""Plan-time estimates of single-core seconds for the accuracy-vs-compute grid, from a per-unit cost model.

The model (``cost_model`` in the grid's YAML, calibrated there) prices the units the grid's knobs scale:

* a representation expert: ``experts x epochs x train_images / 1000 x expert_s_per_kimage x w``;
* a classifier expert: ``experts x classifier epochs x class_aware_epoch / 1000 x classifier_s_per_ksample x w``;
* RLDD's observer and teacher: ``epochs x train_images / 1000 x expert_s_per_kimage x debiased_factor x w`` each;
* trajectory matching: ``tm_init_s + iterations x (student steps summed over phases) x tm_step_s[gradient] x w``;
* DM / DC: ``iterations x dm_iteration_s (x batch_real / 128) x w``, ``iterations x dc_iteration_s (x outer / 10) x w``;
* RLDD's distillation: ``rldd_init_s + iterations x rldd_iteration_s x w``; one-shot selections: 0;
* an evaluation: ``eval_s x runs / 3``;

with ``w = (width / 32) ** width_exponent`` for the ConvNet width of the network that does the work. Knobs the grid
does not vary are not modelled. The report uses measured seconds; these numbers only size a run before it starts.
"""

from __future__ import annotations

from ..config import RunConfig
from ..errors import LtddError

__all__ = ["REQUIRED", "check_cost_model", "width_factor", "store_estimate", "distill_estimate", "eval_estimate",
           "kinds_read"]

REQUIRED = ("train_images", "class_aware_epoch", "expert_s_per_kimage", "classifier_s_per_ksample", "width_exponent",
            "debiased_factor", "tm_step_s", "tm_init_s", "dm_iteration_s", "dc_iteration_s", "rldd_init_s",
            "rldd_iteration_s", "eval_s")
DEFAULT_WIDTH = 128  # ConvNet's default width


def check_cost_model(cm: dict, where: str) -> dict:
    """The ``cost_model`` section with every unit present (one clear line naming the first missing one)."""
    if not isinstance(cm, dict):
        raise LtddError(f"{where}: 'cost_model' must be a mapping of unit costs")
    missing = [k for k in REQUIRED if k not in cm]
    if missing:
        raise LtddError(f"{where}: cost_model lacks {', '.join(missing)}")
    return cm


def width_factor(width, cm: dict) -> float:
    """Cost of a ConvNet of ``width`` relative to width 32."""
    return (float(width or DEFAULT_WIDTH) / 32.0) ** float(cm["width_exponent"])


def _width(model_cfg) -> int:
    args = model_cfg.args if hasattr(model_cfg, "args") else (model_cfg or {}).get("args", {})
    return int((args or {}).get("width", DEFAULT_WIDTH))


def store_estimate(cfg: RunConfig, cm: dict) -> dict[str, float]:
    """Estimated single-core seconds of an expert store, per kind of expert it holds."""
    e = cfg.experts
    per_epoch = float(cm["train_images"]) / 1000 * float(cm["expert_s_per_kimage"])  # width 32
    if e.kind == "debiased":
        from ..debiased_experts import ROLES, role_model

        return {r: e.train.epochs * per_epoch * float(cm["debiased_factor"]) * width_factor(_width(role_model(e, r)), cm)
                for r in ROLES}
    w = width_factor(_width(e.model), cm)
    per_epoch *= w
    out = {"representation": e.num_experts * e.train.epochs * per_epoch}
    if e.classifier_experts:
        out["classifier"] = (e.num_experts * e.classifier_train.epochs * float(cm["class_aware_epoch"]) / 1000
                             * float(cm["classifier_s_per_ksample"]) * w)
    return out


def distill_estimate(cfg: RunConfig, cm: dict, store_width: int | None = None) -> float:
    """Estimated single-core seconds of one distillation (``store_width``: the expert width a trajectory or RLDD
    point distils with)."""
    from ..distill import DISTILLERS

    d = cfg.distill
    if getattr(DISTILLERS[d.method], "one_shot", False):
        return 0.0
    opts = d.options or {}
    if d.method == "tm":
        steps = sum(ph.syn_steps for ph in d.phases)
        step = cm["tm_step_s"]
        if d.gradient not in step:
            raise LtddError(f"cost_model.tm_step_s has no entry for distill.gradient '{d.gradient}'")
        return float(cm["tm_init_s"]) + d.iterations * steps * float(step[d.gradient]) * width_factor(store_width, cm)
    if d.method == "dm":
        return (d.iterations * float(cm["dm_iteration_s"]) * int(opts.get("batch_real", 128)) / 128
                * width_factor(_width(opts.get("model")), cm))
    if d.method in ("dc", "dsa"):
        return (d.iterations * float(cm["dc_iteration_s"]) * int(opts.get("outer_loop", 10)) / 10
                * width_factor(_width(opts.get("model")), cm))
    if d.method == "rldd":
        return float(cm["rldd_init_s"]) + d.iterations * float(cm["rldd_iteration_s"]) * width_factor(store_width, cm)
    raise LtddError(f"the cost model has no price for method '{d.method}'")


def eval_estimate(runs: int, cm: dict) -> float:
    return float(cm["eval_s"]) * runs / 3


def kinds_read(cfg: RunConfig) -> tuple[str, ...]:
    """The kinds of expert of its store a point reads (its store charge is their training time): the stores its
    trajectory phases match plus the label store when the initialisation reads it; RLDD: observer and teacher."""
    d = cfg.distill
    if cfg.experts.kind == "debiased":
        from ..debiased_experts import ROLES

        return tuple(ROLES)
    kinds = {ph.store for ph in d.phases}
    if d.image_init == "correct" or (d.soft_labels and d.label_init != "onehot"):
        kinds.add(d.label_store)
    return tuple(k for k in ("representation", "classifier") if k in kinds)
