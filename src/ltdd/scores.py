"""DD-Ranking's scores, computed natively, in a long-tail variant.

- Label-Robust Score. HLR = acc(full real data, hard labels) - acc(distilled, hard labels); IOR = acc(distilled,
  its protocol) - acc(random real subset of the same size, the same protocol); a = w IOR - (1 - w) HLR (w = 0.5);
  LRS = (e^a - e^-1) / (e - e^-1).
- Augmentation-Robust Score. b = gamma (syn_aug - rnd_aug) + (1 - gamma) (syn_noaug - rnd_noaug) (gamma = 0.5);
  ARS = (e^b - e^-1) / (e - e^-1).

Accuracies are fractions in [0, 1] (the normalisation maps a in [-1, 1] onto [0, 1]; percentages would not).
The long-tail variant: the random subset is drawn from the long-tailed train set (a class with fewer than IPC
images repeats them cyclically) and the full-data reference is ERM on the long-tailed set (cRT as a second
reference). The score functions are pure and elementwise: scalars, per-class vectors or group means all work.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import LtddError

_LO, _HI = math.exp(-1.0), math.e


def normalise(x):
    """(e^x - e^-1) / (e - e^-1): maps [-1, 1] onto [0, 1] (elementwise)."""
    v = (np.exp(np.asarray(x, dtype=np.float64)) - _LO) / (_HI - _LO)
    return float(v) if np.ndim(v) == 0 else v


def _acc(name: str, value):
    a = np.asarray(value, dtype=np.float64)
    finite = a[np.isfinite(a)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise LtddError(f"accuracy '{name}' must be a fraction in [0, 1], got {finite.max() if finite.max() > 1 else finite.min():g}"
                        " (percentages?)")
    return a


def _out(v):
    return float(v) if np.ndim(v) == 0 else [None if not np.isfinite(x) else float(x) for x in np.ravel(v)]


def label_robust_score(full_hard, syn_hard, syn_own, rnd_own, w: float = 0.5) -> dict:
    """HLR, IOR, a and LRS from the four accuracies (fractions; scalars or arrays of one shape)."""
    if not 0 <= w <= 1:
        raise LtddError(f"the LRS weight w must be in [0, 1], got {w}")
    full_hard, syn_hard = _acc("full_hard", full_hard), _acc("syn_hard", syn_hard)
    syn_own, rnd_own = _acc("syn_own", syn_own), _acc("rnd_own", rnd_own)
    hlr = full_hard - syn_hard
    ior = syn_own - rnd_own
    a = w * ior - (1 - w) * hlr
    return {"hlr": _out(hlr), "ior": _out(ior), "a": _out(a), "lrs": _out(normalise(a)), "w": w}


def augmentation_robust_score(syn_aug, rnd_aug, syn_noaug, rnd_noaug, gamma: float = 0.5) -> dict:
    """b and ARS from the accuracies with and without augmentation (fractions; scalars or arrays)."""
    if not 0 <= gamma <= 1:
        raise LtddError(f"the ARS weight gamma must be in [0, 1], got {gamma}")
    syn_aug, rnd_aug = _acc("syn_aug", syn_aug), _acc("rnd_aug", rnd_aug)
    syn_noaug, rnd_noaug = _acc("syn_noaug", syn_noaug), _acc("rnd_noaug", rnd_noaug)
    gain_aug, gain_noaug = syn_aug - rnd_aug, syn_noaug - rnd_noaug
    b = gamma * gain_aug + (1 - gamma) * gain_noaug
    return {"gain_aug": _out(gain_aug), "gain_noaug": _out(gain_noaug), "b": _out(b), "ars": _out(normalise(b)),
            "gamma": gamma}


# ----------------------------------------------------------------------------------------------------------------
# from evaluation results


def views(result) -> dict:
    """Overall, per-class and group accuracies of an evaluation result (``evaluate_set``'s dict, or its
    ``summary``, or a plain number)."""
    if isinstance(result, (int, float)):
        return {"overall": float(result), "per_class": None, "groups": {}}
    if not isinstance(result, dict):
        raise LtddError(f"not an evaluation result: {type(result).__name__}")
    if result.get("status") == "n/a":
        raise LtddError(f"an input of the score is not available: {result.get('reason', 'n/a')}")
    s = result.get("summary", result)
    try:
        overall = s["accuracy"]["mean"] if isinstance(s["accuracy"], dict) else s["accuracy"]
    except (KeyError, TypeError):
        raise LtddError("evaluation result has no accuracy") from None
    groups = {k: (v["mean"] if isinstance(v, dict) else v) for k, v in (s.get("groups") or {}).items()}
    return {"overall": overall, "per_class": s.get("per_class"), "groups": groups}


def _breakdown(fn, inputs: dict, **kw) -> dict:
    vs = {k: views(v) for k, v in inputs.items()}
    out = {"overall": fn(**{k: v["overall"] for k, v in vs.items()}, **kw)}
    pcs = [v["per_class"] for v in vs.values()]
    if all(p is not None for p in pcs) and len({len(p) for p in pcs}) == 1:
        out["per_class"] = fn(**{k: np.asarray(v["per_class"], dtype=np.float64) for k, v in vs.items()}, **kw)
    keys = set.intersection(*(set(v["groups"]) for v in vs.values()))
    groups = {}
    for g in ("head", "medium", "tail", "many", "medium_shot", "few"):
        if g in keys and all(v["groups"][g] is not None for v in vs.values()):
            groups[g] = fn(**{k: v["groups"][g] for k, v in vs.items()}, **kw)
    out["groups"] = groups
    return out


def scores_from_results(*, full_hard, syn_hard, syn_own, rnd_own, syn_aug=None, rnd_aug=None, syn_noaug=None,
                        rnd_noaug=None, full_crt=None, w: float = 0.5, gamma: float = 0.5) -> dict:
    """LRS (and ARS when its four inputs are given) from evaluation results, with per-class and head/medium/tail
    breakdowns where every input has them. ``full_crt``: a second full-data reference (cRT), giving ``lrs_crt``."""
    out = {"lrs": _breakdown(label_robust_score, {"full_hard": full_hard, "syn_hard": syn_hard, "syn_own": syn_own,
                                                  "rnd_own": rnd_own}, w=w)}
    if full_crt is not None:
        out["lrs_crt"] = _breakdown(label_robust_score, {"full_hard": full_crt, "syn_hard": syn_hard,
                                                         "syn_own": syn_own, "rnd_own": rnd_own}, w=w)
    ars_in = {"syn_aug": syn_aug, "rnd_aug": rnd_aug, "syn_noaug": syn_noaug, "rnd_noaug": rnd_noaug}
    if all(v is not None for v in ars_in.values()):
        out["ars"] = _breakdown(augmentation_robust_score, ars_in, gamma=gamma)
    elif any(v is not None for v in ars_in.values()):
        missing = [k for k, v in ars_in.items() if v is None]
        raise LtddError(f"ARS needs all four accuracies; missing: {', '.join(missing)}")
    return out


def without_augmentation(protocol):
    """The same protocol with no augmentation (no DSA; for a relabel protocol no cutmix either)."""
    import dataclasses

    from .config import RelabelProtocolConfig

    p = dataclasses.replace(protocol, train=dataclasses.replace(protocol.train, dsa=False))
    if isinstance(p, RelabelProtocolConfig):
        p = dataclasses.replace(p, relabel=dataclasses.replace(p.relabel, cutmix=0.0))
    return p


def score_set(syn, data, protocol, label_mode=None, *, teacher=None, calibrate: bool = False, own_labeller=None,
              protocol_name: str | None = None, main: dict | None = None, baseline: dict | None = None,
              full: dict | None = None, ars: bool = True, w: float = 0.5, gamma: float = 0.5, device=None,
              seed: int = 0, runs: int | None = None, progress: bool = False) -> dict:
    """Run every evaluation LRS (and ARS) needs and assemble the scores. Results already computed can be passed
    (``main``: the set under its protocol and label mode; ``baseline``: the random subset, same; ``full``:
    :func:`~ltdd.evaluate.full_data_reference`). The distilled set's hard-label accuracy uses the same protocol
    with label mode ``hard``. Returns ``{"scores": ..., "inputs": {name: accuracy summary}}``."""
    from .evaluate import evaluate_baseline, evaluate_set, full_data_reference

    common = dict(protocol_name=protocol_name, device=device, seed=seed, runs=runs, progress=progress)
    main = main or evaluate_set(syn, data, protocol, label_mode, teacher=teacher, calibrate=calibrate, **common)
    mode = main["label_mode"]
    baseline = baseline or evaluate_baseline(syn, data, protocol, mode, teacher=teacher, calibrate=calibrate,
                                             own_labeller=own_labeller, **common)
    if baseline.get("status") == "n/a":
        raise LtddError(f"the scores need the random subset under label mode '{mode}', which is n/a: "
                        f"{baseline['reason']}")
    syn_hard = main if mode == "hard" else evaluate_set(syn, data, protocol, "hard", **common)
    full = full or full_data_reference(data, protocol, **common)
    inputs = {"full_hard": full["erm"], "syn_hard": syn_hard, "syn_own": main, "rnd_own": baseline}
    extra = {}
    if ars:
        noaug = without_augmentation(protocol)
        extra = {"syn_aug": main, "rnd_aug": baseline,
                 "syn_noaug": evaluate_set(syn, data, noaug, mode, teacher=teacher, calibrate=calibrate, **common),
                 "rnd_noaug": evaluate_baseline(syn, data, noaug, mode, teacher=teacher, calibrate=calibrate,
                                                own_labeller=own_labeller, **common)}
    scores = scores_from_results(**inputs, **extra, full_crt=full.get("crt"), w=w, gamma=gamma)
    named = {**inputs, **extra, **({"full_crt": full["crt"]} if full.get("crt") else {})}
    return {"scores": scores, "label_mode": mode, "protocol_name": protocol_name,
            "inputs": {k: views(v) for k, v in named.items()}}


def format_scores(scores: dict) -> str:
    parts = []
    lrs = scores.get("lrs", {}).get("overall")
    if lrs:
        parts.append(f"LRS {100 * lrs['lrs']:.2f} (HLR {100 * lrs['hlr']:+.2f}, IOR {100 * lrs['ior']:+.2f})")
    crt = scores.get("lrs_crt", {}).get("overall")
    if crt:
        parts.append(f"LRS vs cRT {100 * crt['lrs']:.2f}")
    ars = scores.get("ars", {}).get("overall")
    if ars:
        parts.append(f"ARS {100 * ars['ars']:.2f} (gain with aug {100 * ars['gain_aug']:+.2f}, without "
                     f"{100 * ars['gain_noaug']:+.2f})")
    return ", ".join(parts)
