"""``ltdd calibrate`` (soft-label calibration of a distilled set) and ``ltdd teacher`` (a teacher network for the
relabel protocol)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config as C
from ..errors import LtddError
from .common import _echo_json, _prepare, cli, data_config, data_options, set_data_options


def _set_file(path: str | Path) -> Path:
    from ..synset import FILENAME

    p = Path(path)
    return p if p.suffix == ".safetensors" else p / FILENAME


@cli.command("calibrate")
@click.argument("distilled", type=click.Path())
@click.option("--out", required=True, type=click.Path(),
              help="where to write the calibrated set (a .safetensors file or a folder); must not exist yet")
@click.option("--tau-range", "tau_range", nargs=2, type=float, default=(-2.0, 4.0), show_default=True,
              help="search interval of tau")
@set_data_options
@click.option("--json", "as_json", is_flag=True)
def calibrate_cmd(distilled, out, tau_range, as_json, **kw):
    """Calibrate a set's soft labels for the long tail: find tau* that makes the mean confidence of each class
    (on the set's images of that class) most even under softmax(logits - tau x log prior), where the prior is the
    class frequency of the long-tailed train set, and write a new set with the shifted logits. The original set is
    left untouched; tau* and the per-class confidences before and after are stored in the new set's metadata.

    The priors come from the class counts the set recorded; the data options are read only when it recorded none.
    """
    from ..calibration import calibrate_set
    from ..data.fingerprint import digest
    from ..synset import SyntheticSet

    src = _set_file(distilled)
    dest = _set_file(out)
    syn = SyntheticSet.load(src)
    if dest.resolve() == src.resolve():
        raise LtddError(f"--out {out} is the set itself; calibration writes a new set and never overwrites the original")
    if dest.exists():
        raise LtddError(f"{dest} already exists; choose another --out")
    if syn.soft_labels is None:
        raise LtddError(f"{src} has no soft labels to calibrate (calibration shifts soft-label logits)")
    data = None
    if not (syn.meta.get("train_counts") or (syn.meta.get("fingerprint") or {}).get("train_counts")):
        base = C.from_dict(C.DataConfig, syn.meta["data"]) if isinstance(syn.meta.get("data"), dict) else None
        data = _prepare(data_config(base, **kw))
        syn.check_compatible(data, str(src))
    lo, hi = tau_range
    new, info = calibrate_set(syn, data, lo=lo, hi=hi)
    info["source"] = {"path": str(src), "sha256": digest(src.read_bytes())}
    new.meta["calibration"] = info
    path = new.save(dest)
    if as_json:
        _echo_json({**info, "written": str(path)})
        return
    click.echo(f"tau* = {info['tau']:.4f} (searched [{lo:g}, {hi:g}]"
               f"{', at the boundary: widen --tau-range' if info['search']['at_boundary'] else ''})")
    click.echo(f"std of per-class mean confidence: {info['std_before']:.4f} -> {info['std_after']:.4f}")
    click.echo(f"{'class':>5} {'prior':>8} {'before':>8} {'after':>8}")
    for c, (p, b, a) in enumerate(zip(info["priors"], info["confidence_before"], info["confidence_after"])):
        fmt = (lambda v: f"{v:8.4f}" if v is not None else f"{'-':>8}")
        click.echo(f"{c:>5} {p:8.4f} {fmt(b)} {fmt(a)}")
    click.echo(f"wrote {path}")


@cli.command("teacher")
@data_options
@click.option("--out", required=True, type=click.Path(), help="teacher file (.safetensors) or folder")
@click.option("--from-experts", "experts_dir", default=None, type=click.Path(),
              help="take the final weights of one expert of this trajectory store instead of training")
@click.option("--store", "store_kind", default="representation", show_default=True,
              help="representation | classifier (with --from-experts)")
@click.option("--index", type=int, default=None, help="which expert (with --from-experts; default: the first)")
@click.option("--method", default="erm", show_default=True,
              help="erm | resample | balanced_softmax | logit_adjust | crt (training on the long-tailed set)")
@click.option("--model", "model_name", default="convnet", show_default=True, help="model name (see `ltdd models`)")
@click.option("--width", type=int, default=None, help="ConvNet width")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--no-dsa", is_flag=True, help="train without DSA augmentation")
@click.option("--seed", type=int, default=0)
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present)")
def teacher_cmd(out, experts_dir, store_kind, index, method, model_name, width, epochs, lr, batch_size, no_dsa,
                seed, device, **kw):
    """Make a teacher network for `ltdd eval --labels teacher`: train one on the long-tailed train set with a
    long-tail method, or take an expert's final weights. Written as a safetensors state_dict that names its model
    and the data it was trained on."""
    from ..evaluate import test_metrics
    from ..labels import save_teacher, teacher_from_expert
    from ..lt_methods import METHODS, train_full
    from ..train import resolve_device

    data = _prepare(data_config(**kw))
    if experts_dir:
        model, model_cfg = teacher_from_expert(experts_dir, data, store_kind, index)
        desc = f"{store_kind} expert {index if index is not None else 'first'} of {experts_dir}"
        metrics = test_metrics(model, data)
    else:
        if method not in METHODS:
            raise LtddError(f"unknown long-tail method '{method}' (known: {', '.join(METHODS)})")
        model_cfg = C.ModelConfig(model_name, {"width": width} if width else {})
        tcfg = C.TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, dsa=not no_dsa, schedule="cosine")
        model, metrics = train_full(data, method, model_cfg, tcfg, device=resolve_device(device), seed=seed,
                                    progress=True)
        desc = f"{method}, {epochs} epochs, lr {lr:g}, seed {seed}"
    path = save_teacher(out, model.cpu(), model_cfg, data, description=desc)
    click.echo(f"teacher ({desc}) test: acc {100 * metrics.accuracy:.2f}, class-std {100 * metrics.class_std:.2f}")
    click.echo(f"wrote {path}")
