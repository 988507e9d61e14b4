"""The whole grouping analysis of two-stage.md §5 (train, embed, cluster, partition, stability, plots) as a dict.

Features come from the held-out balanced **probe** split by default (two-stage.md §5.3: the paper clustered test
features, which leaks the test set into the method). ``features_from="test"`` reproduces the paper and is labelled
as such in every output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import LtddError
from .features import class_centroids, class_distance_matrix, embed_features
from .groups import _canonical, check_groups, error_structure, group_summary
from .partitions import EXHAUSTIVE_MAX_CLASSES, bipartition_rank, partition
from .stability import partition_stability
from .tsne import tsne_plot

__all__ = ["analyse_groups", "grouping_of", "TEST_SPLIT_WARNING"]

TEST_SPLIT_WARNING = ("FEATURES FROM THE TEST SPLIT: the grouping is computed on test images, so the test set leaks "
                      "into the method design (as in the paper). Use the probe split for a clean result.")


def _feature_split(data, features_from: str, M: int):
    """(x, y, info) for the chosen split. A probe class with fewer than M images is topped up with that class's
    long-tailed training images (named in ``info['supplemented_from_train']``)."""
    if features_from == "probe":
        if getattr(data, "probe_x", None) is None or data.probe_y is None or len(data.probe_y) == 0:
            raise LtddError("no probe split: build the data with probe_per_class > 0 (ltdd groups "
                            "--probe-per-class N), or use features_from='train'")
        x, y = data.probe_x, data.probe_y
        counts = torch.bincount(y, minlength=data.num_classes).tolist()
        short = [c for c in range(data.num_classes) if counts[c] < M]
        if short:
            add = torch.cat([torch.nonzero(data.train_y == c).flatten() for c in short])
            x = torch.cat([x, data.train_x[add]])
            y = torch.cat([y, data.train_y[add]])
        return x, y, {"split": "probe", "probe_counts": counts, "supplemented_from_train": short}
    if features_from == "test":
        return data.test_x, data.test_y, {"split": "test", "warning": TEST_SPLIT_WARNING}
    if features_from == "train":
        return data.train_x, data.train_y, {"split": "train (long-tailed)"}
    raise LtddError(f"unknown feature split '{features_from}' (known: probe, test, train)")


def _train_classifier(data, x, y, model_cfg, train_cfg, seed: int, device, progress: bool, desc: str):
    from ..models import create_model
    from ..train import train_model

    torch.manual_seed(seed)
    model = create_model(model_cfg.name, data.num_classes, data.channels, data.im_size, **model_cfg.args)
    if device is not None:
        model = model.to(device)
    train_model(model, x, y, train_cfg, num_classes=data.num_classes, seed=seed, progress=progress, desc=desc)
    return model


def _grouping_of(model, x, y, data, *, k, M, method, min_size, top, seed) -> dict:
    feats = embed_features(model, x)
    yn = y.numpy()
    cents = class_centroids(feats, yn, data.num_classes, M=M, seed=seed)
    D = class_distance_matrix(cents)
    part = partition(D, k, method, min_size=min_size, top=top, seed=seed)
    from ..train import predict

    pred = predict(model, x).argmax(1).numpy()
    return {"features": feats, "centroids": cents, "D": D, "partition": part,
            "accuracy": float((pred == yn).mean()), "errors": error_structure(yn, pred, part["groups"],
                                                                              data.num_classes)}


def _names(groups, class_names) -> list[list[str]]:
    return [[str(class_names[c]) for c in g] for g in groups]


def _reference_ranks(D, references: dict, data, min_size: int) -> dict:
    """Where each reference split ``{name: groups}`` ranks among all two-way splits of ``D``."""
    out = {}
    for rname, rg in references.items():
        rg = _canonical(check_groups(rg, data.num_classes))
        out[rname] = {"groups": rg, "group_names": _names(rg, data.class_names),
                      **bipartition_rank(D, rg, min_size=min_size)}
    return out


def grouping_of(model: torch.nn.Module, data, *, features_from: str = "probe", k: int = 2, M: int = 5,
                method: str = "auto", min_size: int = 1, top: int = 5, seed: int = 0,
                references: dict | None = None) -> dict:
    """The groups one trained model gives, as a JSON-able dict: embed the feature split, per-class k-means with
    ``M`` centres, the class distance matrix, the partition into ``k`` groups with ranked alternatives, the rank
    of each ``references`` split (two groups only) and the groups' sizes and priors on the training set."""
    x, y, info = _feature_split(data, features_from, M)
    cents = class_centroids(embed_features(model, x), y.numpy(), data.num_classes, M=M, seed=seed)
    D = class_distance_matrix(cents)
    part = partition(D, k, method, min_size=min_size, top=top, seed=seed)
    groups = part["groups"]
    two_way = len(groups) == 2 and data.num_classes <= EXHAUSTIVE_MAX_CLASSES
    return {"groups": groups, "group_names": _names(groups, data.class_names), "cut": part["cut"],
            "method": part["method"], "M": int(M), "features_split": info["split"],
            **({"probe_counts": info["probe_counts"], "supplemented_from_train": info["supplemented_from_train"]}
               if features_from == "probe" else {}),
            "alternatives": [{**a, "group_names": _names(a["groups"], data.class_names)} for a in part["alternatives"]],
            "references": _reference_ranks(D, references, data, min_size) if references and two_way else {},
            "distance_matrix": D.tolist(),
            "group_summary": group_summary(groups, data.train_counts, data.class_names)}


def analyse_groups(data, *, model: torch.nn.Module | None = None, model_cfg=None, train_cfg=None,
                   features_from: str = "probe", k: int = 2, M: int = 5, method: str = "auto", min_size: int = 1,
                   top: int = 5, seed: int = 0, device=None, seeds: int = 1, balanced: bool = True,
                   training_sets: dict | None = None, references: dict | None = None, n_random: int = 1000,
                   out_dir: str | Path | None = None, tsne: bool = True, perplexity: float = 50.0,
                   progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """The grouping analysis of two-stage.md §5, as a JSON-able dict.

    1. The main model: ``model`` if given, else a ``model_cfg`` network trained on the long-tailed training set with
       ``train_cfg`` (default: the DC protocol, two-stage.md §4.1).
    2. Embed the feature split (``probe`` by default; ``test`` only when asked, flagged in ``features_split`` and
       ``warning``; ``train`` = the long-tailed set with ``M_i = min(M, n_i)``), per-class k-means, the distance
       matrix ``D``, the partition (``partition``), ranked alternatives, and the rank of each ``references`` split
       (``{name: groups}``; two groups only).
    3. Stability: further models, each giving its own partition on the same features split: ``seeds - 1`` more
       long-tailed seeds, a class-balanced re-sampling of the long-tailed set (``balanced``; no new images) and
       every ``training_sets`` entry ``{name: (x, y)}`` (``y`` hard labels or soft-label logits, e.g. a distilled
       set). Pairwise ARI against a random control (:func:`partition_stability`).
    4. With ``out_dir``: ``tsne.png`` (main model) and ``tsne_<name>.png`` per further model (``tsne=False`` skips
       them). Nothing else is written here; the caller saves the dict.
    """
    import dataclasses

    from ..config import ModelConfig, protocol_preset

    say = log or (lambda s: None)
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or protocol_preset("dc").train
    x, y, split_info = _feature_split(data, features_from, M)
    feature_counts = torch.bincount(y, minlength=data.num_classes).tolist()
    common = dict(k=k, M=M, method=method, min_size=min_size, top=top, seed=seed)

    runs: dict[str, dict] = {}
    specs: list[tuple[str, Callable[[], torch.nn.Module], int]] = []
    if model is not None:
        specs.append(("given", lambda: model, 0))
    else:
        specs.append(("long_tailed", lambda: _train_classifier(data, data.train_x, data.train_y, model_cfg, train_cfg,
                                                              seed, device, progress, "long-tailed model"),
                      int(len(data.train_y))))
    for s in range(1, max(1, int(seeds))):
        specs.append((f"long_tailed_seed{seed + s}", lambda s=s: _train_classifier(
            data, data.train_x, data.train_y, model_cfg, train_cfg, seed + s, device, progress,
            f"long-tailed model, seed {seed + s}"), int(len(data.train_y))))
    if balanced:
        bal_cfg = dataclasses.replace(train_cfg, sampler="class_balanced")
        specs.append(("balanced_resampled", lambda: _train_classifier(
            data, data.train_x, data.train_y, model_cfg, bal_cfg, seed, device, progress, "class-balanced model"),
            int(len(data.train_y))))
    for name, (tx, ty) in (training_sets or {}).items():
        specs.append((name, lambda tx=tx, ty=ty, name=name: _train_classifier(
            data, tx, ty, model_cfg, train_cfg, seed, device, progress, f"{name} model"), int(len(tx))))

    main_name = specs[0][0]
    for name, build, n_train in specs:
        say(f"training / embedding: {name}")
        m = build()
        g = _grouping_of(m, x, y, data, **common)
        g["train_images"] = n_train
        runs[name] = g

    main = runs[main_name]
    part = main["partition"]
    groups = part["groups"]
    result: dict = {
        "features_split": split_info["split"],
        **({"warning": split_info["warning"]} if "warning" in split_info else {}),
        **({"supplemented_from_train": split_info["supplemented_from_train"],
            "probe_counts": split_info["probe_counts"]} if features_from == "probe" else {}),
        "feature_counts": feature_counts,
        "class_names": list(data.class_names),
        "M": int(M),
        "M_per_class": [int(len(c)) for c in main["centroids"]],
        "k": int(k),
        "method": part["method"],
        "min_size": int(min_size),
        "model": main_name,
        "groups": groups,
        "group_names": _names(groups, data.class_names),
        "cut": part["cut"],
        "alternatives": [{**a, "group_names": _names(a["groups"], data.class_names)} for a in part["alternatives"]],
        "group_summary": group_summary(groups, data.train_counts, data.class_names),
        "distance_matrix": main["D"].tolist(),
        "model_accuracy_on_features_split": main["accuracy"],
        "error_structure": main["errors"],
        "seed": int(seed),
        "model_config": {"name": model_cfg.name, "args": dict(model_cfg.args)},
        "train_config": dataclasses.asdict(train_cfg),
    }
    if references and len(groups) == 2 and data.num_classes <= EXHAUSTIVE_MAX_CLASSES:
        result["references"] = _reference_ranks(main["D"], references, data, min_size)
    result["models"] = {name: {"train_images": r["train_images"], "groups": r["partition"]["groups"],
                               "group_names": _names(r["partition"]["groups"], data.class_names),
                               "cut": r["partition"]["cut"], "accuracy_on_features_split": r["accuracy"],
                               "error_structure": r["errors"]} for name, r in runs.items()}
    if len(runs) >= 2:
        result["stability"] = partition_stability({n: r["partition"]["groups"] for n, r in runs.items()},
                                                  data.num_classes, n_random=n_random, seed=seed)
    else:
        result["stability"] = None
    if out_dir is not None and tsne:
        out_dir = Path(out_dir)
        yn = y.numpy()
        split_word = "TEST SPLIT" if features_from == "test" else split_info["split"] + " split"
        result["tsne"] = {}
        for name, r in runs.items():
            fname = "tsne.png" if name == main_name else f"tsne_{name}.png"
            say(f"t-SNE: {fname}")
            result["tsne"][name] = tsne_plot(
                r["features"], yn, r["centroids"], r["partition"]["groups"], data.class_names, out_dir / fname,
                perplexity=perplexity, seed=seed,
                title=f"{data.name}: model trained on {name} data\nfeatures of the {split_word} "
                      f"(M = {M}; triangles = k-means centres)")
    return result
