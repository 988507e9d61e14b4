"""Label modes of evaluation, teacher networks and the relabel training loop.

A distilled set can be evaluated with three kinds of training targets (``LABEL_MODES``):

- ``hard``: the hard labels only (plain cross-entropy);
- ``own``: the set's own soft labels (logits stored in the set; soft cross-entropy under the SGD protocols,
  the MSE+GT loss under the relabel protocol);
- ``teacher``: every (augmented, cut-mixed) training image is relabelled on the fly by a teacher network's
  logits - the relabel protocol (:class:`ltdd.config.RelabelConfig`).

A teacher is one file: a safetensors ``state_dict`` whose metadata names the model config (``ltdd_teacher``: model
name and arguments, classes, channels, image size, the data fingerprint it was trained on; a network file with the
same fields under ``ltdd_network``, as the debiased-expert store writes, is read the same way). ``.pt``/``.pth``
state dicts are read with ``torch.load(weights_only=True)`` beside a JSON file naming the model; nothing is ever
unpickled.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import ModelConfig, RelabelProtocolConfig, atomic_write_bytes, from_dict, to_dict
from .errors import LtddError

LABEL_MODES = ("hard", "own", "teacher")
TEACHER_KEY = "ltdd_teacher"
TEACHER_FILENAME = "teacher.safetensors"
NETWORK_KEY = "ltdd_network"  # network files of the debiased-expert store (same fields) are read as teachers too


def resolve_label_mode(mode: str | None, has_soft_labels: bool) -> str:
    """``None`` means what the set carries: ``own`` when it has soft labels, else ``hard``."""
    if mode is None:
        return "own" if has_soft_labels else "hard"
    mode = str(mode).strip().lower()
    if mode not in LABEL_MODES:
        raise LtddError(f"unknown label mode '{mode}' (known: {', '.join(LABEL_MODES)})")
    return mode


def check_label_mode(mode: str, *, has_soft_labels: bool, has_teacher: bool, relabel_protocol: bool,
                     calibrate: bool = False, protocol_name: str | None = None) -> None:
    """The rules of the label modes, one line each: ``own`` needs soft labels, ``teacher`` a teacher and a relabel
    protocol, a teacher only with ``teacher``, calibration only with ``own``."""
    if mode == "own" and not has_soft_labels:
        raise LtddError("label mode 'own' needs the set's own soft labels, and this set has none (use hard labels, "
                        "or a teacher under a relabel protocol)")
    if mode == "teacher":
        if not has_teacher:
            raise LtddError("label mode 'teacher' needs a teacher network (--teacher PATH)")
        if not relabel_protocol:
            raise LtddError(f"label mode 'teacher' relabels every training batch, which only a relabel protocol does "
                            f"(relabel or relabel_cpu), not '{protocol_name or 'this protocol'}'")
    elif has_teacher:
        raise LtddError(f"a teacher is used only with label mode 'teacher' (the label mode is '{mode}')")
    if calibrate and mode != "own":
        raise LtddError(f"calibration shifts the set's own soft labels: it applies to label mode 'own', not '{mode}'")


# ----------------------------------------------------------------------------------------------------------------
# teachers


@dataclass
class Teacher:
    """A frozen network that relabels training images; ``identity`` is what results record about it."""

    model: nn.Module
    model_cfg: ModelConfig
    meta: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(x)


def save_teacher(path: str | Path, model: nn.Module, model_cfg: ModelConfig, data, *,
                 description: str = "") -> Path:
    """Write ``model``'s state_dict and its model config as one safetensors file (atomically). ``data``: the
    prepared data it was trained on (its fingerprint is recorded and checked when the teacher is used)."""
    from safetensors.torch import save as st_save

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / TEACHER_FILENAME
    meta = {"format": 1, "model": to_dict(model_cfg), "num_classes": int(data.num_classes),
            "channels": int(data.channels), "im_size": [int(v) for v in data.im_size], "description": description,
            "fingerprint": data.fingerprint()}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, st_save(tensors, metadata={TEACHER_KEY: json.dumps(meta)}))
    return path


def _teacher_file(path: Path) -> Path:
    if path.is_dir():
        path = path / TEACHER_FILENAME
    if not path.is_file():
        raise LtddError(f"teacher not found: {path}")
    return path


def _read_teacher(path: Path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a teacher file, without unpickling anything."""
    if path.suffix in (".pt", ".pth"):
        side = path.with_suffix(".json")
        if not side.is_file():
            raise LtddError(f"teacher {path} is a .pt state_dict: it needs {side.name} beside it naming the model "
                            f"({{\"model\": {{\"name\": ..., \"args\": {{...}}}}, \"num_classes\": ..., ...}})")
        try:
            meta = json.loads(side.read_text())
            state = torch.load(path, map_location="cpu", weights_only=True)
        except json.JSONDecodeError:
            raise LtddError(f"{side} is not valid JSON") from None
        except Exception as e:  # noqa: BLE001 - anything torch cannot read safely is the file's fault
            raise LtddError(f"teacher {path} is not a plain state_dict ({str(e).splitlines()[0][:120]})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LtddError(f"teacher {path} does not hold a state_dict of tensors")
        return state, meta
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    try:
        state = st_load(path.read_bytes())
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            raw = md.get(TEACHER_KEY) or md.get(NETWORK_KEY)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise LtddError(f"teacher {path} is not a valid safetensors file ({str(e).splitlines()[0][:120]})") from None
    if raw is None:
        side = path.with_suffix(".json")
        if not side.is_file():
            raise LtddError(f"teacher {path} names no model: no '{TEACHER_KEY}' metadata and no {side.name} "
                            "beside it (write teachers with `ltdd teacher` or ltdd.labels.save_teacher)")
        raw = side.read_text()
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise LtddError(f"teacher {path}: its model description is not valid JSON") from None
    return state, meta


def load_teacher(path: str | Path, data, device=None) -> Teacher:
    """Load a teacher for ``data`` (checked: classes, channels, image size, and the data it was trained on when
    recorded); the network is frozen, in eval mode, on ``device``."""
    from .data.fingerprint import check_compatible, digest
    from .models import create_model

    path = _teacher_file(Path(path))
    state, meta = _read_teacher(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise LtddError(f"teacher {path}: its description has no 'model' entry (name and args)")
    model_cfg = from_dict(ModelConfig, meta["model"], "teacher.model")
    for key, want in (("num_classes", data.num_classes), ("channels", data.channels),
                      ("im_size", [int(v) for v in data.im_size])):
        if key in meta and meta[key] != want:
            raise LtddError(f"teacher {path} was made for {key} {meta[key]}, the data has {want}")
    if isinstance(meta.get("fingerprint"), dict):
        check_compatible(meta["fingerprint"], data, f"teacher {path}")
    model = create_model(model_cfg.name, data.num_classes, data.channels, data.im_size, **model_cfg.args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:160]
        raise LtddError(f"teacher {path} does not fit model {model_cfg.name} {model_cfg.args}: {first}") from None
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    identity = {"path": str(path), "sha256": digest(path.read_bytes()), "model": to_dict(model_cfg),
                "description": meta.get("description", "")}
    return Teacher(model, model_cfg, meta, identity)


def teacher_from_expert(store_dir: str | Path, data, kind: str = "representation", index: int | None = None):
    """(model, model_cfg) holding the final weights of one expert of a trajectory store."""
    from .experts import TrajectoryStore
    from .models import create_model
    from .models.functional import ParamLayout, load_flat

    store = TrajectoryStore(store_dir)
    meta = store.meta()
    model_cfg = from_dict(ModelConfig, meta["model"])
    model = create_model(model_cfg.name, data.num_classes, data.channels, data.im_size, **model_cfg.args)
    layout = ParamLayout(model)
    store.check(model_cfg, data, layout)
    indices = store.indices(kind)
    if not indices:
        raise LtddError(f"expert store {store_dir} has no {kind} experts")
    index = indices[0] if index is None else int(index)
    if index not in indices:
        raise LtddError(f"expert store {store_dir} has no {kind} expert {index} (has {indices[:5]}...)")
    with torch.no_grad():
        load_flat(model, layout, store.load(kind, index).final)
    return model, model_cfg


# ----------------------------------------------------------------------------------------------------------------
# the relabel loop


def cutmix(x: torch.Tensor, lam: float, perm: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Paste a box of ``x[perm]`` into ``x``; the box covers about 1 - lam of the image. Returns (mixed, lam) with
    lam recomputed from the box actually pasted (it is clipped at the border)."""
    h, w = x.shape[-2:]
    r = math.sqrt(max(0.0, 1.0 - lam))
    bh, bw = int(round(h * r)), int(round(w * r))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - bh // 2, 0), min(cy - bh // 2 + bh, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx - bw // 2 + bw, w)
    out = x.clone()
    if y1 > y0 and x1 > x0:
        out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


def relabel_loss(student_logits: torch.Tensor, mixed_onehot: torch.Tensor, target_logits: torch.Tensor | None,
                 ce_weight: float, mse_weight: float, target: str = "logits", temperature: float = 1.0) -> torch.Tensor:
    """ce_weight * CE(s, y~) + mse_weight * MSE. ``target`` logits: the mean over the batch and the classes of
    (t - s)^2 on raw logits (EDC's MSE+GT); probs: ||softmax(t / T) - softmax(s / T)||^2 summed over the classes,
    mean over the batch. ``target_logits`` None (hard labels): plain CE(s, y~)."""
    logq = F.log_softmax(student_logits, dim=1)
    ce = -(mixed_onehot * logq).sum(1).mean()
    if target_logits is None:
        return ce
    if target == "logits":
        mse = ((target_logits - student_logits) ** 2).mean()
    else:
        p_t = F.softmax(target_logits / temperature, dim=1)
        mse = ((p_t - F.softmax(student_logits / temperature, dim=1)) ** 2).sum(1).mean()
    return ce_weight * ce + mse_weight * mse


def _check_relabel(cfg: RelabelProtocolConfig) -> None:
    r = cfg.relabel
    if r.target not in ("logits", "probs"):
        raise LtddError(f"unknown relabel.target '{r.target}' (known: logits, probs)")
    if r.temperature <= 0:
        raise LtddError(f"relabel.temperature must be > 0, got {r.temperature}")
    if not 0 <= r.cutmix <= 1:
        raise LtddError(f"relabel.cutmix is a probability in [0, 1], got {r.cutmix}")
    if r.cutmix_beta <= 0:
        raise LtddError(f"relabel.cutmix_beta must be > 0, got {r.cutmix_beta}")
    if not 0 <= r.ema < 1:
        raise LtddError(f"relabel.ema must be in [0, 1), got {r.ema}")
    if r.ce_weight < 0 or r.mse_weight < 0:
        raise LtddError("relabel.ce_weight and relabel.mse_weight must be >= 0")
    if r.optimizer not in ("adamw", "sgd"):
        raise LtddError(f"unknown relabel.optimizer '{r.optimizer}' (known: adamw, sgd)")
    if any(not 0 <= m <= 1 for m in r.milestones):
        raise LtddError(f"relabel.milestones are fractions of the epochs in [0, 1], got {r.milestones}")


def train_relabel(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RelabelProtocolConfig, *,
                  num_classes: int, soft_logits: torch.Tensor | None = None, teacher: Teacher | None = None,
                  lr: float | None = None, seed: int = 0, progress: bool = False, desc: str = "relabel") -> nn.Module:
    """Train ``model`` with the relabel protocol; returns the network to test (the EMA copy when ``relabel.ema``).

    Targets: ``teacher`` given - the teacher's logits on the very batch the student sees (augmented, cut-mixed);
    ``soft_logits`` given - the set's own logits, mixed with the cutmix weight; neither - hard labels (plain CE).
    Of ``cfg.train`` it reads epochs, lr, weight_decay, momentum (sgd only), batch_size, dsa / dsa_strategy (applied
    before cutmix) and schedule (multiplied by the milestone decay); the sampler is instance-balanced.
    """
    from .train import lr_at, make_augment

    if teacher is not None and soft_logits is not None:
        raise LtddError("give either a teacher or the set's own soft labels, not both")
    _check_relabel(cfg)
    if len(x) == 0:
        raise LtddError("cannot train on an empty set")
    r = cfg.relabel
    t = cfg.train
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device).long()
    soft = soft_logits.to(device).float() if soft_logits is not None else None
    base_lr = t.lr if lr is None else float(lr)
    params = list(model.parameters())
    if r.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=base_lr, momentum=t.momentum, weight_decay=t.weight_decay)
    augment = make_augment(t)
    gen = torch.Generator()
    gen.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ema = copy.deepcopy(model) if r.ema > 0 else None
    if ema is not None:
        ema.requires_grad_(False)
    steps = [int(round(m * t.epochs)) for m in r.milestones]
    onehot = F.one_hot(y, num_classes).float()
    model.train()
    loss = torch.zeros(())
    for epoch in tqdm(range(t.epochs), desc=desc, disable=not progress, leave=False):
        step_lr = lr_at(t, epoch, base_lr) * r.gamma ** sum(epoch >= s for s in steps)
        for group in opt.param_groups:
            group["lr"] = step_lr
        order = torch.from_numpy(rng.permutation(len(x))).to(device)
        for start in range(0, len(order), t.batch_size):
            idx = order[start:start + t.batch_size]
            xb, yb = x[idx], onehot[idx]
            if augment is not None:
                xb = augment(xb, generator=gen)
            lam, perm = 1.0, None
            if r.cutmix > 0 and len(idx) > 1 and rng.random() < r.cutmix:
                perm = torch.randperm(len(idx), generator=gen).to(device)
                xb, lam = cutmix(xb, float(rng.beta(r.cutmix_beta, r.cutmix_beta)), perm, rng)
                yb = lam * yb + (1 - lam) * yb[perm]
            target = None
            if teacher is not None:
                target = teacher.logits(xb).float()
            elif soft is not None:
                target = soft[idx]
                if perm is not None:
                    target = lam * target + (1 - lam) * target[perm]
            opt.zero_grad(set_to_none=True)
            loss = relabel_loss(model(xb), yb, target, r.ce_weight, r.mse_weight, r.target, r.temperature)
            loss.backward()
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), model.parameters()):
                        pe.mul_(r.ema).add_(p.detach(), alpha=1 - r.ema)
                    for be, b in zip(ema.buffers(), model.buffers()):
                        be.copy_(b)
        if not torch.isfinite(loss):
            raise LtddError(f"training diverged (loss {loss.item()}) at epoch {epoch}; lower the learning rate")
    return ema if ema is not None else model


# ----------------------------------------------------------------------------------------------------------------
# the soft labels a method would give a random real subset (the fair baseline in 'own' mode)


def run_distill_config(set_path: str | Path) -> dict | None:
    """The ``distill`` section of the run configuration written beside a distilled set (``config.yaml`` in the
    set's folder), or None when there is none."""
    from .config import load_yaml

    p = Path(set_path)
    folder = p if p.is_dir() else p.parent
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        return None
    try:
        raw = load_yaml(cfg_path)
    except LtddError:
        return None
    d = raw.get("distill") if isinstance(raw, dict) else None
    return d if isinstance(d, dict) else None


def find_expert_store(set_path: str | Path) -> Path | None:
    """An expert store next to a distilled set (``experts`` in its folder or the folder above, as ``ltdd run``
    lays a run out), or None."""
    p = Path(set_path)
    folder = p if p.is_dir() else p.parent
    for cand in (folder / "experts", folder.parent / "experts"):
        if (cand / "store.json").is_file():
            return cand
    return None


def method_soft_labeller(distill_cfg: dict | None, data, experts_dir: str | Path | None = None):
    """How the set's method initialises soft labels, as ``(fn(images, labels) -> logits, description)``, or
    ``(None, reason)`` when it cannot be reproduced (no configuration, the method has no soft labels, or its
    initialisation needs experts that are not at hand)."""
    from .distill.init import init_soft_labels

    if not distill_cfg:
        return None, "no distillation config (config.yaml) beside the set to say how its soft labels started"
    if distill_cfg.get("method") == "rldd":  # its soft labels are its teacher's logits on the images
        if experts_dir is None or not (Path(experts_dir) / TEACHER_FILENAME).is_file():
            return None, ("RLDD's soft labels come from its teacher; pass --experts DIR (the debiased store the set "
                          "was distilled with)")
        teacher = load_teacher(Path(experts_dir) / TEACHER_FILENAME, data)
        return (lambda images, labels: _batched(teacher.model, images)), f"RLDD's teacher ({experts_dir})"
    if distill_cfg.get("method", "tm") != "tm" or not distill_cfg.get("soft_labels", True):
        return None, f"method '{distill_cfg.get('method')}' does not give images soft labels"
    mode = distill_cfg.get("label_init", "experts_correct")
    if mode == "onehot":
        scale = float(distill_cfg.get("onehot_scale", 1.0))
        return (lambda images, labels: init_soft_labels(images, labels, data.num_classes, "onehot",
                                                        onehot_scale=scale)), f"one-hot x {scale:g} (label_init)"
    if experts_dir is None:
        return None, (f"the method's soft labels ({mode}) come from experts; pass --experts DIR (the store the set "
                      "was distilled with)")
    kind = distill_cfg.get("label_store", "classifier")
    from .experts import TrajectoryStore

    indices = TrajectoryStore(experts_dir).indices(kind)
    if not indices:
        return None, f"expert store {experts_dir} has no {kind} experts"

    def fn(images, labels):
        fns = []
        for i in indices:
            net, _ = teacher_from_expert(experts_dir, data, kind, i)
            net.eval()
            fns.append(lambda x, net=net: _batched(net, x))
        return init_soft_labels(images, labels, data.num_classes, mode, fns)

    return fn, f"{mode} from the {len(indices)} {kind} experts of {experts_dir}"


@torch.no_grad()
@torch.no_grad()
def _batched(net: nn.Module, x: torch.Tensor, bs: int = 512) -> torch.Tensor:
    return torch.cat([net(x[i:i + bs]) for i in range(0, len(x), bs)])
