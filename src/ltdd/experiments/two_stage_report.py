"""The two-stage table's report from its finished cells: a JSON payload and markdown beside the paper's numbers."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np

from ..config import atomic_write_text, save_json, to_dict
from .machine import machine_line
from .paper import two_stage_paper
from .two_stage_table import (
    BUDGET_S,
    EPOCH_S,
    EXPERT_EPOCH_S,
    GM_ITERATION_S,
    CONTROL_ROWS,
    MTT_ITERATION_S,
    PAPER_REAL_MTT_SHARE_ITERATIONS,
    ROWS,
    TABLE,
    TEST_LOGITS_S,
    TWO_STAGE_ORDER,
    VEHICLES_ANIMALS,
    default_runs,
    flat_row_of,
    run_stages,
)

__all__ = ["write_report", "render_markdown", "command_args"]


def command_args(grid) -> str:
    """The options that differ from the defaults, as command-line text."""
    o = grid.opts
    out = f" --runs {o.runs}" if int(o.runs) != default_runs(o.profile) else ""
    for name in ("width", "real_epochs", "syn_epochs", "gm_iterations", "mtt_iterations", "mtt_experts",
                 "expert_epochs", "mtt_lr_lr"):
        v = getattr(o, name)
        if v is not None:
            out += f" --{name.replace('_', '-')} {v:g}" if isinstance(v, float) else f" --{name.replace('_', '-')} {v}"
    if o.M != 5:
        out += f" --M {o.M}"
    if o.raw_pixels != (o.profile == "paper-real"):
        out += " --raw-pixels" if o.raw_pixels else " --standardised-pixels"
    default_split = grid._fixed_groups(VEHICLES_ANIMALS) if o.profile == "paper-real" else None
    if grid.fixed_groups != default_split:
        out += (" --groups '" + ";".join(",".join(map(str, g)) for g in grid.fixed_groups) + "'"
                if grid.fixed_groups else " --groups none")
    return out


def write_report(grid, data: dict, results: dict, complete: bool) -> Path:
    """Write ``<results>/two-stage-<profile>.{md,json}``; returns the stem."""
    out_dir = Path(grid.opts.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = _payload(grid, data, results, complete)
    stem = out_dir / f"{TABLE}-{grid.opts.profile}"
    save_json(stem.with_suffix(".json"), payload)
    atomic_write_text(stem.with_suffix(".md"), render_markdown(payload))
    return stem


def _scale_text(grid) -> dict:
    settings, profile, normalize = grid.settings, grid.opts.profile, grid.dcfg.normalize
    pix = ("per-channel mean/std standardisation of the LT train set, no ZCA (paper: raw [0, 1] pixels, no ZCA; "
           "a per-channel affine map, and the distillers' step sizes are set for standardised pixels)"
           if normalize else "raw [0, 1] pixels, no ZCA (as the paper)")
    mtt_ex = [o.split("=", 1)[1] for o in settings["mtt_overrides"] if o.startswith("experts.")] or ["?", "?"]
    data = ("CIFAR-10-LT, exponential profile, n_max = 1000, IF 100 -> 2,478 images "
            "[1000, 599, 359, 215, 129, 77, 46, 27, 16, 10] (as the paper); balanced 10k test set; " + pix)
    grouping = ("probe split: 200 unused training images per class (not the test set, unlike the paper), "
                "embedded by the run-0 Original-flat model; per-class k-means M = 5 (k-means++, 10 restarts); "
                "D_ik over all centre pairs; exhaustive max-cut over the 511 two-way splits")
    if profile == "paper-real":
        return _paper_real_scale(grid, data, grouping)
    if profile != "cpu":
        sc = grid.scale_parts()
        return {"data": pix, "networks": f"ConvNet-3; {sc['real']}; {sc['syn']}",
                "GM": f"dc preset; {sc['gm']}", "MTT": f"mtt preset; {sc['mtt']}"}
    return {
        "data": data,
        "networks": f"every classifier (flat, group, intra-group) is ConvNet-3 width {settings['width']} "
                    f"(paper: 128), instance norm; DC protocol: SGD lr 0.01 constant, momentum 0.9, wd 5e-4, "
                    f"batch 256, no augmentation, cross-entropy",
        "epochs": f"{settings['real_epochs']} epochs for every network trained on real images (flat, group "
                  f"classifier, Original + Original's intra-group classifiers; {settings['real_epochs'] * 10} SGD "
                  f"steps on the 2,478 images) and {settings['syn_epochs']} epochs (= steps, one batch) for every "
                  f"network trained on distilled images (paper: 300 epochs for every network)",
        "GM": f"dc preset, cpu profile: ConvNet-3 width 32, {_iters(settings['dc_overrides'])} iterations (the "
              f"profile's 40 cut to fit the budget), outer 10 / inner 10, 64 real images per class, real init, "
              f"lr_img 0.1 momentum 0.5, lr_net 0.01, no DSA (paper: 1000 iterations, outer 10 / inner 50, 256 real "
              f"per class, noise init, width 128)",
        "MTT": f"mtt preset, cpu profile: {mtt_ex[0]} experts x {mtt_ex[1]} epochs at width 32 (SGD 0.01, no "
               f"momentum, DSA) trained on this split; {_iters(settings['mtt_overrides'])} iterations, 10 student "
               f"steps, expert_epochs 2, start epochs [0, 10), lr_img 100, real init, hard labels; step-size "
               f"learning rate lr_lr {_lr_lr(settings['mtt_overrides'])} instead of the preset's 1e-5, which on "
               f"these pixels drives the learned step size to its floor (1e-6) at iteration 0 (matching loss ~8) "
               f"and leaves the images at their real init - measured, with and without ZCA (paper: official MTT "
               f"defaults, e.g. 100 experts x 50 epochs, 5000 iterations, 20 student steps); the learned lr is not "
               f"used in evaluation - every row is evaluated with the same DC protocol",
        "grouping": grouping,
        "runs": "each row: independent seeds 0..runs-1 (network init and batch order); the real-data group "
                "classifier of a seed is shared by Original + GM / + MTT / + Original; mean ± population std",
    }


def _paper_real_scale(grid, data: str, grouping: str) -> dict:
    """The paper-real profile: what is at the paper's scale, what is reduced, and the budget arithmetic."""
    sc = grid.scale_parts()
    gm, mtt, ex = grid.dc_cfg.distill, grid.mtt_cfg.distill, grid.mtt_cfg.experts
    ph = mtt.phases[0]
    est = grid.estimate_lines()[0]
    n_runs = len(grid.seeds)
    return {
        "data": data,
        "networks": f"every classifier (flat, group, intra-group) is ConvNet-3, instance norm, trained with the DC "
                    f"protocol (SGD lr 0.01 constant, momentum 0.9, wd 5e-4, batch 256, no augmentation, "
                    f"cross-entropy). {sc['real']}; {sc['syn']}",
        "GM": f"dc preset at the paper's per-iteration settings (ConvNet-3 width 128, outer 10 / inner 50, 256 real "
              f"images per class, noise init, lr_img 0.1 momentum 0.5, lr_net 0.01, no DSA). {sc['gm']}: one "
              f"iteration takes about {GM_ITERATION_S:g} s on one core, so the paper's 1000 would take "
              f"{1000 * GM_ITERATION_S / 3600:.0f} core-hours; {gm.iterations} iterations are "
              f"{gm.iterations * gm.options.get('outer_loop', 10)} image updates from noise, so this set is an "
              f"early GM set",
        "MTT": f"mtt preset at its paper-scale per-iteration settings ({ph.syn_steps} student steps, expert_epochs "
               f"{ph.expert_epochs}, start epochs [0, {ph.max_start_epoch}), lr_img {mtt.lr_img:g}, real init, hard "
               f"labels; experts ConvNet-3 width {ex.model.args.get('width', 128)}, SGD 0.01, DSA). {sc['mtt']}: "
               f"{ex.num_experts} expert(s) x {ex.train.epochs} epochs (distillation reads only epochs "
               f"0..{ph.max_start_epoch - 1 + ph.expert_epochs}, so longer experts would change nothing), "
               f"{mtt.iterations} iterations of about {MTT_ITERATION_S:g} s; lr_lr {mtt.lr_lr:g} as the cpu "
               f"profile (the preset's 1e-5 drove the learned step size to its floor at iteration 0 on un-whitened "
               f"pixels, measured at the cpu scale)"
               + (f". It runs {mtt.iterations} of the {PAPER_REAL_MTT_SHARE_ITERATIONS} iterations its share of the "
                  f"budget buys: on this long-tailed data the learned step size falls to its floor (1e-6) by "
                  f"iteration 14 (measured), and an image update is proportional to the step size, so the set stops "
                  f"changing; at its real init any step size above 1e-4 makes the matching loss worse than not "
                  f"moving for start epochs 6-19 (benchmarks/mtt_step_size.py)"
                  if mtt.iterations < PAPER_REAL_MTT_SHARE_ITERATIONS else ""),
        "budget": f"about 4 hours on 2 CPU cores for the whole table ({BUDGET_S / 3600:g} core-hours). Measured "
                  f"on one core at width 128 (benchmarks/two_stage_costs.py): {EPOCH_S:g} s per epoch on the 2,478 "
                  f"images, {EXPERT_EPOCH_S:g} s per expert epoch (DSA), {TEST_LOGITS_S:g} s per test pass of a "
                  f"network, {GM_ITERATION_S:g} s per GM iteration, {MTT_ITERATION_S:g} s per MTT iteration. "
                  f"The networks at the paper's scale take less than a third of it (5 networks' worth of 300 "
                  f"epochs on the real images: Original flat, and per split the group classifier and Original + "
                  f"Original's two intra-group classifiers); GM and MTT share what is left equally, MTT's experts "
                  f"charged to MTT, so that the two distilled sets the rows compare cost the same. {est}",
        "grouping": grouping,
        "runs": f"{n_runs} run{'s' if n_runs != 1 else ''} per row (the paper: single runs); the real-data group "
                f"classifier of a seed is shared by Original + GM / + MTT / + Original",
    }


def _payload(grid, data: dict, results: dict, complete: bool) -> dict:
    o = grid.opts
    paper, notes, _ = two_stage_paper()
    return {
        "table": "two-stage paper, Tables 1-3 (CIFAR-10-LT, n_max 1000, IF 100, IPC 10)",
        "complete": bool(complete),
        "profile": o.profile,
        "command": f"ltdd reproduce {TABLE} --profile {o.profile}" + command_args(grid),
        "alt_command": f"python benchmarks/two_stage_table.py --profile {o.profile}" + command_args(grid),
        "machine": machine_line(grid.table.device),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "runs": int(o.runs),
        "scale": _scale_text(grid),
        "settings": grid.settings,
        "data": {"config": to_dict(grid.dcfg), "train_counts": data["train_counts"],
                 "class_names": data["class_names"], "class_groups": data["class_groups"]},
        "model": to_dict(grid.model_cfg),
        "train": to_dict(grid.train_cfg),
        "paper": paper,
        "paper_notes": notes,
        "paper_derived": {row: _paper_derived(p["per_class"], data["class_groups"]) for row, p in paper.items()},
        **results,
    }


def _paper_derived(per_class, class_groups) -> dict:
    pc = np.asarray(per_class, dtype=np.float64)
    out = {k: float(pc[v].mean()) for k, v in class_groups.items() if v}
    out["worst"] = float(pc.min())
    out["class_std_from_per_class"] = float(pc.std())
    return out


def _lr_lr(overrides) -> str:
    for o in overrides or []:
        if o.startswith("distill.lr_lr="):
            return o.split("=", 1)[1]
    return "1e-5"


def _iters(overrides) -> str:
    for o in overrides or []:
        if o.startswith("distill.iterations="):
            return o.split("=", 1)[1]
    return "preset"


def _no_spec_refs(text) -> str:
    """A note without citations of the project's internal write-up ("two-stage.md §6.3, ...")."""
    return re.sub(r"\s*two-stage\.md\s*(§\s*[\d.]+)?,?\s*", " ", str(text)).replace("( ", "(").strip()


def _both_splits(P: dict, F: dict) -> list[str]:
    """The two-stage rows under the computed (max-cut) split and under the fixed split, side by side, with the
    max-cut objective of each split."""
    G = P.get("grouping")
    rows, fixed = P.get("rows", {}), P.get("rows_fixed", {})
    L = ["", "## Two-stage rows under the computed and the fixed split", "",
         "Max-cut objective: the sum of the class distance D_ik over class pairs in different groups (larger = "
         "the groups are further apart), on the run-0 Original-flat model's probe features."]
    if G:
        L += ["", f"- computed (max-cut): {{{', '.join(G['group_names'][0])}}} vs {{{', '.join(G['group_names'][1])}}}"
                  f", objective {G['cut']:.1f} (rank 1)"]
    else:
        L += ["", "- computed (max-cut): not computed yet"]
    obj = (f", objective {F['cut']:.1f} (rank {F['rank']} of {F['of']}, {max(0.0, F['gap']):.1f} below the max-cut)"
           if "cut" in F else ", objective: once the grouping is computed")
    L.append(f"- {F['text']}{obj}" + (" - the same split as the computed one" if F.get("same_as_computed") else ""))
    if F.get("group_summary"):
        L.append("- fixed split's group priors on the LT training set: " + "; ".join(
            f"G{i + 1}: {g['train_images']} images ({100 * g['prior']:.1f} %), within-group imbalance "
            f"{g['imbalance']:.1f}" for i, g in enumerate(F["group_summary"])))
    L += ["", "| row | acc, computed | acc, fixed | class std, computed | class std, fixed | group acc, computed | "
              "group acc, fixed | acc (paper) | class std (paper) |", "| --- " * 9 + "|"]
    for row in TWO_STAGE_ORDER:
        a, b = (x.get(row, {}).get("summary", {}) for x in (rows, fixed))
        p = P["paper"].get(row) or CONTROL_PAPER
        L.append(f"| {_label(row)} | {_f(a.get('accuracy'))} | {_f(b.get('accuracy'))} | {_f(a.get('class_std'))} | "
                 f"{_f(b.get('class_std'))} | {_f(a.get('group_accuracy'))} | {_f(b.get('group_accuracy'))} | "
                 f"{p['accuracy']} | {p['class_std']} |")
    return L


# the paper's columns of a row the paper does not have (the random-real controls)
CONTROL_PAPER = {"accuracy": "–", "class_std": "–", "train_images": "–", "group_accuracy": None}


def _label(row: str) -> str:
    """A row's label; the random-real controls are marked as ours."""
    return ROWS[row][0] + (" (control)" if row in CONTROL_ROWS else "")


def _f(ms, scale: float = 100.0) -> str:
    if not isinstance(ms, dict) or ms.get("mean") is None:
        return "–"
    return f"{scale * ms['mean']:.1f} ± {scale * ms['std']:.1f}"


def _p(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def render_markdown(P: dict) -> str:
    rows = P.get("rows", {})
    names = P["data"]["class_names"]
    L = [f"# Two-stage paper, Tables 1–3, on CIFAR-10-LT (n_max 1000, IF 100, IPC 10) — `{P['profile']}` profile",
         ""]
    if not P.get("complete"):
        L += ["**Partial: the run has not finished; rows that are missing are still to come.**", ""]
    L += [f"Command: `{P['command']}` (or `{P['alt_command']}`); a killed run resumes from its cells.  ",
          f"Machine: {P['machine']}.  ", f"Date: {P['date']}. Runs per row: {P['runs']} (paper: 1)"
          + ("; with one run every ± below is 0 and says nothing of the spread." if P["runs"] == 1 else "."), "",
          "Scale (what differs from the paper):", ""]
    L += [f"- **{k}**: {v}" for k, v in P["scale"].items()]

    # groups
    G = P.get("grouping")
    if G:
        L += ["", "## The groups", "",
              f"Computed: **G1 = {{{', '.join(G['group_names'][0])}}}**, **G2 = {{{', '.join(G['group_names'][1])}}}**"
              f" — max-cut value {G['cut']:.1f} (exhaustive, over {G['references']['paper_fig2_inferred']['of']} "
              f"splits; features: {G['features_split']} split, M = {G['M']}).", "",
              "| split | G1 | G2 | cut | rank (1 = max-cut) | gap to max |", "| --- | --- | --- | --- | --- | --- |",
              f"| computed (max-cut) | {', '.join(G['group_names'][0])} | {', '.join(G['group_names'][1])} | "
              f"{G['cut']:.1f} | 1 | 0 |"]
        for a in G["alternatives"]:
            L.append(f"| alternative | {', '.join(a['group_names'][0])} | {', '.join(a['group_names'][1])} | "
                     f"{a['cut']:.1f} | {a['rank']} | {max(0.0, a['gap']):.1f} |")
        for k, r in G["references"].items():
            L.append(f"| {k} | {', '.join(r['group_names'][0])} | {', '.join(r['group_names'][1])} | {r['cut']:.1f} | "
                     f"{r['rank']} of {r['of']} | {max(0.0, r['gap']):.1f} |")
        F = P.get("fixed_split")
        if F and "cut" in F:
            L.append(f"| fixed (--groups) | {', '.join(F['group_names'][0])} | {', '.join(F['group_names'][1])} | "
                     f"{F['cut']:.1f} | {F['rank']} of {F['of']} | {max(0.0, F['gap']):.1f} |")
        L += ["", "Group priors of the long-tailed training set (the group classifier sees these): " +
              "; ".join(f"G{i + 1}: {s['train_images']} images ({100 * s['prior']:.1f} %), within-group imbalance "
                        f"{s['imbalance']:.1f}" for i, s in enumerate(G["group_summary"])) + "."]
        S = P.get("grouping_stability")
        if S:
            st = S["stability"]
            L += ["", "Partition given by each flat model (same probe features procedure):", "",
                  "| model | G1 | cut | rank of paper's Fig. 2 split | rank of vehicles/animals |",
                  "| --- | --- | --- | --- | --- |"]
            for k, m in S["models"].items():
                L.append(f"| {k} | {', '.join(m['group_names'][0])} | {m['cut']:.1f} | {m['paper_fig2_rank']} | "
                         f"{m['vehicles_rank']} |")
            L += ["", f"Mean pairwise ARI {st['mean_ari']:.2f} vs {st['random']['mean']:.2f} ± "
                      f"{st['random']['std']:.2f} for random splits of the same sizes (p = {st['p_value']:.3f})."]

    # main table
    L += ["", "## Tables 1–3: overall accuracy, class std, group accuracy (%), ours vs paper", "",
          "Ours: mean ± std over runs, hard routing (the paper's). Paper: single runs. Group acc of a flat row: share "
          "of test images whose predicted class is in the true class's group.", "",
          "| table | row | train imgs | acc (ours) | acc (paper) | class std (ours) | class std (paper) | "
          "group acc (ours) | group acc (paper) |", "| --- " * 9 + "|"]
    for row, (_, tab, _, _) in ROWS.items():
        label = _label(row)
        r = rows.get(row)
        p = P["paper"].get(row) or CONTROL_PAPER
        s = r["summary"] if r else {}
        ti = s.get("train_images", {}).get("mean") if r else None
        L.append(f"| {tab} | {label} | {int(ti) if ti is not None else '–'} / {p['train_images']} | "
                 f"{_f(s.get('accuracy'))} | {p['accuracy']} | {_f(s.get('class_std'))} | {p['class_std']} | "
                 f"{_f(s.get('group_accuracy'))} | {_p(p['group_accuracy'])} |")
    L += ["", "Train imgs: ours / paper (every image once per stage that uses it). (control): a row the paper does "
          "not have: the same row with a random real subset of the distilled sets' size (IPC 10 real images per "
          "class from the LT training set, a class with fewer repeated) in place of the distilled set, trained the "
          "same way - what distillation adds over picking real images. " +
          " ".join(f"{k}: {_no_spec_refs(v)}." for k, v in P.get("paper_notes", {}).items())]

    # scale per row
    RS = P.get("row_scale")
    if RS:
        L += ["", "## Scale of each row: what is at the paper's scale and what is reduced", "",
              "| row | scale |", "| --- | --- |"]
        L += [f"| {_label(row)} | {RS[row]} |" for row in ROWS if row in RS]

    # the two-stage rows under both splits
    F = P.get("fixed_split")
    if F:
        L += _both_splits(P, F)

    # routing variants
    L += ["", "## Extra columns: soft routing and the group-prior correction (same networks)", "",
          "Soft: argmax_y p(g(y)|x) p(y|x, g(y)). Prior: group logits minus log π_g (τ = 1, π_g = the stage-1 group "
          "prior; GM + GM has a balanced stage 1, so the correction does nothing there).", "",
          "| row | hard acc | hard std | soft acc | soft std | hard+prior acc | hard+prior std | group acc+prior | "
          "soft+prior acc | soft+prior std |", "| --- " * 10 + "|"]
    for row, (_, tab, _, st2) in ROWS.items():
        label = _label(row)
        r = rows.get(row)
        if not r or st2 is None:
            continue
        s = r["summary"]
        L.append(f"| {label} | {_f(s.get('acc_hard'))} | {_f(s.get('class_std_hard'))} | {_f(s.get('acc_soft'))} | "
                 f"{_f(s.get('class_std_soft'))} | {_f(s.get('acc_hard_prior'))} | "
                 f"{_f(s.get('class_std_hard_prior'))} | {_f(s.get('group_accuracy_hard_prior'))} | "
                 f"{_f(s.get('acc_soft_prior'))} | {_f(s.get('class_std_soft_prior'))} |")

    # the paper's metrics
    L += ["", "## All the paper's metrics (%)", "",
          "head = classes 0–2, medium = 3–6, tail = 7–9 (by frequency); many (> 100 images) = 0–4, medium-shot "
          "(20–100) = 5–7, few (< 20) = 8–9. Paper values are derived from its per-class table.", "",
          "| row | | acc | class std | worst class | head | medium | tail | many | med-shot | few |",
          "| --- " * 11 + "|"]
    for row in ROWS:
        label = _label(row)
        r = rows.get(row)
        if r:
            s, g = r["summary"], r["summary"]["groups"]
            worst = int(np.argmin(s["per_class"]))
            L.append(f"| {label} | ours | {_f(s['accuracy'])} | {_f(s['class_std'])} | {_f(s['worst_accuracy'])} "
                     f"(mean-worst: {names[worst]}) | {_f(g.get('head'))} | {_f(g.get('medium'))} | "
                     f"{_f(g.get('tail'))} "
                     f"| {_f(g.get('many'))} | {_f(g.get('medium_shot'))} | {_f(g.get('few'))} |")
        if row not in P["paper"]:
            continue
        d = P["paper_derived"][row]
        pc = P["paper"][row]["per_class"]
        L.append(f"| {label} | paper | {P['paper'][row]['accuracy']} | {P['paper'][row]['class_std']} | "
                 f"{d['worst']:.1f} ({names[int(np.argmin(pc))]}) | {d['head']:.1f} | {d['medium']:.1f} | "
                 f"{d['tail']:.1f} | {d['many']:.1f} | {d['medium_shot']:.1f} | {d['few']:.1f} |")

    L += ["", "## Per-class accuracy (%), head → tail (ours: mean over runs)", "",
          "| row | | " + " | ".join(names) + " |", "| --- " * (len(names) + 2) + "|"]
    for row in ROWS:
        label = _label(row)
        r = rows.get(row)
        if r:
            L.append(f"| {label} | ours | " + " | ".join(f"{100 * a:.1f}" for a in r["summary"]["per_class"]) + " |")
        if row in P["paper"]:
            L.append(f"| {label} | paper | " + " | ".join(f"{a:.1f}" for a in P["paper"][row]["per_class"]) + " |")

    T = P.get("timings", {})
    if T:
        # the run's order: each source, its flat row, then the two-stage rows it completes
        made = {"real": [], "random": [], "mtt": ["mtt_experts", "distill_mtt"], "gm": ["distill_gm"]}
        order = ["data", "original_flat_run0"]
        for src, ready in run_stages(["computed", "fixed"]):
            order += made[src] + [f"row_{flat_row_of(src)}"]
            order += [f"row_{r}" + ("-fixed" if split == "fixed" else "") for r, split in ready]
        order += ["grouping_stability", "total_wall"]
        L += ["", "## Timing (seconds, wall clock, this machine)", "",
              "Summed over every call of this work folder (a resumed call only adds what it recomputed, and a call "
              "that was killed adds nothing: the stored records below count the networks and the logged "
              "distillation iterations in full); other jobs may have shared the machine's cores, so these are not "
              "idle-machine times: " +
              ", ".join(f"{k} {T[k]:.0f}" for k in order + sorted(set(T) - set(order)) if k in T) + "."]
        tot = {k: sum(v["seconds"] for n, v in P.get("net_seconds", {}).items() if n.startswith(k))
               for k in ("flat-", "group-", "intra-")}
        if P.get("net_seconds"):
            L.append(f"Network training + test-set logits, summed over all stored networks: flat {tot['flat-']:.0f}, "
                     f"group {tot['group-']:.0f}, intra-group {tot['intra-']:.0f}.")
        for k in ("gm", "mtt"):
            dd = P.get("distilled", {}).get(k)
            if dd:
                tr = dd.get("loss_trace") or {}
                lr = (f", learned step size {tr['first']['lr']:.4g} -> {tr['last']['lr']:.4g}"
                      if tr and tr["first"].get("lr") is not None else "")
                L.append(f"{k.upper()} distillation: {dd['iterations']} iterations, "
                         f"{dd.get('distill_seconds_logged', 0):.0f} s of logged iterations"
                         + (f", mean matching loss {tr['first']['loss']:.3g} over the first 10 iterations -> "
                            f"{tr['last']['loss']:.3g} over the last 10{lr}" if tr else "") + ".")
    L += ["", "## Reading", "", _reading(P), ""]
    return "\n".join(L) + "\n"


def _reading(P: dict) -> str:
    rows = P.get("rows", {})

    def acc(r):
        return rows[r]["summary"]["accuracy"] if r in rows else None

    def std(r):
        return rows[r]["summary"]["class_std"] if r in rows else None

    def diff(a, b, key="accuracy"):
        """(difference of the means in pp, its standard error; None with one run, where there is none)."""
        A = rows[a]["summary"][key]
        B = rows[b]["summary"][key if key in rows[b]["summary"] else "accuracy"]
        d = 100 * (A["mean"] - B["mean"])
        if P["runs"] < 2:
            return d, None
        return d, 100 * math.sqrt((A["std"] ** 2 + B["std"] ** 2) / (P["runs"] - 1))

    def pm(d, e) -> str:
        return f"{d:+.1f} pp, one run" if e is None else f"{d:+.1f} ± {e:.1f} pp"

    def vs(d, e, name):
        # "beats" / "is below" only beyond two standard errors (and 0.5 pp); otherwise a tie. With one run there
        # is no standard error: only the 0.5 pp margin
        margin = max(2 * (e or 0.0), 0.5)
        if d > margin:
            return f"beats {name}"
        if d < -margin:
            return f"is below {name}"
        return f"ties {name} (within {'noise' if e is not None else '0.5 pp'})"

    notes = []
    if {"original+gm", "gm_flat", "original_flat"} <= rows.keys():
        d1, e1 = diff("original+gm", "gm_flat")
        d2, e2 = diff("original+gm", "original_flat")
        verdict = f"{vs(d1, e1, 'GM flat')} and {vs(d2, e2, 'Original flat')}"
        notes.append(f"Original + GM {100 * acc('original+gm')['mean']:.1f} vs GM flat "
                     f"{100 * acc('gm_flat')['mean']:.1f} "
                     f"({pm(d1, e1)}) and Original flat {100 * acc('original_flat')['mean']:.1f} "
                     f"({pm(d2, e2)}): with hard routing it **{verdict}** (paper: +4.2 and +2.8 pp, "
                     f"i.e. beats both)." + (" (± = standard error of the difference of the means over runs.)"
                                             if e1 is not None else ""))
        s_o, s_g, s_og = (100 * std(r)["mean"] for r in ("original_flat", "gm_flat", "original+gm"))
        notes.append(f"Class-accuracy std: Original flat {s_o:.1f} → Original + GM {s_og:.1f} "
                     f"({'shrinks' if s_og < s_o else 'does not shrink'} vs flat real data; paper 32.4 → 20.1), but "
                     f"GM flat has {s_g:.1f} (" + ("the two-stage std is larger, as in the paper (11.8 → 20.1)"
                                                   if s_og > s_g else
                                                   "the two-stage std is not larger than GM flat, unlike the paper")
                     + ").")
        hd = rows["original+gm"]["summary"]["groups"]
        hg = rows["gm_flat"]["summary"]["groups"]
        notes.append(f"Where the change vs GM flat lands: head {100 * (hd['head']['mean'] - hg['head']['mean']):+.1f}, "
                     f"medium {100 * (hd['medium']['mean'] - hg['medium']['mean']):+.1f}, tail "
                     f"{100 * (hd['tail']['mean'] - hg['tail']['mean']):+.1f} pp (paper: +15.4 / +0.4 / −2.1).")
    if "original+gm" in rows:
        s = rows["original+gm"]["summary"]
        if "original_flat" in rows:
            dp, ep = diff("original+gm", "original_flat", "acc_hard_prior")
            sp = 100 * s["class_std_hard_prior"]["mean"]
            vs_flat = pm(dp, ep).replace(" pp", " pp vs Original flat", 1)
            notes.append(f"With the group-prior correction (τ = 1) Original + GM reaches "
                         f"{100 * s['acc_hard_prior']['mean']:.1f} ({vs_flat}) at "
                         f"class std {sp:.1f} (Original flat {100 * std('original_flat')['mean']:.1f}).")
        notes.append(f"Routing ceiling: group accuracy of the real-data group classifier "
                     f"{100 * s['group_accuracy']['mean']:.1f} % (paper 84.2); soft routing gives "
                     f"{100 * s['acc_soft']['mean']:.1f} and the group-prior correction "
                     f"{100 * s['acc_hard_prior']['mean']:.1f} (hard {100 * s['acc_hard']['mean']:.1f}).")
    if {"original+original", "original_flat"} <= rows.keys():
        d, e = diff("original+original", "original_flat")
        notes.append(f"Original + Original vs Original flat: {pm(d, e)} (paper +0.1: the two-stage "
                     f"structure alone does little).")
    if {"gm+gm", "gm_flat"} <= rows.keys():
        d, e = diff("gm+gm", "gm_flat")
        notes.append(f"GM + GM vs GM flat: {pm(d, e)}, class std {100 * std('gm+gm')['mean']:.1f} "
                     f"(paper −1.2 pp, std 9.9); its group accuracy "
                     f"{100 * rows['gm+gm']['summary']['group_accuracy']['mean']:.1f} "
                     f"(paper 75.1).")
    if {"original+mtt", "mtt_flat", "original_flat"} <= rows.keys():
        notes.append(f"MTT: flat {100 * acc('mtt_flat')['mean']:.1f}, Original + MTT "
                     f"{100 * acc('original+mtt')['mean']:.1f} (paper 22.0 → 32.3, still below Original flat 37.6).")
    # what distillation adds: each distilled-set row against the same row on the random real subset of that size
    pairs = [(a, b) for a, b in (("gm_flat", "random_flat"), ("mtt_flat", "random_flat"),
                                 ("original+gm", "original+random"), ("original+mtt", "original+random"),
                                 ("gm+gm", "random+random")) if {a, b} <= rows.keys()]
    if pairs:
        parts = []
        for a, b in pairs:
            d, e = diff(a, b)
            parts.append(f"{ROWS[a][0]} {100 * acc(a)['mean']:.1f} vs {ROWS[b][0]} {100 * acc(b)['mean']:.1f} "
                         f"({pm(d, e)}: {vs(d, e, 'it')})")
        notes.append("Against the random-real control (the same number of real images per class, trained the same "
                     "way; the paper has no such row): " + "; ".join(parts) + ".")
    G = P.get("grouping")
    if G:
        r1 = G["references"]["paper_fig2_inferred"]
        r2 = G["references"]["vehicles_vs_animals"]
        notes.append(f"Groups: max-cut gives {{{', '.join(G['group_names'][0])}}} vs the rest; the paper's inferred "
                     f"split ranks {r1['rank']} of {r1['of']}, vehicles/animals ranks {r2['rank']}.")
    st = P.get("settings", {})
    F = P.get("fixed_split")
    fixed = P.get("rows_fixed", {})
    if F and "original+gm" in fixed and "original+gm" in rows:
        a, b = (100 * x["original+gm"]["summary"]["accuracy"]["mean"] for x in (rows, fixed))
        notes.append(f"Original + GM under the computed split {a:.1f} vs under the {F['text']} {b:.1f}"
                     + (f"; the fixed split's max-cut objective ranks {F['rank']} of {F['of']}" if "rank" in F else "")
                     + (" (it is the computed split)" if F.get("same_as_computed") else "") + ".")
    if P.get("profile") == "paper-real":
        sp = P.get("scale_parts", {})
        notes.append(f"Scale caveat: every network is at the paper's scale, but the distilled sets are not - "
                     f"{sp.get('gm', 'GM set: reduced')}; {sp.get('mtt', 'MTT set: reduced')} - so the GM and MTT "
                     f"rows measure early, short distillations, and differences to the paper in those rows say "
                     f"little about the method itself.")
    if P.get("profile") == "cpu":
        notes.append(f"Scale caveat: width-{st.get('width')} networks, {st.get('real_epochs')} epochs on real data "
                     f"(paper 300), and a short GM ({_iters(st.get('dc_overrides'))} iterations) / MTT "
                     f"({_iters(st.get('mtt_overrides'))} iterations, few short experts) distillation, so absolute "
                     f"numbers sit below the paper's; every row shares the same network and optimiser settings.")
    return "\n".join(f"- {n}" for n in notes)
