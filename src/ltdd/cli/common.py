"""Shared pieces of the ``ltdd`` commands: the command group, its error handling, the data and preset options."""

from __future__ import annotations

import json

import click

from .. import config as C
from ..errors import LtddError


def _echo_json(obj) -> None:
    click.echo(json.dumps(C.to_dict(obj), indent=2))


def _data_options(default_text: str):
    """Options that select the data and its long-tailed split (shared by every command that loads data)."""

    def deco(f):
        return _add_data_options(f, default_text)

    return deco


def _add_data_options(f, default_text: str):
    opts = [
        click.option("--dataset", default=None,
                     help=f"cifar10 | cifar100 | imagefolder | tiny_imagenet | digits (default: {default_text})"),
        click.option("--root", default=None, help="dataset folder or archive (.tar/.tar.gz/.zip)"),
        click.option("--imbalance-factor", "imbalance_factor", type=float, default=None, help="n_max / n_min (>= 1)"),
        click.option("--imbalance-ratio", "imbalance_ratio", type=float, default=None, help="alias: 1 / IF"),
        click.option("--max-per-class", "max_per_class", type=int, default=None, help="n_max (default: all)"),
        click.option("--profile", default=None, help="exp | step"),
        click.option("--split-seed", "split_seed", type=int, default=None, help="seed of the per-class selection"),
        click.option("--no-zca", "no_zca", is_flag=True, default=False, help="skip ZCA whitening"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


# commands that build data from scratch, and commands that read it from a distilled set's record
data_options = _data_options("digits")
set_data_options = _data_options("the data the distilled set was made from; these options change it")


def data_config(base: C.DataConfig | None = None, **kw) -> C.DataConfig:
    cfg = base or C.DataConfig()
    mapping = {"dataset": "dataset", "root": "root", "imbalance_factor": "imbalance_factor",
               "imbalance_ratio": "imbalance_ratio", "max_per_class": "max_per_class", "profile": "profile",
               "split_seed": "seed"}
    upd = {dst: kw[src] for src, dst in mapping.items() if kw.get(src) is not None}
    if kw.get("no_zca"):
        upd["zca"] = False
    if upd.get("dataset") and upd["dataset"] != "digits" and "root" not in upd and cfg.root is None:
        from ..data import list_sources

        if str(upd["dataset"]).strip().lower() not in list_sources():  # say "unknown", not "--root is required"
            raise LtddError(f"unknown dataset '{upd['dataset']}' (known: {', '.join(list_sources())})")
        raise LtddError(f"--root is required for dataset '{upd['dataset']}'")
    cfg = C.from_dict(C.DataConfig, C.merge(C.to_dict(cfg), upd))
    cfg.resolved_imbalance_factor()
    return cfg


def _pop_data_kw(kw: dict) -> dict:
    keys = ("dataset", "root", "imbalance_factor", "imbalance_ratio", "max_per_class", "profile", "split_seed",
            "no_zca")
    return {k: kw.pop(k) for k in keys if k in kw}


def _prepare(cfg: C.DataConfig):
    from ..data import prepare_data

    return prepare_data(cfg)


class LtddGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LtddError as e:
            click.echo(f"ltdd: error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("ltdd: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=LtddGroup)
@click.version_option(package_name="ltdd")
def cli():
    """ltdd: dataset distillation on long-tailed image data (LAD, DATM, MTT, DC, DM, coresets, two-stage)."""
    from ..runtime import configure_process

    configure_process()  # once, for every command (CPU malloc tuning; LTDD_MALLOC_TUNING=0 turns it off)


def preset_options(f):
    for o in reversed([
        click.option("--preset", default=None, help="preset name (see `ltdd presets`) or a YAML path"),
        click.option("--profile", default=None, help="a profile of the preset, e.g. cpu"),
        click.option("--set", "overrides", multiple=True, help="override any field: --set distill.ipc=20"),
        click.option("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present)"),
    ]):
        f = o(f)
    return f


def parse_epochs(text: str) -> list[int]:
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise LtddError(f"--keep-epochs '{text}' is not a list like 0-22 or 0,1,2") from None
    return sorted(set(out))
