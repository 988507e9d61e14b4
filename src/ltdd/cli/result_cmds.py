"""``ltdd eval`` and ``ltdd report``: evaluate a distilled set, report a run."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config as C
from .common import _echo_json, _prepare, cli, data_config, set_data_options


@cli.command("eval")
@click.argument("distilled", type=click.Path())
@set_data_options
@click.option("--protocol", default=None,
              help="lad | dc | cpu | relabel | relabel_cpu (default: lad; relabel with --labels teacher)")
@click.option("--labels", "label_mode", default=None,
              help="hard | own | teacher - training targets: hard labels only (plain CE); the set's own soft labels; "
                   "or a teacher "
                   "network's logits on every augmented training image (relabel protocols). Default: own when the "
                   "set has soft labels, else hard")
@click.option("--teacher", "teacher_path", default=None, type=click.Path(),
              help="teacher network for --labels teacher (a file written by `ltdd teacher`)")
@click.option("--calibrate", is_flag=True,
              help="shift the set's own soft labels by tau* x log(train class prior) first, tau* chosen to make "
                   "the per-class mean confidences most even (as `ltdd calibrate` does)")
@click.option("--baseline", is_flag=True,
              help="also evaluate a random real subset of the same size (IPC per class from the long-tailed train "
                   "set) under the same protocol and label mode, and print it beside the set")
@click.option("--full", "full_data", is_flag=True,
              help="also train on the whole long-tailed train set with hard labels (ERM, then cRT) - slow")
@click.option("--scores", is_flag=True,
              help="also compute the label-robust and augmentation-robust scores (LRS, ARS); implies --baseline "
                   "and --full and runs the extra evaluations they need")
@click.option("--experts", "experts_dir", default=None, type=click.Path(),
              help="expert store the set was distilled with: gives the random subset the method's initial soft "
                   "labels under --labels own (default: an 'experts' folder next to the set)")
@click.option("--runs", type=int, default=None)
@click.option("--seed", type=int, default=0, help="seed of the training runs and of the random subset's draw")
@click.option("--device", default=None)
@click.option("--set", "overrides", multiple=True, help="override a protocol field, e.g. train.epochs=300")
@click.option("--out", type=click.Path(), default=None, help="folder to write eval.json to (default: beside the set; for an exported folder, "
                   "FOLDER.eval.json beside it, so the export stays as its checksums say)")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(distilled, protocol, label_mode, teacher_path, calibrate, baseline, full_data, scores, experts_dir,
             runs, seed, device, overrides, out, as_json, **kw):
    """Evaluate a distilled set (distilled.safetensors) with a pinned protocol and label mode; writes eval.json."""
    from ..distributed import dist_context, local_device
    from ..labels import check_label_mode, resolve_label_mode
    from ..synset import SyntheticSet
    from ..train import resolve_device

    syn = SyntheticSet.load(distilled)
    base = C.from_dict(C.DataConfig, syn.meta["data"]) if isinstance(syn.meta.get("data"), dict) else None
    cfg = data_config(base, **kw)
    mode = resolve_label_mode(label_mode, syn.soft_labels is not None)
    if protocol is None:
        protocol = "relabel" if mode == "teacher" else "lad"
    proto = C.apply_overrides(C.protocol_preset(protocol), list(overrides))
    check_label_mode(mode, has_soft_labels=syn.soft_labels is not None, has_teacher=bool(teacher_path),
                     relabel_protocol=isinstance(proto, C.RelabelProtocolConfig), calibrate=calibrate,
                     protocol_name=protocol)
    opts = {"mode": mode, "calibrate": calibrate, "baseline": baseline or scores, "full": full_data or scores,
            "scores": scores, "experts_dir": experts_dir, "teacher_path": teacher_path}
    with dist_context() as (rank, world):  # under torchrun the protocol's runs are spread over the ranks
        dev = local_device(resolve_device(device), rank)
        data = _prepare(cfg)
        syn.check_compatible(data, str(distilled))
        result = _eval_body(syn, data, proto, protocol, dev, seed, runs, as_json, distilled, out, rank, opts)
    if rank == 0:
        _print_eval(result, protocol, as_json)


def _eval_body(syn, data, proto, protocol, dev, seed, runs, as_json, distilled, out, rank, opts=None):
    from ..evaluate import evaluate_baseline, evaluate_set, full_data_reference

    opts = opts or {"mode": None}
    teacher = None
    if opts.get("teacher_path"):
        from ..labels import load_teacher

        teacher = load_teacher(opts["teacher_path"], data, device=dev)
    progress = not as_json and rank == 0
    common = dict(protocol_name=protocol, device=dev, seed=seed, runs=runs, progress=progress)
    result = evaluate_set(syn, data, proto, opts["mode"], teacher=teacher, calibrate=opts.get("calibrate", False),
                          **common)
    result["set"] = {"path": str(distilled), "method": syn.meta.get("method"), "images": int(len(syn.images))}
    labeller = None
    if opts.get("baseline"):
        if result["label_mode"] == "own":
            from ..labels import find_expert_store, method_soft_labeller, run_distill_config

            experts = opts.get("experts_dir") or find_expert_store(distilled)
            labeller = method_soft_labeller(run_distill_config(distilled), data, experts)
        result["baseline"] = evaluate_baseline(syn, data, proto, result["label_mode"], teacher=teacher,
                                               calibrate=opts.get("calibrate", False), own_labeller=labeller,
                                               **common)
    if opts.get("full"):
        result["full_data"] = full_data_reference(data, proto, **common)
    if opts.get("scores"):
        from ..scores import score_set

        result["scores"] = score_set(syn, data, proto, result["label_mode"], teacher=teacher,
                                     calibrate=opts.get("calibrate", False), own_labeller=labeller, main=result,
                                     baseline=result["baseline"], full=result["full_data"], **common)
    target = eval_path(distilled, out)
    result["written"] = str(target)
    if rank == 0:
        C.save_json(target, result)
    return result


def eval_path(distilled, out) -> Path:
    """Where ``ltdd eval`` writes: ``OUT/eval.json``; by default ``eval.json`` beside the set, except for an exported
    folder, which stays as its checksums describe it: ``<folder>.eval.json`` beside the folder."""
    from ..export import is_export

    if out:
        return Path(out) / "eval.json"
    p = Path(distilled)
    folder = p if p.is_dir() else p.parent
    if is_export(folder):
        return folder.parent / f"{folder.name}.eval.json"
    return folder / "eval.json"


def _label_text(result: dict) -> str:
    mode = result.get("label_mode")
    if mode == "teacher" and result.get("teacher"):
        return f"labels teacher ({Path(result['teacher']['path']).name}, sha256 {result['teacher']['sha256']})"
    if mode == "own" and result.get("calibration"):
        return f"labels own, calibrated (tau* {result['calibration']['tau']:.3f})"
    return f"labels {mode}"


def _print_eval(result: dict, protocol: str, as_json: bool) -> None:
    from ..evaluate import format_summary

    if as_json:
        _echo_json(result)
        return
    n = result.get("images")
    click.echo(f"{protocol} protocol, {_label_text(result)}, lr {result['lr']:.4g}")
    click.echo(f"  distilled set ({n} images):      {format_summary(result['summary'])}")
    b = result.get("baseline")
    if b is not None:
        if b.get("status") == "n/a":
            click.echo(f"  random real subset ({b['ipc']}/class): n/a ({b['reason']})")
        else:
            src = f", soft labels: {b['soft_labels_from']}" if b.get("soft_labels_from") else ""
            click.echo(f"  random real subset ({b['ipc']}/class{src}): {format_summary(b['summary'])}")
            gain = result["summary"]["accuracy"]["mean"] - b["summary"]["accuracy"]["mean"]
            click.echo(f"  distilled minus random: {100 * gain:+.2f} points")
    for key, full in (result.get("full_data") or {}).items():
        name = {"erm": "ERM", "crt": "cRT"}.get(key, key)
        click.echo(f"  full data, {name} ({full['images']} images, hard labels): {format_summary(full['summary'])}")
    if result.get("scores"):
        from ..scores import format_scores

        click.echo(f"  {format_scores(result['scores']['scores'])}")
    click.echo(f"wrote {result['written']}")


@cli.command("report")
@click.argument("run_dir", type=click.Path())
def report_cmd(run_dir):
    """Turn a run folder into report.md and report.html (plots embedded)."""
    from ..report import write_report

    path = write_report(run_dir)
    click.echo(f"wrote {path} and {path.with_suffix('.html')}")


# ----------------------------------------------------------------------------------------------------------------
