"""``ltdd groups`` (the grouping hypothesis) and ``ltdd two-stage``: the two-stage paper's commands.

``register(cli)`` adds both commands to the ``ltdd`` click group. The helpers for data options, data configs and
JSON printing are imported from :mod:`ltdd.cli` inside :func:`register`, so this module has no import cycle.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from .. import config as C
from ..errors import LtddError

CIFAR10_REFERENCES = {
    # two-stage.md §5.5: the split inferred from the paper's Fig. 2, and the semantic vehicles / animals split
    "paper_fig2_inferred": [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]],
    "vehicles_vs_animals": [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]],
}


def reference_partitions(data) -> dict:
    """Fixed two-way splits to rank against the max-cut: the frequency split (the more frequent half of the classes
    vs the rest; a frequency-based grouping as in BAGS) for every dataset, plus the paper's two candidate splits on
    CIFAR-10."""
    counts = list(data.train_counts)
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    half = len(order) // 2
    refs = {"frequency_halves": [sorted(order[:half]), sorted(order[half:])]}
    if data.num_classes == 10 and str(data.name).lower() == "cifar10":
        refs.update(CIFAR10_REFERENCES)
    return refs


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _ms(d, runs: int) -> str:
    """``mean±std`` in percent from a ``{"mean", "std"}`` summary entry."""
    if not isinstance(d, dict) or d.get("mean") is None:
        return "—"
    return _pct(d["mean"]) + (f"±{100 * d['std']:.1f}" if runs > 1 and d.get("std") is not None else "")


def _fmt_groups(groups, names) -> str:
    return " | ".join("{" + ", ".join(str(names[c]) for c in g) + "}" for g in groups)


def _model_and_train(protocol: str, overrides, epochs: int | None):
    proto = C.apply_overrides(C.protocol_preset(protocol), list(overrides))
    if epochs is not None:
        if epochs < 1:
            raise LtddError(f"--model-epochs must be >= 1, got {epochs}")
        proto.train.epochs = int(epochs)
    return proto


def print_groups(res: dict, echo=click.echo) -> None:
    names = res["class_names"]
    test = res["features_split"] == "test"
    if test:
        echo(f"WARNING: {res['warning']}")
    n = sum(res["feature_counts"])
    line = f"features: {res['features_split'].upper() if test else res['features_split']} split, {n} images"
    if res.get("supplemented_from_train"):
        sup = res["supplemented_from_train"]
        line += (f" ({'classes' if len(sup) > 1 else 'class'} {', '.join(str(names[c]) for c in sup)} had fewer "
                 f"than M = {res['M']} probe images and {'were' if len(sup) > 1 else 'was'} topped up with "
                 "long-tailed training images)")
    echo(line)
    main = res["models"][res["model"]]
    echo(f"model: {res['model']} ({main['train_images']} train images), accuracy on the {res['features_split']} "
         f"split {_pct(main['accuracy_on_features_split'])}%")
    echo(f"partition ({res['method']}, k = {res['k']}, M = {res['M']}): cut {res['cut']:.4g}")
    for gi, (g, info) in enumerate(zip(res["groups"], res["group_summary"])):
        imb = f"{info['imbalance']:.3g}" if info["imbalance"] is not None else "—"
        echo(f"  G{gi + 1} ({len(g)} classes; {info['train_images']} train images = prior {100 * info['prior']:.1f}%; "
             f"within-group imbalance {imb}): {', '.join(names[c] for c in g)}  [{','.join(map(str, g))}]")
    if res["alternatives"]:
        echo("alternatives:")
        for a in res["alternatives"]:
            echo(f"  #{a['rank']} cut {a['cut']:.4g} (gap {a['gap']:.3g}): {_fmt_groups(a['groups'], names)}")
    for rname, r in (res.get("references") or {}).items():
        echo(f"reference {rname}: rank {r['rank']}/{r['of']}, cut {r['cut']:.4g} (gap {r['gap']:.3g}): "
             f"{_fmt_groups(r['groups'], names)}")
    es = res["error_structure"]
    if es.get("within_group_error_fraction") is not None:
        echo(f"errors inside the true group: {_pct(es['within_group_error_fraction'])}% of {es['errors']} "
             f"(chance {_pct(es['chance'])}%)")
    st = res.get("stability")
    if st and st.get("mean_ari") is not None:
        echo(f"stability over {len(st['names'])} models (adjusted Rand index; control: random partitions with the "
             f"same group sizes, {st['n_random']} draws):")
        for name, m in res["models"].items():
            echo(f"  {name:<24} {_fmt_groups(m['groups'], names)}")
        for p in st["pairwise"]:
            echo(f"  {p['a']} vs {p['b']}: ARI {p['ari']:.3f} (random {p['random_mean']:.3f} ± {p['random_std']:.3f}, "
                 f"p = {p['p_value']:.3g})")
        echo(f"  mean ARI {st['mean_ari']:.3f} (random {st['random']['mean']:.3f} ± {st['random']['std']:.3f}; "
             f"fraction of random draws at least as similar {st['frac_random_at_least']:.3g}, p = {st['p_value']:.3g})")
    elif st is None:
        echo("stability: one model only (add --seeds, keep the balanced model or pass --distilled)")
    if test:
        echo("WARNING: the partition above was computed on the TEST SPLIT.")


def _fmt_row(row: dict, runs: int, class_names) -> str:
    s = row["summary"]
    g = s["groups"]
    pc = s["per_class"]
    worst = min(range(len(pc)), key=lambda c: (pc[c] if pc[c] == pc[c] else 2.0)) if pc else None
    worst_txt = f"{class_names[worst]} {_pct(pc[worst])}" if worst is not None else "—"
    hmt = "/".join(_pct(g.get(k, {}).get("mean")) for k in ("head", "medium", "tail"))
    mmf = "/".join(_pct(g.get(k, {}).get("mean")) for k in ("many", "medium_shot", "few"))
    return (f"{row['label']:<24}{row['train_images']:>7}  {_ms(s['accuracy'], runs):>10}  "
            f"{_ms(s['class_std'], runs):>9}  {_ms(s.get('group_accuracy'), runs):>9}  {worst_txt:>14}  {hmt:>16}  "
            f"{mmf:>16}")


def print_two_stage(res: dict, echo=click.echo) -> None:
    names = res["class_names"]
    runs = res["runs"]
    echo(f"groups ({res['groups_source']}): {_fmt_groups(res['groups'], names)}")
    if res.get("grouping"):
        gr = res["grouping"]
        how = {"exhaustive": "exhaustive max-cut", "maxcut": "k-way max-cut heuristic"}.get(gr.get("method"),
                                                                                          str(gr.get("method")))
        echo(f"  {how} into {len(res['groups'])} groups on {gr['features_split']} features, cut {gr['cut']:.4g}"
             + (f"; runner-up cut {gr['alternatives'][0]['cut']:.4g}" if gr.get("alternatives") else ""))
    echo(f"routing {res['routing']}, group-prior tau {res['group_prior_tau']:g}, {runs} run(s), "
         f"protocol {res['protocol_name']}")
    echo(f"{'setup':<24}{'#imgs':>7}  {'acc %':>10}  {'std %':>9}  {'group %':>9}  {'worst class':>14}  "
         f"{'head/med/tail':>16}  {'many/med/few':>16}")
    for row in res["rows"].values():
        echo(_fmt_row(row, runs, names))
    echo("per-class accuracy %:")
    echo(f"  {'':<24}" + " ".join(f"{str(n)[:5]:>5}" for n in names))
    for row in res["rows"].values():
        echo(f"  {row['label']:<24}" + " ".join(f"{_pct(a):>5}" for a in row["summary"]["per_class"]))
    var_keys = None
    for key, row in res["rows"].items():
        if "+" not in key:
            continue
        s = row["summary"]
        keys = [k for k in s if k.startswith("acc_")]
        if keys:
            if var_keys is None:
                echo("routing variants of the same networks (acc %):")
                var_keys = keys
            echo(f"  {row['label']:<24}" + "  ".join(f"{k[4:]} {_ms(s[k], runs)}" for k in keys))


def register(cli: click.Group) -> None:
    """Add ``groups`` and ``two-stage`` to the ``ltdd`` command group."""
    from .common import _echo_json, _prepare, data_config, data_options, set_data_options

    @cli.command("groups")
    @data_options
    @click.option("--features-from", type=click.Choice(["probe", "test", "train"]), default="probe",
                  show_default=True, help="which images to embed (test leaks the test set, as the paper did)")
    @click.option("--probe-per-class", type=int, default=200, show_default=True,
                  help="size of the balanced probe split (images not in the long-tailed split)")
    @click.option("--model-epochs", type=int, default=None, help="epochs per model (default: the protocol's)")
    @click.option("--protocol", default="dc", show_default=True, help="training protocol of the models (see `ltdd protocols`)")
    @click.option("--set", "overrides", multiple=True, help="override a protocol field, e.g. model.args.width=32")
    @click.option("--k", "k", type=int, default=2, show_default=True, help="number of groups")
    @click.option("--M", "--m", "M", type=int, default=5, show_default=True, help="k-means centres per class")
    @click.option("--method", type=click.Choice(["auto", "exhaustive", "spectral", "recursive", "maxcut"]),
                  default="auto", show_default=True,
                  help="auto: exhaustive max-cut for 2 groups of up to 20 classes, recursive max-cut for 2 groups of "
                       "more, spectral clustering for more groups; maxcut: the k-way max-cut heuristic (greedy "
                       "assignment + local search) for any number of groups")
    @click.option("--min-size", type=int, default=1, show_default=True, help="smallest allowed group")
    @click.option("--top", type=int, default=5, show_default=True, help="alternatives to list")
    @click.option("--distilled", type=click.Path(), default=None,
                  help="a distilled set (folder or .safetensors): adds a model trained on it to the stability score")
    @click.option("--seeds", type=int, default=1, show_default=True, help="long-tailed models with different seeds")
    @click.option("--no-balanced", is_flag=True, help="skip the class-balanced (re-sampled) model")
    @click.option("--n-random", type=int, default=1000, show_default=True, help="random partitions in the control")
    @click.option("--perplexity", type=float, default=50.0, show_default=True)
    @click.option("--no-tsne", is_flag=True, help="skip the t-SNE plots")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--device", default=None)
    @click.option("--out", type=click.Path(), default=None, help="folder for groups.json and tsne.png")
    @click.option("--json", "as_json", is_flag=True)
    def groups_cmd(features_from, probe_per_class, model_epochs, protocol, overrides, k, M, method, min_size, top,
                   distilled, seeds, no_balanced, n_random, perplexity, no_tsne, seed, device, out, as_json, **kw):
        """The grouping hypothesis: per-class k-means on penultimate features, max-cut partition of the classes
        into groups, ranked alternatives, stability across training sets, t-SNE."""
        from ..grouping import analyse_groups
        from ..synset import SyntheticSet
        from ..train import resolve_device

        syn = SyntheticSet.load(distilled) if distilled else None
        base = None
        if syn is not None and isinstance(syn.meta.get("data"), dict):
            base = C.from_dict(C.DataConfig, syn.meta["data"])
        cfg = data_config(base, **kw)
        if features_from == "probe":
            if probe_per_class < 1:
                raise LtddError("--probe-per-class must be >= 1 when --features-from probe")
            cfg.probe_per_class = int(probe_per_class)
        if M < 1:
            raise LtddError(f"--M must be >= 1, got {M}")
        proto = _model_and_train(protocol, overrides, model_epochs)
        dev = resolve_device(device)
        data = _prepare(cfg)
        training_sets = {}
        if syn is not None:
            syn.check_compatible(data, str(distilled))
            training_sets["distilled"] = (syn.images, syn.soft_labels.float() if syn.soft_labels is not None
                                          else syn.labels)
        say = (lambda s: None) if as_json else (lambda s: click.echo(f"... {s}", err=True))
        res = analyse_groups(data, model_cfg=proto.model, train_cfg=proto.train, features_from=features_from, k=k,
                             M=M, method=method, min_size=min_size, top=top, seed=seed, device=dev, seeds=seeds,
                             balanced=not no_balanced, training_sets=training_sets,
                             references=reference_partitions(data) if k == 2 else None, n_random=n_random,
                             out_dir=out, tsne=not no_tsne, perplexity=perplexity, progress=False, log=say)
        res["data"] = data.describe()
        res["data_config"] = C.to_dict(cfg)
        res["protocol_name"] = protocol
        if distilled:
            res["distilled"] = str(distilled)
        if out:
            C.save_json(Path(out) / "groups.json", res)
        if as_json:
            _echo_json(res)
            return
        print_groups(res)
        if out:
            written = ["groups.json"] + [Path(t["path"]).name for t in (res.get("tsne") or {}).values()]
            click.echo(f"wrote {', '.join(written)} in {out}")
        else:
            click.echo("(no --out: groups.json and the t-SNE plots were not written)")

    @cli.command("two-stage")
    @click.option("--distilled", required=True, type=click.Path(), help="distilled set (folder or .safetensors)")
    @set_data_options
    @click.option("--groups", "groups_text", default=None,
                  help="e.g. '0,1,2,8,9;3,4,5,6,7' (indices or class names); default: max-cut on probe features "
                       "of the first original-flat model")
    @click.option("--num-groups", "num_groups", type=int, default=None,
                  help="number of computed groups [default: 2]: 2 with up to 20 classes is the exhaustive max-cut; "
                       "otherwise a k-way max-cut heuristic (greedy assignment + local search of single-class moves "
                       "and swaps, 10 starts, deterministic given --seed) that maximises the summed class distance "
                       "between groups, e.g. --num-groups 5 on CIFAR-100-LT")
    @click.option("--routing", type=click.Choice(["hard", "soft"]), default="hard", show_default=True)
    @click.option("--group-prior-tau", type=float, default=0.0, show_default=True,
                  help="subtract tau*log(pi_g) from the group logits (group-level logit adjustment)")
    @click.option("--protocol", default="dc", show_default=True, help="evaluation protocol (see `ltdd protocols`)")
    @click.option("--set", "overrides", multiple=True, help="override a protocol field, e.g. train.epochs=50")
    @click.option("--runs", type=int, default=None, help="runs per row (default: the protocol's)")
    @click.option("--rows", default=None, help="comma-separated subset of: original_flat, distilled_flat, "
                                                "original+original, distilled+distilled, original+distilled")
    @click.option("--probe-per-class", type=int, default=200, show_default=True,
                  help="probe split size for the computed groups")
    @click.option("--M", "--m", "M", type=int, default=5, show_default=True, help="k-means centres (computed groups)")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--device", default=None)
    @click.option("--out", type=click.Path(), default=None, help="where to write two_stage.json (default: beside "
                                                                  "the set)")
    @click.option("--json", "as_json", is_flag=True)
    def two_stage_cmd(distilled, groups_text, num_groups, routing, group_prior_tau, protocol, overrides, runs, rows,
                      probe_per_class, M, seed, device, out, as_json, **kw):
        """Two-stage classification: a group classifier + intra-group classifiers, with the ablation rows
        (original/distilled data for each stage) and the flat baselines, on the data a distilled set was made from."""
        from ..grouping import (
            EXHAUSTIVE_MAX_CLASSES,
            _feature_split,
            class_centroids,
            class_distance_matrix,
            embed_features,
            partition,
        )
        from ..synset import SyntheticSet
        from ..train import resolve_device
        from ..two_stage import ROWS, parse_groups, run_ablation

        syn = SyntheticSet.load(distilled)
        base = C.from_dict(C.DataConfig, syn.meta["data"]) if isinstance(syn.meta.get("data"), dict) else None
        cfg = data_config(base, **kw)
        if num_groups is not None and groups_text is not None:
            raise LtddError("--num-groups and --groups exclude each other: --groups gives the groups, --num-groups "
                            "computes that many")
        if num_groups is not None and num_groups < 2:
            raise LtddError(f"--num-groups must be >= 2, got {num_groups}")
        k = 2 if num_groups is None else int(num_groups)
        row_list = list(ROWS) if rows is None else [r.strip() for r in rows.split(",") if r.strip()]
        bad = [r for r in row_list if r not in ROWS]
        if bad or not row_list:
            raise LtddError(f"--rows: unknown row '{bad[0] if bad else rows}' (known: {', '.join(ROWS)})")
        if groups_text is None:
            if probe_per_class < 1:
                raise LtddError("--probe-per-class must be >= 1 when the groups are computed")
            cfg.probe_per_class = max(int(cfg.probe_per_class or 0), int(probe_per_class))
        proto = C.apply_overrides(C.protocol_preset(protocol), list(overrides))
        n_runs = proto.runs if runs is None else int(runs)
        if n_runs < 1:
            raise LtddError(f"--runs must be >= 1, got {n_runs}")
        dev = resolve_device(device)
        data = _prepare(cfg)
        syn.check_compatible(data, str(distilled))
        if k > data.num_classes:
            raise LtddError(f"--num-groups {k}: {data.name} has only {data.num_classes} classes")
        method = "exhaustive" if k == 2 and data.num_classes <= EXHAUSTIVE_MAX_CLASSES else "maxcut"
        groups = parse_groups(groups_text, data.num_classes, data.class_names) if groups_text is not None else None
        grouping: dict = {}

        def groups_fn(model):
            x, y, info = _feature_split(data, "probe", M)
            feats = embed_features(model, x)
            D = class_distance_matrix(class_centroids(feats, y.numpy(), data.num_classes, M=M, seed=seed))
            part = partition(D, k, method, seed=seed)
            grouping.update({"features_split": info["split"], "supplemented_from_train":
                             info["supplemented_from_train"], "M": M, **part, "distance_matrix": D.tolist()})
            return part["groups"]

        say = (lambda s: None) if as_json else (lambda s: click.echo(f"... {s}", err=True))
        res = run_ablation(data, syn, groups, model_cfg=proto.model, train_cfg=proto.train, rows=row_list,
                           runs=n_runs, seed=seed, routing=routing, group_prior_tau=group_prior_tau, device=dev,
                           groups_fn=groups_fn, log=say)
        res["class_names"] = list(data.class_names)
        res["group_names"] = [[data.class_names[c] for c in g] for g in res["groups"]]
        if grouping:
            res["grouping"] = grouping
        res["protocol_name"] = protocol
        res["protocol"] = C.to_dict(proto)
        res["distilled"] = str(distilled)
        res["data"] = data.describe()
        dest = Path(out) if out else (Path(distilled) if Path(distilled).is_dir() else Path(distilled).parent)
        C.save_json(dest / "two_stage.json", res)
        if as_json:
            _echo_json(res)
            return
        print_two_stage(res)
        click.echo(f"wrote {dest / 'two_stage.json'}")
