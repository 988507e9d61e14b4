"""Two-stage classification (two-stage.md §6): a group classifier routes an image to a group of similar classes,
and one intra-group classifier per group picks the class inside it.

* :class:`TwoStageClassifier`: hard routing (§6.1: argmax group, then argmax class inside it) or soft routing
  (§10: ``argmax_y p(g(y)|x) p(y|x, g(y))``), with an optional group-level logit adjustment that subtracts
  ``tau * log(pi_g)`` from the group logits (§10, ``pi_g`` = the group prior of the stage-1 training data).
* :func:`train_two_stage`: ``f_group`` (|G| outputs) on stage-1 data with group labels; ``f_class^i`` (|C_i|
  outputs) on the stage-2 images of group i with local labels ``0..|C_i|-1``. Each stage takes the real
  long-tailed set or a distilled set. Soft labels of a distilled set: stage 2 restricts the logits to the group's
  columns; stage 1 sums the class probabilities per group.
* :func:`evaluate_two_stage`: :class:`~ltdd.evaluate.Metrics` on the balanced test set with ``extra`` holding
  group accuracy, train images (every image once per stage that uses it, §6.4) and the routing.
* :func:`run_ablation`: the rows of §6.3 (original + original, distilled + distilled, original + distilled) and the
  flat baselines (original flat, distilled flat) over several runs.

Every network is trained by :func:`ltdd.train.train_model`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import LtddError
from .evaluate import Metrics, summarise
from .grouping import check_groups, groups_to_labels

__all__ = [
    "TwoStageClassifier",
    "train_two_stage",
    "evaluate_two_stage",
    "metrics_from_outputs",
    "flat_metrics",
    "flat_metrics_from_logits",
    "run_ablation",
    "parse_groups",
    "ROWS",
    "ROW_LABELS",
    "STAGE_KINDS",
]

STAGE_KINDS = ("real", "distilled")
ROWS = ("original_flat", "distilled_flat", "original+original", "distilled+distilled", "original+distilled")
ROW_LABELS = {"original_flat": "Original (flat)", "distilled_flat": "Distilled (flat)",
              "original+original": "Original + Original", "distilled+distilled": "Distilled + Distilled",
              "original+distilled": "Original + Distilled"}
_ROW_STAGES = {"original+original": ("real", "real"), "distilled+distilled": ("distilled", "distilled"),
               "original+distilled": ("real", "distilled")}


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits in eval mode, batched; works for modules without parameters too."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def parse_groups(text: str, num_classes: int, class_names: Sequence[str] | None = None) -> list[list[int]]:
    """``"0,1,2,8,9;3,4,5,6,7"`` (class indices or names, groups separated by ``;``) -> validated groups."""
    if text is None or not str(text).strip():
        raise LtddError("--groups is empty; expected e.g. '0,1,2,8,9;3,4,5,6,7'")
    lookup = {str(n).lower(): i for i, n in enumerate(class_names or [])}
    groups = []
    for gi, part in enumerate(str(text).split(";")):
        members = []
        for tok in part.split(","):
            tok = tok.strip()
            if not tok:
                continue
            if tok.lstrip("-").isdigit():
                members.append(int(tok))
            elif tok.lower() in lookup:
                members.append(lookup[tok.lower()])
            else:
                raise LtddError(f"--groups: '{tok}' in group {gi + 1} is neither a class index nor a class name")
        if not members:
            raise LtddError(f"--groups: group {gi + 1} is empty in '{text}'")
        groups.append(members)
    return check_groups(groups, num_classes)


class TwoStageClassifier:
    """Group classifier + one intra-group classifier per group.

    ``class_models[i]`` maps an image to ``len(groups[i])`` logits over ``groups[i]`` in that order (local index j
    is global class ``groups[i][j]``); it may be ``None`` for a single-class group. ``group_priors`` (pi_g) are used
    by the group-prior correction when :meth:`predict` is not given its own.
    """

    def __init__(self, group_model: nn.Module, class_models: list, groups: list[list[int]],
                 num_classes: int | None = None, group_priors: Sequence[float] | None = None):
        n = num_classes if num_classes is not None else 1 + max(c for g in groups for c in g)
        self.groups = check_groups(groups, n)
        self.num_classes = n
        if len(class_models) != len(self.groups):
            raise LtddError(f"{len(class_models)} intra-group classifiers for {len(self.groups)} groups")
        for gi, (m, g) in enumerate(zip(class_models, self.groups)):
            if m is None and len(g) > 1:
                raise LtddError(f"group {gi + 1} has {len(g)} classes but no intra-group classifier")
        self.group_model = group_model
        self.class_models = list(class_models)
        self.group_of = groups_to_labels(self.groups, n)
        self.group_priors = None if group_priors is None else [float(p) for p in group_priors]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def to(self, device) -> "TwoStageClassifier":
        self.group_model.to(device)
        for m in self.class_models:
            if m is not None:
                m.to(device)
        return self

    def _priors(self, group_priors) -> torch.Tensor:
        pri = group_priors if group_priors is not None else self.group_priors
        if pri is None:
            raise LtddError("group-prior correction needs group priors (train_two_stage sets them; or pass "
                            "group_priors)")
        pri = torch.as_tensor(np.asarray(pri, dtype=np.float64), dtype=torch.float32).flatten()
        if len(pri) != self.num_groups or (pri <= 0).any():
            raise LtddError(f"group priors must be {self.num_groups} positive numbers, got {pri.tolist()}")
        return pri / pri.sum()

    def raw_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One pass of every network: raw group logits ``(N, |G|)`` and, per group, ``log p(y | x, g)`` over that
        group's classes ``(N, |C_i|)``. The ``*_from`` methods turn these into decisions without re-running."""
        z = _logits(self.group_model, x)
        if z.ndim != 2 or z.shape[1] != self.num_groups:
            raise LtddError(f"group classifier gives {tuple(z.shape)} logits, expected (N, {self.num_groups})")
        return z, self.local_log_probs(x)

    def adjust(self, z: torch.Tensor, group_prior_tau: float = 0.0, group_priors=None) -> torch.Tensor:
        """Group-level logit adjustment: ``z - tau * log(pi_g)`` (tau = 0: ``z`` unchanged)."""
        if group_prior_tau:
            z = z - float(group_prior_tau) * torch.log(self._priors(group_priors))[None, :]
        return z

    def group_logits(self, x: torch.Tensor, group_prior_tau: float = 0.0, group_priors=None) -> torch.Tensor:
        """``f_group(x) - tau * log(pi_g)`` ``(N, |G|)`` (tau = 0: the raw logits)."""
        z = _logits(self.group_model, x)
        if z.ndim != 2 or z.shape[1] != self.num_groups:
            raise LtddError(f"group classifier gives {tuple(z.shape)} logits, expected (N, {self.num_groups})")
        return self.adjust(z, group_prior_tau, group_priors)

    def group_predictions(self, x: torch.Tensor, group_prior_tau: float = 0.0, group_priors=None) -> torch.Tensor:
        """Predicted group index per image (after the optional group-prior correction)."""
        return self.group_logits(x, group_prior_tau, group_priors).argmax(1)

    def local_log_probs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per group, ``log p(y | x, g)`` over that group's classes, ``(N, |C_i|)``."""
        out = []
        for gi, (m, g) in enumerate(zip(self.class_models, self.groups)):
            if m is None:
                out.append(torch.zeros(len(x), 1))
                continue
            z = _logits(m, x)
            if z.ndim != 2 or z.shape[1] != len(g):
                raise LtddError(f"intra-group classifier {gi + 1} gives {tuple(z.shape)} logits, expected "
                                f"(N, {len(g)})")
            out.append(torch.log_softmax(z, 1))
        return out

    def scores_from(self, z: torch.Tensor, local: list[torch.Tensor], group_prior_tau: float = 0.0,
                    group_priors=None) -> torch.Tensor:
        """Soft-routing scores ``log p(g(y)|x) + log p(y|x, g(y))`` in global class order, ``(N, C)``."""
        lg = torch.log_softmax(self.adjust(z, group_prior_tau, group_priors), 1)
        scores = torch.empty(len(z), self.num_classes)
        for gi, g in enumerate(self.groups):
            scores[:, g] = lg[:, gi:gi + 1] + local[gi]
        return scores

    def predict_from(self, z: torch.Tensor, local: list[torch.Tensor], routing: str = "hard",
                     group_prior_tau: float = 0.0, group_priors=None) -> torch.Tensor:
        """:meth:`predict` from :meth:`raw_outputs`."""
        if routing == "soft":
            return self.scores_from(z, local, group_prior_tau, group_priors).argmax(1)
        if routing != "hard":
            raise LtddError(f"unknown routing '{routing}' (known: hard, soft)")
        gpred = self.adjust(z, group_prior_tau, group_priors).argmax(1)
        out = torch.empty(len(z), dtype=torch.long)
        for gi, g in enumerate(self.groups):
            sel = gpred == gi
            if sel.any():
                out[sel] = torch.as_tensor(g, dtype=torch.long)[local[gi][sel].argmax(1)]
        return out

    def class_scores(self, x: torch.Tensor, group_prior_tau: float = 0.0, group_priors=None) -> torch.Tensor:
        """Soft-routing scores for ``x`` (see :meth:`scores_from`)."""
        z, local = self.raw_outputs(x)
        return self.scores_from(z, local, group_prior_tau, group_priors)

    def predict(self, x: torch.Tensor, routing: str = "hard", group_prior_tau: float = 0.0,
                group_priors=None) -> torch.Tensor:
        """Global class predictions. ``hard``: argmax group, then argmax class inside that group (re-indexed from
        local to global through ``groups``). ``soft``: ``argmax_y p(g(y)|x) p(y|x, g(y))``. ``group_prior_tau``
        subtracts ``tau * log(pi_g)`` from the group logits first."""
        z, local = self.raw_outputs(x)
        return self.predict_from(z, local, routing, group_prior_tau, group_priors)


# ----------------------------------------------------------------------------------------------------------------
# training


def _stage_data(kind: str, data, synthetic, stage: str):
    """(x, targets, hard labels) for one stage; targets are soft-label logits when the distilled set has them."""
    if kind == "real":
        return data.train_x, data.train_y, data.train_y
    if kind == "distilled":
        if synthetic is None:
            raise LtddError(f"{stage} uses distilled data but no distilled set was given")
        if tuple(synthetic.images.shape[1:]) != (data.channels, *data.im_size):
            raise LtddError(f"distilled images have shape {tuple(synthetic.images.shape[1:])}, expected "
                            f"{(data.channels, *data.im_size)} for dataset {data.name}")
        if len(synthetic.labels) and (int(synthetic.labels.max()) >= data.num_classes or
                                      int(synthetic.labels.min()) < 0):
            raise LtddError(f"distilled labels go up to {int(synthetic.labels.max())}, but {data.name} has "
                            f"{data.num_classes} classes")
        soft = synthetic.soft_labels
        if soft is not None and soft.shape[1] != data.num_classes:
            raise LtddError(f"soft labels have {soft.shape[1]} columns, expected {data.num_classes}")
        return synthetic.images, (soft.float() if soft is not None else synthetic.labels.long()), \
            synthetic.labels.long()
    raise LtddError(f"unknown {stage} data '{kind}' (known: real, distilled)")


def _new_model(model_cfg, num_outputs: int, data, seed: int, device):
    from .models import create_model

    torch.manual_seed(seed)
    m = create_model(model_cfg.name, num_outputs, data.channels, data.im_size, **model_cfg.args)
    return m.to(device) if device is not None else m


def train_two_stage(data, groups, stage1: str = "real", stage2: str = "distilled", synthetic=None, model_cfg=None,
                    train_cfg=None, seed: int = 0, device=None, progress: bool = False):
    """Train ``f_group`` on ``stage1`` data (group labels) and one intra-group classifier per group on the
    ``stage2`` images of its classes (local labels). Returns ``(TwoStageClassifier, info)``; ``info`` holds
    ``train_images`` (stage-1 images + stage-2 images, §6.4), per-stage counts and the stage-1 group prior.

    Soft labels (distilled set, logits over all classes): stage 2 keeps the group's columns (renormalised by the
    softmax inside the loss); stage 1 uses ``T * logsumexp_{c in g}(z_c / T)``, whose softmax at temperature T is
    the summed class probability of each group.
    """
    from .config import ModelConfig, protocol_preset
    from .train import train_model

    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or protocol_preset("dc").train
    groups = check_groups(groups, data.num_classes)
    gof = torch.from_numpy(groups_to_labels(groups, data.num_classes))
    G = len(groups)

    # stage 1: the group classifier
    x1, t1, h1 = _stage_data(stage1, data, synthetic, "stage 1")
    if t1.dtype.is_floating_point:
        T = float(train_cfg.temperature)
        z = t1 / T
        y1 = torch.stack([T * torch.logsumexp(z[:, g], 1) for g in groups], 1)
    else:
        y1 = gof[t1]
    group_counts = torch.bincount(gof[h1], minlength=G)
    if (group_counts == 0).any():
        empty = [gi + 1 for gi in range(G) if group_counts[gi] == 0]
        raise LtddError(f"stage-1 {stage1} data has no image of group(s) {empty}")
    group_model = _new_model(model_cfg, G, data, seed, device)
    train_model(group_model, x1, y1, train_cfg, num_classes=G, class_counts=group_counts.tolist(), seed=seed,
                progress=progress, desc=f"group classifier ({stage1})")

    # stage 2: one classifier per group, local labels
    x2, t2, h2 = _stage_data(stage2, data, synthetic, "stage 2")
    class_models: list = []
    n2 = 0
    per_group = []
    for gi, g in enumerate(groups):
        sel = torch.nonzero(gof[h2] == gi).flatten()
        if len(sel) == 0:
            raise LtddError(f"stage-2 {stage2} data has no image of group {gi + 1} (classes {g})")
        n2 += len(sel)
        per_group.append(int(len(sel)))
        if len(g) == 1:
            class_models.append(None)  # nothing to decide inside a single-class group
            continue
        local = torch.full((data.num_classes,), -1, dtype=torch.long)
        local[g] = torch.arange(len(g))
        yt = t2[sel][:, g] if t2.dtype.is_floating_point else local[t2[sel]]
        counts = torch.bincount(local[h2[sel]], minlength=len(g)).tolist()
        m = _new_model(model_cfg, len(g), data, seed + 1 + gi, device)
        train_model(m, x2[sel], yt, train_cfg, num_classes=len(g), class_counts=counts, seed=seed + 1 + gi,
                    progress=progress, desc=f"intra-group classifier {gi + 1} ({stage2})")
        class_models.append(m)

    priors = (group_counts.double() / group_counts.sum()).tolist()
    clf = TwoStageClassifier(group_model, class_models, groups, data.num_classes, group_priors=priors)
    info = {"stage1": stage1, "stage2": stage2, "stage1_images": int(len(x1)), "stage2_images": int(n2),
            "train_images": int(len(x1) + n2), "stage2_images_per_group": per_group,
            "group_priors": priors, "groups": groups}
    return clf, info


# ----------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate_two_stage(clf: TwoStageClassifier, data, routing: str = "hard", group_prior_tau: float = 0.0,
                       group_priors=None, train_images: int | None = None, variants: bool = False) -> Metrics:
    """Test-set :class:`Metrics` of a two-stage classifier. ``extra``: ``group_accuracy`` (Pr[g_hat = g(y)] of
    the group classifier, after the prior correction), ``within_group_accuracy`` (accuracy among correctly routed
    images), ``train_images``, ``routing``, ``group_prior_tau``, ``group_recall`` (per group). ``variants``: also
    the accuracy of the same networks under hard and soft routing with tau = 0 and with the given tau (or 1):
    ``acc_hard``, ``acc_soft``, ``acc_hard_tau1``, ... (one forward pass serves them all)."""
    z, local = clf.raw_outputs(data.test_x)
    return metrics_from_outputs(clf, data, z, local, routing, group_prior_tau, group_priors, train_images, variants)


def metrics_from_outputs(clf: TwoStageClassifier, data, z: torch.Tensor, local: list[torch.Tensor],
                         routing: str = "hard", group_prior_tau: float = 0.0, group_priors=None,
                         train_images: int | None = None, variants: bool = False) -> Metrics:
    """:func:`evaluate_two_stage` from the networks' test-set outputs (:meth:`TwoStageClassifier.raw_outputs`:
    group logits ``z`` and per-group ``log p(y | x, g)``), e.g. logits stored when the networks were trained."""
    y = data.test_y
    pred = clf.predict_from(z, local, routing, group_prior_tau, group_priors)
    m = Metrics.from_predictions(y.numpy(), pred.numpy(), data.num_classes, data.groups)
    gtrue = torch.from_numpy(clf.group_of)[y]
    gpred = clf.adjust(z, group_prior_tau, group_priors).argmax(1)
    routed = gpred == gtrue
    m.extra.update({
        "group_accuracy": float(routed.float().mean()),
        "within_group_accuracy": float((pred[routed] == y[routed]).float().mean()) if routed.any() else None,
        "group_recall": [float(routed[gtrue == gi].float().mean()) if (gtrue == gi).any() else None
                         for gi in range(clf.num_groups)],
        "routing": routing,
        "group_prior_tau": float(group_prior_tau),
    })
    if variants:
        have_priors = group_priors is not None or clf.group_priors is not None
        taus = [0.0] + (([float(group_prior_tau)] if group_prior_tau else [1.0]) if have_priors else [])
        for r in ("hard", "soft"):
            for t in taus:
                p = clf.predict_from(z, local, r, t, group_priors)
                m.extra[f"acc_{r}" + (f"_tau{t:g}" if t else "")] = float((p == y).float().mean())
    if train_images is not None:
        m.extra["train_images"] = int(train_images)
    return m


def flat_metrics(model: nn.Module, data, groups=None, train_images: int | None = None) -> Metrics:
    """Test-set metrics of a flat classifier; with ``groups``, ``extra['group_accuracy']`` is the share of test
    images whose predicted class lies in the true class's group (comparable with the two-stage rows)."""
    return flat_metrics_from_logits(_logits(model, data.test_x), data, groups, train_images)


def flat_metrics_from_logits(logits: torch.Tensor, data, groups=None, train_images: int | None = None) -> Metrics:
    """:func:`flat_metrics` from the classifier's test-set logits."""
    y = data.test_y
    pred = logits.argmax(1)
    m = Metrics.from_predictions(y.numpy(), pred.numpy(), data.num_classes, data.groups)
    if groups is not None:
        gof = torch.from_numpy(groups_to_labels(groups, data.num_classes))
        m.extra["group_accuracy"] = float((gof[pred] == gof[y]).float().mean())
    if train_images is not None:
        m.extra["train_images"] = int(train_images)
    return m


def run_ablation(data, synthetic, groups=None, *, model_cfg=None, train_cfg=None, rows: Sequence[str] = ROWS,
                 runs: int = 1, seed: int = 0, routing: str = "hard", group_prior_tau: float = 0.0, device=None,
                 groups_fn: Callable[[nn.Module], list[list[int]]] | None = None, progress: bool = False,
                 log: Callable[[str], None] | None = None) -> dict:
    """The table of §6.3: flat baselines and two-stage rows, ``runs`` runs each (seeds ``seed * 1000 + r``).

    ``groups``: the partition; when ``None``, ``groups_fn(model)`` computes it from the first original-flat model
    (which is then reused as that row's first run), e.g. max-cut on its probe features. Returns ``{"groups",
    "rows": {row: {"label", "train_images", "summary", "runs"}}, "seconds"}``; two-stage runs carry, in ``extra``,
    the accuracies of the other routing variants of the same trained models (``acc_hard``, ``acc_soft``,
    ``acc_*_tau...``).
    """
    from .config import ModelConfig, protocol_preset
    from .train import train_model

    say = log or (lambda s: None)
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or protocol_preset("dc").train
    rows = list(rows)
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise LtddError(f"unknown ablation row '{bad[0]}' (known: {', '.join(ROWS)})")
    if routing not in ("hard", "soft"):
        raise LtddError(f"unknown routing '{routing}' (known: hard, soft)")
    needs_syn = any(r in ("distilled_flat", "distilled+distilled", "original+distilled") for r in rows)
    if needs_syn and synthetic is None:
        raise LtddError("the distilled rows need a distilled set")
    if synthetic is not None:
        _stage_data("distilled", data, synthetic, "distilled set")  # validate once, early
    t0 = time.time()

    def flat(kind: str, s: int):
        x, t, _ = _stage_data(kind, data, synthetic, kind)
        m = _new_model(model_cfg, data.num_classes, data, s, device)
        train_model(m, x, t, train_cfg, num_classes=data.num_classes, seed=s, progress=progress,
                    desc=f"flat ({kind})")
        return m, int(len(x))

    first_flat = None
    groups_source = "given"
    if groups is None:
        if groups_fn is None:
            raise LtddError("no groups given and no way to compute them (groups_fn)")
        say("training the original-flat model that defines the groups")
        first_flat = flat("real", seed * 1000)
        groups = groups_fn(first_flat[0])
        groups_source = "computed from the first original-flat model"
    groups = check_groups(groups, data.num_classes)

    out_rows: dict = {}
    for row in rows:
        results: list[Metrics] = []
        n_img = None
        for r in range(runs):
            s = seed * 1000 + r
            say(f"{ROW_LABELS[row]}: run {r + 1}/{runs}")
            if row in ("original_flat", "distilled_flat"):
                kind = "real" if row == "original_flat" else "distilled"
                if kind == "real" and r == 0 and first_flat is not None:
                    model, n_img = first_flat
                else:
                    model, n_img = flat(kind, s)
                results.append(flat_metrics(model, data, groups, n_img))
            else:
                st1, st2 = _ROW_STAGES[row]
                clf, info = train_two_stage(data, groups, st1, st2, synthetic, model_cfg, train_cfg, seed=s,
                                            device=device, progress=progress)
                n_img = info["train_images"]
                m = evaluate_two_stage(clf, data, routing, group_prior_tau, train_images=n_img, variants=True)
                m.extra["group_priors"] = info["group_priors"]
                results.append(m)
        out_rows[row] = {"label": ROW_LABELS[row], "train_images": n_img, "summary": summarise(results),
                         "runs": [m.to_dict() for m in results]}
    return {"groups": groups, "groups_source": groups_source, "routing": routing,
            "group_prior_tau": float(group_prior_tau), "runs": int(runs), "rows": out_rows,
            "model_config": {"name": model_cfg.name, "args": dict(model_cfg.args)},
            "train_config": dataclasses.asdict(train_cfg), "seconds": time.time() - t0}
