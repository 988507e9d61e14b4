"""``ltdd export``: write a distilled set in a format other tools read."""

from __future__ import annotations

import click

from .. import config as C
from ..errors import LtddError
from .common import _prepare, cli, data_config, set_data_options


@cli.command("export")
@click.argument("distilled", type=click.Path())
@click.option("--format", "fmt", default="imagefolder", help="imagefolder | ddranking")
@click.option("--out", required=True, type=click.Path(), help="output folder (must be new or empty)")
@click.option("--overwrite", is_flag=True, help="replace a non-empty --out")
@set_data_options
def export_cmd(distilled, fmt, out, overwrite, **kw):
    """Export a distilled set: un-whitened PNGs in out/<class>/<i>.png, or DD-Ranking's images.pt, labels.pt, lr.pt."""
    from ..export import export_ddranking, export_imagefolder
    from ..synset import SyntheticSet

    if fmt not in ("imagefolder", "ddranking"):
        raise LtddError(f"unknown export format '{fmt}' (known: imagefolder, ddranking)")
    syn = SyntheticSet.load(distilled)
    if fmt == "ddranking":
        paths = export_ddranking(syn, out, overwrite=overwrite)
        click.echo(f"wrote {', '.join(p.name for p in paths.values())} in {out}")
        return
    base = C.from_dict(C.DataConfig, syn.meta["data"]) if isinstance(syn.meta.get("data"), dict) else None
    if base is None and not kw.get("dataset"):
        raise LtddError(f"{distilled} does not say which data it was distilled from; pass --dataset (and --root)")
    cfg = data_config(base, **kw)
    data = _prepare(cfg)
    syn.check_compatible(data, str(distilled))  # its preprocessing can only be undone with the same statistics
    export_imagefolder(syn, data, out, data.class_names, overwrite=overwrite)
    click.echo(f"wrote {len(syn.labels)} PNGs in {data.num_classes} class folders under {out}")
