"""What an export states about its set: file-name and format constants, class folders, provenance (run
configuration, protocol) and the contents of ``manifest.json``."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LtddError
from ..synset import SyntheticSet

MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"
PREPROCESSING = "preprocessing.safetensors"
SOFT_LABELS = "soft_labels.safetensors"
TEACHER = "teacher.safetensors"
TEACHER_INFO = "teacher.json"
TEACHER_PT = "teacher_model.pt"
TEACHER_PT_INFO = "teacher_model.json"
FORMAT = "ltdd-export"
FORMAT_VERSION = 1

_BAD_CHARS = '/\\\0:*?"<>|'


def class_folder_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """One safe, distinct folder name per class (``str(c)`` when no names are given)."""
    if class_names is None:
        class_names = [str(c) for c in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) < num_classes:
        raise LtddError(f"{len(names)} class names given, but the set has labels up to {num_classes - 1}")
    out = []
    for c, n in enumerate(names):
        safe = "".join("_" if ch in _BAD_CHARS or ord(ch) < 32 else ch for ch in n).strip()
        if safe in ("", ".", "..") or safe.startswith("."):
            safe = f"class_{c}" if safe in ("", ".", "..") else "_" + safe[1:]
        out.append(safe)
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise LtddError(f"class names give the same folder name more than once: {dup[:5]}")
    return out


def _preprocessor(preprocessor_or_data):
    pre = getattr(preprocessor_or_data, "preprocessor", preprocessor_or_data)
    if isinstance(pre, (str, Path)) or not hasattr(pre, "to_pixels"):
        raise TypeError("export needs the Preprocessor the set was distilled with, or the PreparedData holding it")
    if not getattr(pre, "fitted", False):
        raise LtddError("the preprocessing given for export has not been fitted")
    return pre


def _is_prepared(data) -> bool:
    return all(hasattr(data, k) for k in ("split", "train_counts", "train_y", "preprocessor", "num_classes"))


def _setup(synset: SyntheticSet, preprocessor_or_data, class_names):
    pre = _preprocessor(preprocessor_or_data)
    if _is_prepared(preprocessor_or_data):  # the manifest states this data's split and statistics: they must fit
        synset.check_compatible(preprocessor_or_data, "the distilled set")
    if class_names is None:
        class_names = getattr(preprocessor_or_data, "class_names", None)
    labels = synset.labels.detach().long().cpu()
    n = len(labels)
    if n and int(labels.min()) < 0:
        raise LtddError(f"distilled labels must be >= 0, found {int(labels.min())}")
    num_classes = max(len(class_names) if class_names is not None else 0, int(labels.max()) + 1 if n else 0,
                      int(getattr(preprocessor_or_data, "num_classes", 0) or 0),
                      int(synset.soft_labels.shape[1]) if synset.soft_labels is not None else 0)
    folders = class_folder_names(class_names, num_classes)
    names = [str(v) for v in class_names] if class_names is not None else list(folders)
    return pre, labels, num_classes, names[:num_classes], folders


def _json_clean(obj):
    return json.loads(json.dumps(obj, default=str))


def find_run_config(set_path: str | Path) -> dict | None:
    """The resolved run configuration recorded beside a distilled set: ``config.yaml`` in its folder (what
    ``ltdd distill`` writes), or the one an export's manifest carries; ``None`` when there is none."""
    from ..config import load_yaml

    p = Path(set_path)
    folder = p if p.is_dir() else p.parent
    if (folder / MANIFEST).is_file():
        try:
            rc = json.loads((folder / MANIFEST).read_text()).get("method", {}).get("run_config")
        except (json.JSONDecodeError, AttributeError, OSError):
            rc = None
        if isinstance(rc, dict):
            return rc
    if (folder / "config.yaml").is_file():
        rc = load_yaml(folder / "config.yaml")
        if isinstance(rc, dict) and ("distill" in rc or "protocol" in rc):  # a run's config, not e.g. `ltdd train`'s
            return rc
    return None


def _protocol(meta: dict, rc: dict) -> dict | None:
    """The evaluation protocol the set was made for: from its metadata, else from its run configuration."""
    from .. import config as C

    rec = meta.get("protocol")
    if isinstance(rec, dict):
        return {"name": meta.get("protocol_name"), "config": rec, "source": "set metadata"}
    name = rec if isinstance(rec, str) else rc.get("protocol")
    if not isinstance(name, str):
        return None
    overrides = rc.get("protocol_overrides") or {} if not isinstance(rec, str) else {}
    source = "set metadata" if isinstance(rec, str) else "run configuration"
    try:
        cfg = C.from_dict(C.RunConfig, {"protocol": name, "protocol_overrides": overrides}).protocol_config()
        return {"name": name, "overrides": overrides, "config": C.to_dict(cfg), "source": source}
    except LtddError as e:
        return {"name": name, "overrides": overrides, "config": None, "source": f"{source} (not resolved: {e})"}


def _same_data(a, b) -> bool:
    from .. import config as C

    try:
        return C.to_dict(C.from_dict(C.DataConfig, a)) == C.to_dict(C.from_dict(C.DataConfig, b))
    except LtddError:
        return False


def _provenance(synset: SyntheticSet, run_config: dict | None) -> dict:
    meta = synset.meta if isinstance(synset.meta, dict) else {}
    rc = run_config if isinstance(run_config, dict) else {}
    if isinstance(rc.get("data"), dict) and isinstance(meta.get("data"), dict) and not _same_data(rc["data"],
                                                                                                   meta["data"]):
        raise LtddError("the run configuration given describes other data than the set records (dataset, split or "
                        "preprocessing differ): it is not this set's run (give the right config.yaml with --run-config)")
    distill = rc.get("distill") if isinstance(rc.get("distill"), dict) else meta.get("distill")
    distill = distill if isinstance(distill, dict) else {}
    ipc = meta.get("ipc", distill.get("ipc"))
    return {"meta": meta, "run_config": rc or None, "distill": distill or None,
            "method": meta.get("method", distill.get("method")), "ipc": int(ipc) if ipc is not None else None,
            "protocol": _protocol(meta, rc)}


def _manifest(synset: SyntheticSet, data, layout: str, class_names: list[str], num_classes: int, prov: dict,
              pre, pre_file: str) -> dict:
    """Everything but ``files`` and the layout-specific section."""
    from .. import __version__
    from ..data.fingerprint import digest, fingerprint, split_sha

    labels = synset.labels.detach().long().cpu()
    per_class = np.bincount(labels.numpy(), minlength=num_classes).tolist() if len(labels) else [0] * num_classes
    ipc = prov["ipc"]
    prepared = _is_prepared(data)
    real = [int(c) for c in data.train_counts] if prepared else None
    distill = prov["distill"] or {}
    duplicate = distill.get("duplicate")
    policy = None if duplicate is None else ("duplicate_cyclic" if duplicate else "noise")

    classes = []
    for c in range(num_classes):
        entry = {"index": c, "name": class_names[c], "synthetic_count": int(per_class[c])}
        if real is not None:
            entry["real_train_count"] = real[c]
            entry["below_ipc"] = bool(ipc is not None and real[c] < ipc)
        classes.append(entry)

    dataset = None
    if prepared:
        fp = fingerprint(data)
        dcfg = prov["meta"].get("data") if isinstance(prov["meta"].get("data"), dict) else None
        dataset = {"name": data.name, "num_classes": int(data.num_classes), "channels": int(data.channels),
                   "im_size": [int(v) for v in data.im_size],
                   "imbalance_factor": float(data.split.imbalance_factor), "profile": data.split.profile,
                   "split_seed": int(data.split.seed), "n_max": int(data.split.n_max),
                   "frequency_order": [int(c) for c in data.split.class_order],
                   "train_counts": real, "num_train": int(sum(real)),
                   "test_counts": [int(c) for c in getattr(data, "test_counts", [])],
                   "split_sha": split_sha(data), "fingerprint": fp, "config": dcfg}

    pcfg = pre.config()
    zca_keys = {k: list(v.shape) for k, v in pre.state_dict().items()}
    steps = ["pixels = uint8 / 255 as float32 (N, C, H, W)"]
    if pcfg.get("normalize"):
        steps.append("x = (x - mean[c]) / std[c] per channel (normalizer.mean / normalizer.std)")
    if pcfg.get("zca"):
        steps.append("x = ((x.flatten(1) - zca.mean) @ zca.matrix).reshape(N, C, H, W); inverse: "
                     "x.flatten(1) @ zca.inverse + zca.mean")
    preprocessing = {"steps": steps, "normalize": bool(pcfg.get("normalize")), "mean": pcfg.get("mean"),
                     "std": pcfg.get("std"), "zca": bool(pcfg.get("zca")),
                     "zca_eps": pcfg.get("zca_eps") if pcfg.get("zca") else None, "zca_dim": pcfg.get("zca_dim"),
                     "file": pre_file, "tensors": zca_keys, "config": pcfg, "digest": digest(pcfg),
                     "fitted_on": ({"split": "the long-tailed train split (not a balanced set)",
                                    "dataset": data.name, "num_images": int(sum(real)), "train_counts": real,
                                    "split_sha": split_sha(data), "fingerprint": dataset["fingerprint"]}
                                   if prepared else {"split": "not recorded (exported without its prepared data)"})}

    protocol = prov["protocol"]
    ptrain = (protocol or {}).get("config") or {}
    ptemp = (ptrain.get("train") or {}).get("temperature") if isinstance(ptrain, dict) else None
    soft = synset.soft_labels is not None
    labels_info = {"type": "soft_logits" if soft else "hard", "num_classes": num_classes,
                   "hard_labels": "kept: the class of each image (its folder / its class-major position)",
                   "temperature": ptemp if soft else None,
                   "targets": "softmax(logits / temperature)" if soft else "one-hot of the hard label",
                   "distill_temperature": distill.get("temperature") if soft else None}
    lr = {"learned": synset.lr is not None, "value": float(synset.lr) if synset.lr is not None else None,
          "use": ("the step size learned with the set: train on it with this lr (the protocol's use_learned_lr; "
                  "its schedule still applies)" if synset.lr is not None
                  else "no learned step size: the protocol's own lr applies")}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout, "ltdd_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "dataset": dataset,
        "set": {"num_images": int(len(labels)), "image_shape": [int(v) for v in synset.images.shape[1:]],
                "ipc": ipc, "images_per_class": [int(v) for v in per_class]},
        "classes": classes,
        "small_class_policy": {"rule": policy, "classes_below_ipc":
                               ([c for c in range(num_classes) if real[c] < ipc]
                                if real is not None and ipc is not None else None),
                               "meaning": {"duplicate_cyclic": "a class with n_c < IPC repeats its n_c real images "
                                                               "cyclically to fill IPC slots",
                                           "noise": "a class with n_c < IPC fills the missing slots with noise"},
                               "source": "run configuration distill.duplicate" if policy else "not recorded"},
        "preprocessing": preprocessing,
        "labels": labels_info,
        "lr": lr,
        "evaluation_protocol": protocol,
        "method": {"name": prov["method"], "config": prov["distill"], "run_config": prov["run_config"]},
        "set_meta": _json_clean(prov["meta"]),
    }
