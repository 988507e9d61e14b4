"""``ltdd eval`` and ``ltdd report``: evaluate a distilled set, report a run."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config as C
from .common import _echo_json, _prepare, cli, data_config, set_data_options


@cli.command("eval")
@click.argument("distilled", type=click.Path())
@set_data_options
@click.option("--protocol", default="lad", help="lad | dc | cpu")
@click.option("--runs", type=int, default=None)
@click.option("--seed", type=int, default=0)
@click.option("--device", default=None)
@click.option("--set", "overrides", multiple=True, help="override a protocol field, e.g. train.epochs=300")
@click.option("--out", type=click.Path(), default=None, help="where to write eval.json (default: beside the set)")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(distilled, protocol, runs, seed, device, overrides, out, as_json, **kw):
    """Evaluate a distilled set (distilled.safetensors) with the pinned protocol."""
    from ..distributed import dist_context, local_device
    from ..synset import SyntheticSet
    from ..train import resolve_device

    syn = SyntheticSet.load(distilled)
    base = C.from_dict(C.DataConfig, syn.meta["data"]) if isinstance(syn.meta.get("data"), dict) else None
    cfg = data_config(base, **kw)

    proto = C.apply_overrides(C.protocol_preset(protocol), list(overrides))
    with dist_context() as (rank, world):  # under torchrun the protocol's runs are spread over the ranks
        dev = local_device(resolve_device(device), rank)
        data = _prepare(cfg)
        syn.check_compatible(data, str(distilled))
        result = _eval_body(syn, data, proto, protocol, dev, seed, runs, as_json, distilled, out, rank)
    if rank == 0:
        _print_eval(result, protocol, as_json)


def _eval_body(syn, data, proto, protocol, dev, seed, runs, as_json, distilled, out, rank):
    from ..evaluate import run_protocol

    res = run_protocol(syn.images, syn.labels, data, proto, soft_labels=syn.soft_labels, lr=syn.lr, device=dev,
                       seed=seed, runs=runs, progress=not as_json and rank == 0)
    result = res.to_dict()
    result["protocol"] = C.to_dict(proto)
    result["protocol_name"] = protocol
    dest = Path(out) if out else (Path(distilled) if Path(distilled).is_dir() else Path(distilled).parent)
    result["written"] = str(dest / "eval.json")
    if rank == 0:
        C.save_json(dest / "eval.json", result)
    return result


def _print_eval(result: dict, protocol: str, as_json: bool) -> None:
    from ..evaluate import format_summary

    if as_json:
        _echo_json(result)
    else:
        click.echo(f"{protocol} protocol, lr {result['lr']:.4g}: {format_summary(result['summary'])}")
        click.echo(f"wrote {result['written']}")


@cli.command("report")
@click.argument("run_dir", type=click.Path())
def report_cmd(run_dir):
    """Turn a run folder into report.md and report.html (plots embedded)."""
    from ..report import write_report

    path = write_report(run_dir)
    click.echo(f"wrote {path} and {path.with_suffix('.html')}")


# ----------------------------------------------------------------------------------------------------------------
