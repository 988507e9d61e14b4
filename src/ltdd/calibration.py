"""Post-hoc soft-label calibration for long-tailed distilled sets (ADSA).

Soft labels learned or relabelled on a long-tailed set lean toward the head classes. With the long-tailed train
priors pi and a scalar tau, p(y | x; tau) = softmax_y(f_y(x) - tau * log pi_y). For each class i, the mean
confidence on the set's images of class i is p_i(tau) = mean_{x in S_i} p(y = i | x; tau); the calibrated tau* is
the tau that makes these confidences most even, argmin_tau std_i p_i(tau) (population std over the classes that
have images). The search: a grid of ``grid`` points over [lo, hi] (default [-2, 4], step 0.1), then a bounded
scalar minimisation (scipy's bounded Brent, tolerance ``tol``) inside the two grid cells around the best grid
point. The stored soft labels are the shifted logits f - tau* log pi. Training needs nothing new.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import LtddError

DEFAULT_RANGE = (-2.0, 4.0)
DEFAULT_GRID = 61
DEFAULT_TOL = 1e-4


def log_priors(counts) -> torch.Tensor:
    """log pi with pi = counts / sum(counts), float64; every class needs at least one training image."""
    n = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    if n.ndim != 1 or n.numel() == 0:
        raise LtddError("class counts must be a non-empty list")
    if (n <= 0).any():
        bad = int(torch.nonzero(n <= 0)[0])
        raise LtddError(f"class {bad} has no training images: its prior is zero and log-prior calibration is "
                        "undefined")
    return torch.log(n / n.sum())


def class_confidences(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor, tau: float,
                      num_classes: int | None = None) -> np.ndarray:
    """p_i(tau) for every class i (NaN for a class without images in the set)."""
    num_classes = num_classes or logits.shape[1]
    f = logits.double() - float(tau) * log_prior.double().unsqueeze(0)
    p = torch.softmax(f, dim=1)
    own = p.gather(1, labels.long().view(-1, 1)).squeeze(1)
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        sel = labels == c
        if sel.any():
            out[c] = float(own[sel].mean())
    return out


def confidence_std(logits, labels, log_prior, tau: float) -> float:
    conf = class_confidences(logits, labels, log_prior, tau)
    return float(np.std(conf[~np.isnan(conf)]))


def find_tau(logits: torch.Tensor, labels: torch.Tensor, counts, *, lo: float = DEFAULT_RANGE[0],
             hi: float = DEFAULT_RANGE[1], grid: int = DEFAULT_GRID, tol: float = DEFAULT_TOL) -> tuple[float, dict]:
    """tau* = argmin_tau std_i p_i(tau) over [lo, hi] (grid, then a bounded scalar minimisation); returns
    (tau*, a description of the search)."""
    from scipy.optimize import minimize_scalar

    if logits is None:
        raise LtddError("the set has no soft labels to calibrate (calibration shifts soft-label logits)")
    if logits.ndim != 2 or len(logits) != len(labels):
        raise LtddError(f"soft labels have shape {tuple(logits.shape)}, expected ({len(labels)}, num_classes)")
    if not lo < hi:
        raise LtddError(f"the search range must have lo < hi, got [{lo}, {hi}]")
    if grid < 3:
        raise LtddError(f"the search grid needs at least 3 points, got {grid}")
    lp = log_priors(counts)
    if len(lp) != logits.shape[1]:
        raise LtddError(f"{len(lp)} class counts for soft labels over {logits.shape[1]} classes")
    if int((torch.bincount(labels.long(), minlength=logits.shape[1]) > 0).sum()) < 2:
        raise LtddError("calibration needs images of at least two classes (it evens out per-class confidences)")
    taus = np.linspace(lo, hi, grid)
    vals = np.array([confidence_std(logits, labels, lp, t) for t in taus])
    k = int(np.argmin(vals))
    a, b = taus[max(k - 1, 0)], taus[min(k + 1, grid - 1)]
    res = minimize_scalar(lambda t: confidence_std(logits, labels, lp, t), bounds=(a, b), method="bounded",
                          options={"xatol": tol})
    tau, best = (float(res.x), float(res.fun)) if res.fun <= vals[k] else (float(taus[k]), float(vals[k]))
    info = {"range": [float(lo), float(hi)], "grid": int(grid), "tolerance": float(tol),
            "refine": "bounded scalar minimisation in the grid cells around the best grid point",
            "objective": "population std over classes of the mean own-class confidence", "std_at_tau": best,
            "at_boundary": bool(k in (0, grid - 1))}
    return tau, info


def calibrate_logits(logits: torch.Tensor, labels: torch.Tensor, counts, **search) -> tuple[torch.Tensor, dict]:
    """The shifted logits f - tau* log pi and a record: tau*, the search, the priors and the per-class mean
    confidences before (tau = 0) and after."""
    tau, how = find_tau(logits, labels, counts, **search)
    lp = log_priors(counts)
    shifted = (logits.double() - tau * lp.unsqueeze(0)).to(logits.dtype)
    before = class_confidences(logits, labels, lp, 0.0)
    after = class_confidences(logits, labels, lp, tau)

    def _list(a):
        return [None if np.isnan(v) else float(v) for v in a]

    info = {"method": "adsa", "tau": tau, "search": how, "priors": torch.exp(lp).tolist(),
            "confidence_before": _list(before), "confidence_after": _list(after),
            "std_before": float(np.nanstd(before)), "std_after": float(np.nanstd(after))}
    return shifted, info


def set_train_counts(syn, data=None) -> list[int]:
    """The long-tailed train class counts for a set: the data's when given, else those the set recorded."""
    if data is not None:
        return [int(c) for c in data.train_counts]
    for rec in (syn.meta, syn.meta.get("fingerprint") or {}):
        counts = rec.get("train_counts") if isinstance(rec, dict) else None
        if counts:
            return [int(c) for c in counts]
    raise LtddError("the set records no training class counts (train_counts); give the data it was made from")


def calibrate_set(syn, data=None, **search):
    """A new :class:`~ltdd.synset.SyntheticSet` with calibrated soft labels (the input is not modified) and the
    calibration record, which is also stored in the new set's metadata under ``calibration``."""
    from .synset import SyntheticSet

    if syn.soft_labels is None:
        raise LtddError("the set has no soft labels to calibrate (calibration shifts soft-label logits; a set with "
                        "hard labels only has nothing to shift)")
    counts = set_train_counts(syn, data)
    shifted, info = calibrate_logits(syn.soft_labels.float(), syn.labels, counts, **search)
    info["train_counts"] = counts
    meta = dict(syn.meta)
    if "calibration" in meta:
        info["previous"] = meta["calibration"]
    meta["calibration"] = info
    return SyntheticSet(syn.images.clone(), syn.labels.clone(), shifted, syn.lr, meta), info
