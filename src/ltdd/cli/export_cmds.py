"""``ltdd export``: write a distilled set, with a manifest, in a format other tools read."""

from __future__ import annotations

import click

from .. import config as C
from ..errors import LtddError
from .common import _prepare, cli, data_config, set_data_options


@cli.command("export")
@click.argument("distilled", type=click.Path())
@click.option("--format", "fmt", default="imagefolder", show_default=True,
              help="imagefolder: un-whitened PNGs in OUT/<class>/<i>.png (plus soft_labels.safetensors when the set "
                   "has soft labels); ddranking: DD-Ranking's images.pt, labels.pt, lr.pt (class-major, exactly IPC "
                   "images per class, else an error), teacher_model.pt when the set has a teacher")
@click.option("--out", required=True, type=click.Path(), help="output folder (must be new or empty)")
@click.option("--overwrite", is_flag=True, help="replace a non-empty --out")
@click.option("--run-config", "run_config", type=click.Path(), default=None,
              help="the run's resolved config.yaml (default: config.yaml beside DISTILLED, if any): the method, the "
                   "n_c < IPC policy and the evaluation protocol recorded in the manifest")
@click.option("--teacher", type=click.Path(), default=None,
              help="a teacher .safetensors (+ a .json of the same name) to ship with the set (default: the file "
                   "the set's metadata names as its teacher, else teacher.safetensors beside DISTILLED, if any)")
@set_data_options
def export_cmd(distilled, fmt, out, overwrite, run_config, teacher, **kw):
    """Export a distilled set (distilled.safetensors, its run folder, or an earlier export) for use without ltdd.

    Besides the images OUT holds manifest.json (dataset, imbalance factor, split seed, real count per class,
    n_c < IPC policy, IPC, class order and names, preprocessing with mean/std, label type and temperature, learned
    lr, evaluation protocol, method and its config, ltdd version, sha256 of every file), preprocessing.safetensors
    (normaliser and ZCA matrix, fitted on the long-tailed train split) and SHA256SUMS. The folder appears only
    when complete. `ltdd eval OUT` and SyntheticSet.load(OUT) read it back after checking every sha256.
    """
    from ..export import export_ddranking, export_imagefolder, find_run_config, find_teacher
    from ..synset import SyntheticSet

    if fmt not in ("imagefolder", "ddranking"):
        raise LtddError(f"unknown export format '{fmt}' (known: imagefolder, ddranking)")
    syn = SyntheticSet.load(distilled)
    base = C.from_dict(C.DataConfig, syn.meta["data"]) if isinstance(syn.meta.get("data"), dict) else None
    if base is None and not kw.get("dataset"):
        raise LtddError(f"{distilled} does not say which data it was distilled from; pass --dataset (and --root)")
    if run_config is not None:
        rc = C.load_yaml(run_config)
        if not isinstance(rc, dict):
            raise LtddError(f"run config {run_config} is not a mapping")
    else:
        rc = find_run_config(distilled)
    teacher = teacher if teacher is not None else find_teacher(distilled, syn.meta)
    cfg = data_config(base, **kw)
    data = _prepare(cfg)
    syn.check_compatible(data, str(distilled))  # its preprocessing can only be undone with the same statistics
    if fmt == "ddranking":
        paths = export_ddranking(syn, data, out, overwrite=overwrite, class_names=data.class_names, run_config=rc,
                                 teacher=teacher)
        click.echo(f"wrote {', '.join(p.name for p in paths.values())}, manifest.json in {out}")
        return
    export_imagefolder(syn, data, out, data.class_names, overwrite=overwrite, run_config=rc, teacher=teacher)
    click.echo(f"wrote {len(syn.labels)} PNGs in {data.num_classes} class folders and manifest.json under {out}")
