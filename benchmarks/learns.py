"""Does distillation learn? Each method's distilled set against its own initial set and random real images.

    python benchmarks/learns.py                                  # digits-LT, the quick start's setting (minutes)
    python benchmarks/learns.py --dataset cifar10                # CIFAR-10-LT IF 100, the lad preset's cpu profile
    python benchmarks/learns.py --methods lad --imbalance-factor 50 --ipc 2 --name learns-candidates
    python benchmarks/learns.py --report-only                    # rewrite learns.md from learns.json

For every method (MTT, DATM and LAD, which are configurations of the trajectory-matching engine, plus DM and DC)
and every distillation seed, three sets of the same size are evaluated under one protocol (same network, epochs,
runs and evaluation seeds):

* ``distilled``: the method's output;
* ``initial``: the same run stopped before its first iteration (its own initialisation: images and labels exactly as
  the distilled set started from them). Distilled minus initial is what the iterations bought;
* ``random``: IPC random real images per class with hard labels (the library's random coreset, the papers'
  "Random" row). One per seed, shared by all methods.

plus, on digits, the whole long-tailed training set under the same protocol (hard labels). The seed is the
distillation seed (``distill.seed``: which real images start the set, the expert order, augmentation) and also
the evaluation seed of every row of that seed, so the comparisons are paired per seed.

Settings
--------
digits (default): the ``quickstart`` preset (data, experts, LAD's distill section, protocol); MTT and DATM take the
method-defining settings of their presets (``mtt`` / ``datm``: one phase matching all parameters of the
representation experts; MTT with hard labels and real-image init, DATM with learned soft labels, correct-image init
and its growing start-epoch window) at the quick start's scale (IPC, iterations, lr_img, syn_steps, start epochs,
augmentation). All three match the same expert store (the quick start's: representation and classifier experts),
as ``benchmarks/reproduce.py`` does. DM and DC: their presets' ``cpu`` profiles with the quick start's IPC,
augmentation and network width.

cifar10: the ``lad``, ``datm`` and ``mtt`` presets under their ``cpu`` profiles (CIFAR-10-LT IF 100 from
``../shared/data/cifar10-jpeg.tar.gz``, IPC 10, 60 iterations, ``cpu`` protocol), one shared store of the lad
preset's cpu experts. No full-data row by default (see ``full_data.md``; ``--full`` adds one).

Resumable: every cell (method, seed, variant) is written atomically to ``<work>/cells/<cell>.json`` when it
finishes and a rerun skips finished cells (a distillation cut short resumes from its checkpoint); the results file
is rewritten after every cell. Results: ``benchmarks/results/<name>.md`` and ``.json`` (default name ``learns``;
one section per dataset setting, a rerun replaces its own section and keeps the others).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import machine_line  # noqa: E402  (benchmarks/common.py)

import torch

from ltdd.config import RunConfig, atomic_write_text, load_preset, read_jsonl, save_json, to_dict
from ltdd.workflow import full_data_eval, initial_config, label_mode, method_label, random_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TM_METHODS = ("mtt", "datm", "lad")
ALL_METHODS = TM_METHODS + ("dm", "dc")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- configurations ---------------------------------------------------------------------------------------------


def base_config(args) -> RunConfig:
    """The setting every method shares: data, experts, protocol, and LAD's distill section."""
    over = [f"{key}={value}" for key, value in (("data.imbalance_factor", args.imbalance_factor),
                                                  ("distill.ipc", args.ipc), ("distill.iterations", args.iterations))
            if value is not None]
    if args.dataset == "digits":
        return load_preset("quickstart", overrides=over + list(args.set))
    return load_preset("lad", "cpu", [f"data.root={args.root}"] + over + list(args.set))


def _scaled_phase(preset_phase, scale_phase, iterations: int, preset_iterations: int):
    """A preset's phase (what it matches, with which loss) at another setting's scale (steps, start epochs)."""
    ph = dataclasses.replace(preset_phase, syn_steps=scale_phase.syn_steps, expert_epochs=scale_phase.expert_epochs,
                             min_start_epoch=scale_phase.min_start_epoch, max_start_epoch=scale_phase.max_start_epoch,
                             batch_syn=scale_phase.batch_syn)
    if preset_phase.current_max_start_epoch is not None and preset_phase.expansion_end_iteration > 0:
        frac = preset_phase.current_max_start_epoch / preset_phase.max_start_epoch
        ph = dataclasses.replace(
            ph, current_max_start_epoch=max(ph.min_start_epoch + 1, round(frac * ph.max_start_epoch)),
            expansion_end_iteration=max(1, round(iterations * preset_phase.expansion_end_iteration
                                                 / max(1, preset_iterations))))
    return ph


def method_config(args, method: str, base: RunConfig, seed: int) -> RunConfig:
    """The run config of one method at one distillation seed."""
    b = base.distill
    if method == "lad":
        d = b
    elif args.dataset == "cifar10":  # the method's own preset under its cpu profile, at the shared IPC
        d = load_preset(method, "cpu", [f"data.root={args.root}"]).distill
        d = dataclasses.replace(d, ipc=b.ipc, **({"iterations": b.iterations} if method in TM_METHODS else {}))
    elif method in ("mtt", "datm"):
        p = load_preset(method, "cpu").distill
        phase = _scaled_phase(p.phases[0], b.phases[0], b.iterations, p.iterations)
        d = dataclasses.replace(p, ipc=b.ipc, iterations=b.iterations, lr_img=b.lr_img, dsa=b.dsa,
                                dsa_strategy=b.dsa_strategy, checkpoint_every=b.checkpoint_every, eval_every=0,
                                phases=[phase])
    else:  # dm / dc on digits: the preset's cpu profile at the quick start's IPC, augmentation and width
        p = load_preset(method, "cpu").distill
        opts = dict(p.options)
        opts["model"] = to_dict(base.protocol_config().model)
        if "batch_real" in opts:
            opts["batch_real"] = min(int(opts["batch_real"]), int(args.batch_real))
        its = args.dm_iterations if method == "dm" else args.dc_iterations
        d = dataclasses.replace(p, ipc=b.ipc, iterations=its, dsa_strategy=b.dsa_strategy,
                                checkpoint_every=max(1, its // 4), options=opts)
    d = dataclasses.replace(d, seed=seed)
    return dataclasses.replace(base, distill=d)


def describe_method(cfg: RunConfig) -> str:
    d = cfg.distill
    if d.method == "tm":
        phases = "; ".join(f"{ph.name}: {ph.store} experts, match {ph.match}, inner loss {ph.inner_loss}, "
                           f"student updates {ph.student_update}, N={ph.syn_steps}, M={ph.expert_epochs}, start "
                           f"epoch in [{ph.min_start_epoch}, {ph.max_start_epoch})"
                           + (f" growing from {ph.current_max_start_epoch} until iteration "
                              f"{ph.expansion_end_iteration}" if ph.current_max_start_epoch is not None else "")
                           + f", weight {ph.weight:g}" for ph in d.phases)
        labels = f"soft labels learned (init {d.label_init} from {d.label_store} experts)" if d.soft_labels \
            else "hard labels"
        lr_y = f", lr_y {d.lr_y:g}" if d.soft_labels else ""
        return (f"{d.iterations} iterations, {d.gradient} gradient, image init {d.image_init}, {labels}, lr_img "
                f"{d.lr_img:g}{lr_y}, lr_lr {d.lr_lr:g}; {phases}")
    opts = ", ".join(f"{k} {v}" for k, v in d.options.items() if k != "model")
    return f"{d.iterations} iterations, image init {d.image_init}, lr_img {d.lr_img:g}, hard labels; {opts}"


# ---- cells ------------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args, base: RunConfig):
        from ltdd.data import prepare_data

        self.args = args
        self.base = base
        self.work = Path(args.work)
        self.cells = self.work / "cells"
        self.cells.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cpu")
        t0 = time.time()
        self.data = prepare_data(base.data)
        _log(f"data: {self.data.name}, {len(self.data.train_y)} train images, counts {self.data.train_counts} "
             f"({time.time() - t0:.1f} s)")
        self.experts_dir = self.work / "experts"

    def experts(self) -> dict:
        from ltdd.experts import train_experts

        path = self.cells / "experts.json"
        if path.is_file():
            return json.loads(path.read_text())
        _log("experts")
        res = train_experts(self.base.experts, self.data, self.experts_dir, device=self.device, progress=False)
        log = read_jsonl(self.experts_dir / "train_log.jsonl")
        acc = {k: [r["test_acc"] for r in log if r.get("kind") == k] for k in ("representation", "classifier")}
        out = {"seconds": res["seconds"], "available": res["available"], "test_acc": acc,
               "threads": torch.get_num_threads()}
        save_json(path, out)
        return out

    def cell(self, key: str, fn) -> dict:
        path = self.cells / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        _log(f"cell {key}")
        t0 = time.time()
        rec = fn()
        rec.update({"cell": key, "wall_seconds": time.time() - t0, "threads": torch.get_num_threads(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]})
        save_json(path, rec)
        _log(f"cell {key}: {100 * rec['summary']['accuracy']['mean']:.1f} % ({rec['wall_seconds']:.0f} s)")
        return rec

    def distill_cell(self, cfg: RunConfig, key: str, which: str) -> dict:
        from ltdd.distill import DISTILLERS, distill

        out = self.work / key
        needs = DISTILLERS[cfg.distill.method].needs_experts
        resume = (out / "checkpoint.safetensors").is_file()
        res = distill(cfg, self.data, out, experts_dir=self.experts_dir if needs else None, device=self.device,
                      resume=resume, progress=False)
        ev = json.loads((out / "eval.json").read_text())
        log = [r for r in read_jsonl(out / "log.jsonl") if "loss" in r]
        k = max(1, min(5, len(log) // 4))
        loss = {"first": statistics.mean(r["loss"] for r in log[:k]),
                "last": statistics.mean(r["loss"] for r in log[-k:]), "k": k} if log else None
        return {"variant": which, "labels": label_mode(cfg.distill, which), "summary": res["eval"],
                "distill_seconds": res["seconds"], "eval_seconds": ev["seconds"], "lr": ev.get("lr"),
                "iterations": res["iterations"], "loss": loss}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M")
    base = base_config(args)
    bench = Bench(args, base)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    experts = bench.experts() if any(m in TM_METHODS for m in methods) else None
    results: dict = {"cells": {}}
    section = section_key(args, base)
    t_start = time.time()
    configs = {m: method_config(args, m, base, 0) for m in methods}

    def write():
        out = summarise(args, base, methods, seeds, results["cells"], configs, experts, bench.data.train_counts)
        cells = list(results["cells"].values())
        loads = [c["load_average"][0] for c in cells if c.get("load_average")]
        out.update({"command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]), "date": started,
                    "wall_seconds": time.time() - t_start, "machine": machine_line(),
                    "cells_seconds": sum(c.get("wall_seconds", 0.0) for c in cells)
                    + (experts or {}).get("seconds", 0.0),
                    "cell_load_1min": [min(loads), max(loads)] if loads else None})
        write_results(Path(args.results) / args.name, section, out)

    for seed in seeds:
        rcfg = random_config(dataclasses.replace(base, distill=dataclasses.replace(base.distill, seed=seed)))
        results["cells"][f"random-s{seed}"] = bench.cell(
            f"random-s{seed}", lambda: bench.distill_cell(rcfg, f"random-s{seed}", "random"))
        for m in methods:
            cfg = method_config(args, m, base, seed)
            for which, c in (("initial", initial_config(cfg)), ("distilled", cfg)):
                key = f"{m}-s{seed}-{which}"
                results["cells"][key] = bench.cell(key, lambda c=c, key=key, which=which:
                                                   bench.distill_cell(c, key, which))
        if args.full or (args.full is None and args.dataset == "digits"):
            fcfg = dataclasses.replace(base, distill=dataclasses.replace(base.distill, seed=seed))
            results["cells"][f"full-s{seed}"] = bench.cell(f"full-s{seed}", lambda: {
                **full_data_eval(bench.data, fcfg, device=bench.device), "variant": "full"})
        write()
    return results


# ---- summary ----------------------------------------------------------------------------------------------------


def section_key(args, base: RunConfig) -> str:
    d = base.data
    tag = f"-{args.tag}" if args.tag else ""
    return f"{d.dataset}-if{d.resolved_imbalance_factor():g}-ipc{base.distill.ipc}-it{base.distill.iterations}{tag}"


def _ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "n": len(values)}


def _acc(cell: dict) -> float:
    return 100 * cell["summary"]["accuracy"]["mean"]


def _tail(cell: dict) -> float | None:
    t = cell["summary"].get("groups", {}).get("tail", {}).get("mean")
    return None if t is None else 100 * t


def summarise(args, base, methods, seeds, cells, configs, experts, counts) -> dict:
    rows = []
    rnd = {s: cells.get(f"random-s{s}") for s in seeds}
    for m in methods:
        per = {"distilled": {}, "initial": {}}
        for s in seeds:
            for which in per:
                c = cells.get(f"{m}-s{s}-{which}")
                if c:
                    per[which][s] = c
        both = [s for s in seeds if s in per["distilled"] and s in per["initial"]]
        with_rnd = [s for s in seeds if s in per["distilled"] and rnd.get(s)]
        d_cells = list(per["distilled"].values())
        rows.append({
            "method": m, "name": method_label(configs[m].distill),
            "labels": label_mode(configs[m].distill, "distilled"),
            "initial_labels": label_mode(configs[m].distill, "initial"),
            "seeds": sorted(per["distilled"]),
            "distilled": _ms([_acc(c) for c in d_cells]),
            "initial": _ms([_acc(c) for c in per["initial"].values()]),
            "gain_over_initial": _ms([_acc(per["distilled"][s]) - _acc(per["initial"][s]) for s in both]),
            "gain_over_random": _ms([_acc(per["distilled"][s]) - _acc(rnd[s]) for s in with_rnd]),
            "wins_over_initial": sum(_acc(per["distilled"][s]) > _acc(per["initial"][s]) for s in both),
            "wins_over_random": sum(_acc(per["distilled"][s]) > _acc(rnd[s]) for s in with_rnd),
            "tail_distilled": _ms([t for t in (_tail(c) for c in d_cells) if t is not None]),
            "tail_initial": _ms([t for t in (_tail(c) for c in per["initial"].values()) if t is not None]),
            "distill_seconds": _ms([c["distill_seconds"] for c in d_cells]),
            "loss_first": _ms([c["loss"]["first"] for c in d_cells if c.get("loss")]),
            "loss_last": _ms([c["loss"]["last"] for c in d_cells if c.get("loss")]),
            "per_seed": {str(s): {"distilled": _acc(per["distilled"][s]) if s in per["distilled"] else None,
                                  "initial": _acc(per["initial"][s]) if s in per["initial"] else None}
                         for s in seeds},
            "description": describe_method(configs[m]),
        })
    r_cells = [c for c in rnd.values() if c]
    f_cells = [cells[f"full-s{s}"] for s in seeds if cells.get(f"full-s{s}")]
    proto = base.protocol_config()
    return {"section": section_key(args, base), "tag": args.tag, "overrides": list(args.set),
            "dataset": base.data.dataset,
            "imbalance_factor": base.data.resolved_imbalance_factor(), "ipc": base.distill.ipc,
            "iterations": base.distill.iterations, "seeds": seeds, "rows": rows,
            "random": {"accuracy": _ms([_acc(c) for c in r_cells]),
                       "tail": _ms([t for t in (_tail(c) for c in r_cells) if t is not None]),
                       "per_seed": {str(s): _acc(c) for s, c in rnd.items() if c}},
            "full": {"accuracy": _ms([_acc(c) for c in f_cells]),
                     "tail": _ms([t for t in (_tail(c) for c in f_cells) if t is not None]),
                     "images": f_cells[0]["images"] if f_cells else None} if f_cells else None,
            "experts": experts, "experts_text": experts_text(base.experts) if experts else None,
            "data": {"train_counts": [int(c) for c in counts]},
            "protocol": to_dict(proto), "cells": cells}


def _f(ms: dict | None, digits: int = 1, sign: bool = False) -> str:
    if not ms or ms.get("mean") is None:
        return "–"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    return fmt.format(ms["mean"]) + (f" ± {ms['std']:.{digits}f}" if ms.get("n", 0) > 1 else "")


def experts_text(e) -> str:
    t, c = e.train, e.classifier_train
    text = (f"{e.num_experts} representation experts x {t.epochs} epochs (SGD lr {t.lr:g}, momentum {t.momentum:g}, "
            f"weight decay {t.weight_decay:g}, batch {t.batch_size})")
    if e.classifier_experts:
        text += f", classifier experts x {c.epochs} epochs ({c.sampler} sampler, {c.trainable} trainable)"
    return text


def _model_text(model: dict) -> str:
    args = ", ".join(f"{k} {v}" for k, v in (model.get("args") or {}).items())
    return model["name"] + (f" ({args})" if args else "")


def section_markdown(s: dict) -> str:
    proto = s["protocol"]
    model = proto["model"]
    train = proto["train"]
    n = len(s["seeds"])
    title = ("digits-LT" if s["dataset"] == "digits" else "CIFAR-10-LT" if s["dataset"] == "cifar10"
             else s["dataset"])
    lines = [f"## {title}, IF {s['imbalance_factor']:g}, IPC {s['ipc']}, {s['iterations']} iterations"
             + (f" ({s['tag']})" if s.get("tag") else ""), "",
             f"Command: `{s['command']}`  ",
             f"Run started: {s['date']}; compute time {s['cells_seconds'] / 60:.1f} min (sum over the "
             f"cells and the experts, each cell recorded when it finished; a rerun skips finished cells)  ",
             f"Machine: {s['machine']}; 1-minute load average when the cells finished "
             f"{s['cell_load_1min'][0]:.1f}-{s['cell_load_1min'][1]:.1f} (the machine is shared with other jobs: "
             "seconds are inflated)", "",
             f"Data: {title} IF {s['imbalance_factor']:g}, training counts {s['data']['train_counts']}. "
             f"Protocol for every row: {_model_text(model)}, {train['epochs']} epochs "
             f"({train['schedule']} schedule, lr {train['lr']:g} or the set's learned step size, batch "
             f"{train['batch_size']}, {'DSA' if train['dsa'] else 'no augmentation'}), {proto['runs']} runs per "
             f"set; distillation seeds {', '.join(map(str, s['seeds']))} (each seed is also the evaluation seed of "
             "every row of that seed, so differences are paired)."
             + (f" Overrides of the base config: {', '.join(f'`{o}`' for o in s['overrides'])}."
                if s.get("overrides") else ""), ""]
    if s.get("experts"):
        e = s["experts"]
        acc = {k: (f"{100 * statistics.mean(v):.1f} %" if v else "–") for k, v in e["test_acc"].items()}
        avail = ", ".join(f"{v} {k}" for k, v in e["available"].items())
        lines += [f"Experts (one store shared by MTT, DATM and LAD): {s.get('experts_text') or avail}; mean test "
                  "accuracy "
                  f"representation {acc['representation']}, classifier {acc['classifier']}; "
                  f"{e['seconds']:.0f} s.", ""]
    lines += ["Accuracy in % on the balanced test set: mean ± std over the seeds of each seed's mean over the "
              "protocol runs. Gains are paired per seed (wins: seeds where the distilled set is better). "
              "Matching loss: mean of the first / last k logged iterations of the distilled runs.", "",
              "| method | labels (distilled) | distilled | initial (iteration 0) | random real | gain over initial "
              "| gain over random | wins vs initial / random | tail: distilled / initial | matching loss first → "
              "last | distill s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rnd = s["random"]["accuracy"]
    for r in s["rows"]:
        k = len(r["seeds"])
        lines.append(
            f"| {r['name']} | {r['labels']} | {_f(r['distilled'])} | {_f(r['initial'])} | {_f(rnd)} | "
            f"{_f(r['gain_over_initial'], sign=True)} | {_f(r['gain_over_random'], sign=True)} | "
            f"{r['wins_over_initial']}/{r['gain_over_initial']['n']} · {r['wins_over_random']}/"
            f"{r['gain_over_random']['n']} | {_f(r['tail_distilled'])} / {_f(r['tail_initial'])} | "
            f"{_f(r['loss_first'], 3)} → {_f(r['loss_last'], 3)} | {_f(r['distill_seconds'], 0)} |"
            + ("" if k == n else f" ({k}/{n} seeds)"))
    lines.append(f"| random real | hard labels | {_f(rnd)} | – | {_f(rnd)} | – | – | – | {_f(s['random']['tail'])} "
                 "| – | – |")
    if s.get("full"):
        lines.append(f"| full data ({s['full']['images']} images) | hard labels | {_f(s['full']['accuracy'])} | – "
                     f"| – | – | – | – | {_f(s['full']['tail'])} | – | – |")
    lines += ["", "Initial sets: " + "; ".join(f"{r['name']}: {r['initial_labels']}" for r in s["rows"]) + ".", "",
              "Per seed (distilled / initial, random):", "",
              "| seed | " + " | ".join(r["name"] for r in s["rows"]) + " | random real |",
              "|---|" + "---:|" * (len(s["rows"]) + 1)]
    for seed in s["seeds"]:
        cells = []
        for r in s["rows"]:
            p = r["per_seed"].get(str(seed), {})
            cells.append(" / ".join("–" if p.get(k) is None else f"{p[k]:.1f}" for k in ("distilled", "initial")))
        rv = s["random"]["per_seed"].get(str(seed))
        lines.append(f"| {seed} | " + " | ".join(cells) + f" | {'–' if rv is None else f'{rv:.1f}'} |")
    lines += ["", "Configurations:", ""] + [f"- {r['name']}: {r['description']}" for r in s["rows"]]
    if s.get("notes"):
        lines += ["", "Reading:", ""] + [f"- {x}" for x in s["notes"]]
    return "\n".join(lines) + "\n"


def reading_notes(s: dict) -> list[str]:
    notes = []
    for r in s["rows"]:
        gi, gr = r["gain_over_initial"], r["gain_over_random"]
        if gi["mean"] is None:
            continue
        verdict = ("the iterations help" if gi["mean"] > 0 and r["wins_over_initial"] == gi["n"] else
                   "the iterations hurt" if gi["mean"] < 0 and r["wins_over_initial"] == 0 else
                   "no consistent effect of the iterations")
        notes.append(f"{r['name']}: {gi['mean']:+.1f} points over its initial set ({r['wins_over_initial']}/{gi['n']} "
                     f"seeds better) - {verdict}; {gr['mean']:+.1f} over random real images "
                     f"({r['wins_over_random']}/{gr['n']} seeds better).")
    return notes


def write_results(stem: Path, section: str | None, out: dict | None) -> None:
    """Store ``out`` as ``section`` of ``<stem>.json`` (None: keep the file as it is) and rewrite ``<stem>.md``
    from every section there."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    allres = json.loads(json_path.read_text()) if json_path.is_file() else {}
    if section is not None:
        out["notes"] = reading_notes(out)
        allres[section] = out
        atomic_write_text(json_path, json.dumps(allres, indent=1, default=str) + "\n")
    md = ["# Does distillation learn? Distilled sets against their own initial sets and random real images", "",
          "Written by `benchmarks/learns.py` (one section per setting). For each method the same run is evaluated "
          "twice: after its iterations (distilled) and before the first one (initial: its own initialisation, "
          "same images and labels it started from), beside random real images of the same size with hard labels, "
          "all under one evaluation protocol."]
    notes = stem.parent / f"{stem.name}-notes.md"
    if notes.is_file():
        md.append(f"Hand-written reading of the figures: [{notes.name}]({notes.name}).")
    md.append("")
    for key in sorted(allres):
        md.append(section_markdown(allres[key]))
    atomic_write_text(md_path, "\n".join(md))
    _log(f"wrote {md_path}")


def main(argv=None) -> None:
    from ltdd.runtime import configure_process

    configure_process()  # as every ltdd command (CPU malloc tuning)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--root", default=str(DEFAULT_DATA), help="CIFAR-10 archive or folder (cifar10 only)")
    p.add_argument("--methods", default=None, help=f"comma-separated, of {', '.join(ALL_METHODS)} "
                   "(default: all on digits, mtt,datm,lad on cifar10)")
    p.add_argument("--seeds", default="0,1,2", help="distillation seeds (comma-separated)")
    p.add_argument("--imbalance-factor", type=float, default=None, help="default: the preset's")
    p.add_argument("--ipc", type=int, default=None, help="default: the preset's")
    p.add_argument("--iterations", type=int, default=None, help="trajectory-matching iterations (default: preset's)")
    p.add_argument("--dm-iterations", type=int, default=200, help="DM iterations on digits")
    p.add_argument("--dc-iterations", type=int, default=20, help="DC outer iterations on digits")
    p.add_argument("--batch-real", type=int, default=64, help="DM/DC real images per class per step on digits")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                   help="full-data row (default: on for digits, off for cifar10)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the shared base config (data, experts, LAD's distill, protocol); repeatable")
    p.add_argument("--tag", default="", help="suffix of the section name (e.g. to tell --set variants apart)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="work folder (default: runs/<name>/<section>)")
    p.add_argument("--name", default="learns", help="results file stem in --results")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--report-only", action="store_true", help="rewrite <name>.md from <name>.json; run nothing")
    args = p.parse_args(argv)
    if args.report_only:
        write_results(Path(args.results) / args.name, None, None)
        return
    if args.methods is None:
        args.methods = ",".join(ALL_METHODS) if args.dataset == "digits" else ",".join(TM_METHODS)
    if args.work is None:
        torch.set_num_threads(args.threads)
        args.work = str(ROOT / "runs" / args.name / section_key(args, base_config(args)))
    run(args)


if __name__ == "__main__":
    main()
