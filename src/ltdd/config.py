"""Typed configuration: the config dataclasses, preset and protocol loading (the generic helpers: ltdd.typed, ltdd.files).

Every configurable stage has a dataclass here. A preset is a YAML file in ``ltdd/presets`` whose keys mirror the
dataclass fields; ``--set a.b=c`` on the command line overrides any field (values are parsed as YAML, so
``--set distill.zca=false`` is a real boolean, not the string "false").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import LtddError


@dataclass
class DataConfig:
    """Which data, which long-tailed split, which preprocessing."""

    dataset: str = "digits"  # cifar10 | cifar100 | imagefolder | tiny_imagenet | digits
    root: str | None = None  # folder or archive; None for digits
    imbalance_factor: float = 10.0  # n_max / n_min, >= 1
    imbalance_ratio: float | None = None  # alias: 1 / imbalance_factor (LDAM/LTDD convention)
    max_per_class: int | None = None  # n_max; None = the largest class count available
    profile: str = "exp"  # exp | step
    seed: int = 0  # per-class selection seed
    class_order: list[int] | None = None  # class_order[0] gets n_max; default: label order
    normalize: bool = True  # per-channel mean/std of the long-tailed train set
    zca: bool = True
    zca_eps: float = 0.1
    label_kind: str = "fine"  # cifar100: fine | coarse
    image_size: int | None = None  # resize to this square size (digits default 16)
    test_per_class: int = 50  # digits only: balanced held-out test images per class
    probe_per_class: int = 0  # balanced probe split from unused train images (grouping analysis)

    def resolved_imbalance_factor(self) -> float:
        if self.imbalance_ratio is not None:
            if not (0 < self.imbalance_ratio <= 1):
                raise LtddError(f"imbalance_ratio must be in (0, 1], got {self.imbalance_ratio}")
            return 1.0 / self.imbalance_ratio
        if self.imbalance_factor is None or self.imbalance_factor < 1:
            raise LtddError(f"imbalance_factor must be >= 1, got {self.imbalance_factor}")
        return float(self.imbalance_factor)


# the generic helpers live in ltdd.typed and ltdd.files; re-exported here, where every caller finds them
from .files import (atomic_write_bytes, atomic_write_file, atomic_write_text, load_yaml, read_jsonl,  # noqa: E402,F401
                    save_json, save_yaml)
from .typed import _coerce, apply_overrides, from_dict, merge, parse_overrides, to_dict  # noqa: E402,F401


PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class TrainConfig:
    """One training run of one network: used for experts, evaluation, full-data baselines and two-stage models."""

    epochs: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    schedule: str = "step_half"  # constant | step_half (x0.1 at half) | cosine
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    loss: str = "ce"  # ce | balanced_softmax | logit_adjust | dam ; soft-label targets use soft CE (dam: weighted)
    la_tau: float = 1.0  # logit-adjustment temperature
    temperature: float = 1.0  # soft-label temperature: targets = softmax(logits / T)
    sampler: str = "instance"  # instance | class_balanced | class_aware
    samples_per_class_visit: int = 4  # class_aware sampler
    trainable: str = "all"  # all | classifier (backbone frozen, cRT)
    sam_rho: float = 0.0  # > 0: sharpness-aware update (GSAM when gsam_alpha > 0)
    gsam_alpha: float = 0.0
    grad_clip: float = 0.0


@dataclass
class ModelConfig:
    name: str = "convnet"
    args: dict = field(default_factory=dict)  # e.g. {"width": 128, "depth": 3, "norm": "instancenorm"}


@dataclass
class ProtocolConfig:
    """The evaluation protocol: train fresh networks on a (distilled) set, test on the balanced test set."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1000, lr=0.01, momentum=0.9,
                                                                   weight_decay=5e-4, batch_size=256,
                                                                   schedule="step_half", dsa=True))
    use_learned_lr: bool = True  # use the distilled set's learned lr when it has one
    runs: int = 5
    test_batch_size: int = 1024


@dataclass
class RelabelConfig:
    """The loss and optimiser of the relabel protocol (EDC's "MSE+GT", as RLDD evaluates).

    Per batch x~ (augmented, then cut-mixed with mixing weight lam): loss = ce_weight * CE(s(x~), y~) +
    mse_weight * mean over the batch and the classes of (t(x~) - s(x~))^2 on raw logits (EDC's form, as its
    training code computes it: no temperature), where y~ is the cut-mixed one-hot label, s the student's logits and
    t the target logits (the teacher's on the very batch, or the set's own soft-label logits mixed with the same
    lam). ``target: probs`` instead compares softmax(t / T) with softmax(s / T), summed over the classes (an
    older reading, kept for comparison; ``temperature`` is read only then). AdamW; the lr is multiplied by ``gamma`` at each milestone (a
    fraction of the epochs); an EMA copy of the student (decay ``ema``) is what gets tested.
    """

    ce_weight: float = 0.025  # kappa_1
    mse_weight: float = 1.0  # kappa_2
    target: str = "logits"  # logits (EDC's MSE+GT) | probs (temperature-T distributions)
    temperature: float = 20.0  # T, read only with target: probs
    cutmix: float = 1.0  # probability that a batch is cut-mixed (0: never)
    cutmix_beta: float = 1.0  # lam ~ Beta(beta, beta)
    ema: float = 0.99  # decay of the EMA copy of the student (0: test the student itself)
    optimizer: str = "adamw"  # adamw | sgd
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of train.epochs
    gamma: float = 0.1


@dataclass
class RelabelProtocolConfig(ProtocolConfig):
    """An evaluation protocol trained with the relabel loop (:class:`RelabelConfig`) instead of the SGD loop."""

    relabel: RelabelConfig = field(default_factory=RelabelConfig)


PROTOCOL_DIR = Path(__file__).parent / "protocols"


def list_protocols() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def protocol_preset(name: str) -> ProtocolConfig:
    """A named evaluation protocol: a YAML file in ``ltdd/protocols`` (``ltdd protocols`` lists them with their
    descriptions). ``kind: relabel`` makes it a :class:`RelabelProtocolConfig` (the relabel training loop); the
    rest are trained with the one SGD loop."""
    path = PROTOCOL_DIR / f"{name}.yaml"
    if not path.is_file():
        raise LtddError(f"unknown evaluation protocol '{name}' (known: {', '.join(list_protocols())})")
    raw = dict(load_yaml(path))
    raw.pop("description", None)
    kind = raw.pop("kind", "sgd")
    if kind not in ("sgd", "relabel"):
        raise LtddError(f"protocol file {path}: unknown kind '{kind}' (known: sgd, relabel)")
    return from_dict(RelabelProtocolConfig if kind == "relabel" else ProtocolConfig, raw, f"protocol {name}")


def protocol_description(name: str) -> str:
    return str(load_yaml(PROTOCOL_DIR / f"{name}.yaml").get("description", ""))


PROTOCOLS = tuple(list_protocols())


@dataclass
class DebiasedExpertConfig:
    """RLDD's debiased experts (``experts.kind: debiased``): an observer (``experts.model``, needs
    batch norm) and a teacher, each trained on the long-tailed set with gamma_robust * L_robust + gamma_debias *
    L_debias (``ltdd.rldd_losses``) on two mixed-label augmented views."""

    teacher_model: ModelConfig | None = None  # None: the observer's architecture (another seed)
    gamma_robust: float = 1.0  # gamma_1: weight of the SimSiam-style consistency between the two views
    gamma_debias: float = 1.0  # gamma_2: weight of the scheduled, frequency-re-weighted CE
    q: float = 0.8  # re-weighting sharpness: class k weighted by r_k^-q / sum_j r_j^-q
    # alpha(t), t = epoch, T = epochs: quadratic (t/T)^2 (as the paper); linear t/T; constant 1 (re-weighted CE
    # from the start); none 0 (plain CE throughout)
    schedule: str = "quadratic"
    # the class weights r_k^-q normalised to sum to 1 (sum: as the paper writes them, so the re-weighted term is on
    # the scale of CE / C) or to average 1 (mean: sum to C, the usual scaling of class-balanced losses)
    weight_norm: str = "sum"
    mix: str = "cutmix"  # how the two views' labels are mixed: cutmix | mixup | none
    mix_alpha: float = 1.0  # lambda ~ Beta(mix_alpha, mix_alpha)
    proj_dim: int = 128  # z = Linear(feat_dim, proj_dim)(embed(view))
    pred_hidden: int = 32  # p = Linear(proj_dim, pred_hidden) -> ReLU -> Linear(pred_hidden, proj_dim) of z
    robust_form: str = "spec"  # spec: -sum_i cos(z_i, sg(p_j)); simsiam: -sum_i cos(p_i, sg(z_j)) (SimSiam's form)


@dataclass
class ExpertConfig:
    """Representation experts (trained on the long-tailed set) and classifier experts (their head re-trained
    class-balanced, cRT). The number of epochs of each is ``train.epochs`` / ``classifier_train.epochs``.

    ``kind: debiased`` trains RLDD's observer and teacher instead (``model``, ``train``, ``debiased`` and ``seed``
    only; see :class:`DebiasedExpertConfig`)."""

    kind: str = "trajectory"  # trajectory (MTT/DATM/LAD stores) | debiased (RLDD's observer and teacher)
    model: ModelConfig = field(default_factory=ModelConfig)
    num_experts: int = 100
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, lr=0.01, momentum=0.0,
                                                                   weight_decay=5e-3, batch_size=256,
                                                                   schedule="constant", dsa=True))
    classifier_experts: bool = True
    classifier_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=10, lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=256, schedule="constant", dsa=True,
        sampler="class_aware", samples_per_class_visit=4, trainable="classifier"))
    keep_epochs: list[int] | None = None  # store only these snapshot indices (0 = initial weights)
    classifier_keep_epochs: list[int] | None = None
    fp16: bool = False
    seed: int = 0
    debiased: DebiasedExpertConfig = field(default_factory=DebiasedExpertConfig)


@dataclass
class PhaseConfig:
    """One matching phase of the trajectory-matching engine (lad.md §4.4)."""

    name: str = "main"
    store: str = "representation"  # representation | classifier
    min_start_epoch: int = 0
    max_start_epoch: int = 20  # exclusive upper bound of the start epoch
    current_max_start_epoch: int | None = None  # sequential generation: upper bound at iteration 0
    expansion_end_iteration: int = 0  # iterations over which the upper bound grows to max_start_epoch (0: none)
    syn_steps: int = 20  # N
    expert_epochs: int = 2  # M
    match: str = "all"  # all | backbone | classifier: the coordinates compared with the expert
    inner_loss: str = "soft_ce"  # ce (hard labels) | soft_ce | dam (class-frequency-weighted soft CE)
    student_update: str = "all"  # all | classifier: the coordinates the student's inner steps may move
    weight: float = 1.0  # lambda of this phase
    batch_syn: int | None = None  # synthetic images per inner step (None: all)


@dataclass
class DistillConfig:
    method: str = "tm"  # tm | random | herding | kcenter | dc | dsa | dm
    ipc: int = 10
    iterations: int = 1000
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    gradient: str = "constant_memory"  # exact | constant_memory
    lr_img: float = 100.0
    lr_lr: float = 1e-5
    lr_y: float = 2.0
    momentum_img: float = 0.5
    momentum_lr: float = 0.5
    momentum_y: float = 0.9
    lr_init: float = 0.01  # initial learnable step size (lr_teacher)
    lr_min: float = 1e-6  # the step size is projected onto [lr_min, inf) after every update (stays positive)
    lr_explode_factor: float = 1e3  # stop when the step size exceeds lr_init * this
    soft_labels: bool = True  # learnable soft-label logits; False: fixed hard labels
    label_init: str = "experts_correct"  # experts_correct | expert | onehot
    label_store: str = "classifier"  # which experts initialise soft labels / pick correct images
    onehot_scale: float = 1.0
    image_init: str = "correct"  # correct | real | noise
    duplicate: bool = True  # classes with fewer usable images than IPC: duplicate cyclically (else noise)
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    temperature: float = 1.0
    dam_epsilon: float = 0.0
    dam_normalise: bool = False
    checkpoint_every: int = 50
    eval_every: int = 0  # periodic evaluation with one run of the protocol (0: only at the end)
    log_every: int = 1
    seed: int = 0
    # baseline-specific knobs (DC / DSA / DM / coresets; see ltdd.distill)
    options: dict = field(default_factory=dict)


@dataclass
class RunConfig:
    """Everything one preset fixes: data, experts, distillation and the evaluation protocol."""

    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    protocol: str = "lad"
    protocol_overrides: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)  # name -> nested overrides (e.g. "cpu")

    def protocol_config(self) -> ProtocolConfig:
        base = protocol_preset(self.protocol)
        return from_dict(type(base), merge(to_dict(base), self.protocol_overrides)) if self.protocol_overrides \
            else base


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise LtddError(f"unknown preset '{name}' (see `ltdd presets`)")
    return path


def preset_profiles(name: str) -> list[str]:
    """The profiles a preset declares itself (a derived preset must declare every profile it can run under)."""
    raw = load_yaml(_preset_path(name))
    return list((raw.get("profiles") or {}).keys())


def _compose(name: str, profile: str | None, chain: tuple[str, ...] = ()) -> dict:
    """The preset as one mapping, in the order base -> base's profile -> this preset -> this preset's profile.

    A derived preset's own values therefore always win over its base's profile; a profile may only scale what the
    preset says (experts, iterations, width, steps), and a derived preset states its own version of every profile
    it supports, so that nothing of the base's profile silently replaces what the derived preset defines.
    """
    path = _preset_path(name)
    if str(path) in chain:
        raise LtddError(f"preset '{name}' is its own base ({' -> '.join(chain)})")
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise LtddError(f"preset {path} is not a mapping")
    raw = dict(raw)
    base_name = raw.pop("base", None)
    profiles = raw.pop("profiles", None) or {}
    if profile is not None and profile not in profiles:
        raise LtddError(f"preset '{name}' has no profile '{profile}' (has: {', '.join(profiles) or 'none'})")
    out: dict = {}
    if base_name:
        base_profiles = preset_profiles(base_name)
        out = _compose(base_name, profile if profile in base_profiles else None, chain + (str(path),))
    out = merge(out, raw)
    if profile is not None:
        out = merge(out, profiles[profile] or {})
    out["profiles"] = profiles
    return out


def load_preset(name: str, profile: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a packaged preset (or a YAML path), apply a profile (e.g. ``cpu``) and dotted overrides.

    Composition order: base -> base's profile -> the preset's own values -> the preset's profile -> overrides.
    Unknown keys anywhere are an error naming the key; so are settings the chosen method does not read
    (checked by :func:`ltdd.distill.check_method_config`).
    """
    cfg_dict = merge(_compose(name, profile), parse_overrides(list(overrides)))
    cfg = from_dict(RunConfig, cfg_dict)
    from .distill.base import check_method_config  # the method registry knows what each method reads

    check_method_config(cfg)
    return cfg
