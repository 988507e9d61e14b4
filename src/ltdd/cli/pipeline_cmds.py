"""``ltdd presets``, ``ltdd experts``, ``ltdd distill`` and ``ltdd run``: presets, expert trajectories, distillation, the whole pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

import click

from .. import config as C
from ..errors import LtddError
from .common import _prepare, cli, parse_epochs, preset_options


@cli.command("presets")
@click.argument("name", required=False)
@click.option("--profile", default=None, help="with NAME: resolve under this profile, e.g. cpu")
@click.option("--set", "overrides", multiple=True, help="with NAME: override a field, e.g. --set distill.ipc=20")
def presets_cmd(name, profile, overrides):
    """List the packaged presets, one line each; with NAME, print that preset fully resolved (YAML)."""
    if name is None:
        if profile or overrides:
            raise LtddError("--profile and --set need a preset NAME")
        for n in C.list_presets():
            cfg = C.load_preset(n)
            profiles = f" [profiles: {', '.join(cfg.profiles)}]" if cfg.profiles else ""
            click.echo(f"{n:<28} {cfg.description}{profiles}")
        return
    cfg = C.load_preset(name, profile, overrides)
    resolved = C.to_dict(cfg)
    resolved.pop("profiles", None)
    click.echo(f"# {name}" + (f" --profile {profile}" if profile else "") +
               "".join(f" --set {o}" for o in overrides))
    click.echo(yaml.safe_dump(resolved, sort_keys=False, width=118).rstrip())


@cli.command("protocols")
@click.argument("name", required=False)
def protocols_cmd(name):
    """List the packaged evaluation protocols; with NAME, print that protocol fully resolved (YAML)."""
    if name is None:
        for n in C.list_protocols():
            click.echo(f"{n:<14} {C.protocol_description(n)}")
        return
    resolved = C.to_dict(C.protocol_preset(name))
    click.echo(f"# protocol {name}")
    click.echo(yaml.safe_dump(resolved, sort_keys=False, width=118).rstrip())


@cli.command("experts")
@preset_options
@click.option("--out", "out", required=True, type=click.Path(), help="expert store folder (appended to)")
@click.option("--num-experts", type=int, default=None)
@click.option("--keep-epochs", default=None, help="store only these epochs, e.g. 0-22 or 0,1,2,10")
def experts_cmd(preset, profile, overrides, device, out, num_experts, keep_epochs):
    """Train the experts a preset asks for into a store (skips those already there): representation + classifier
    experts as trajectories for trajectory matching, or an observer + teacher for experts.kind: debiased (RLDD)."""
    from ..distributed import dist_context, local_device
    from ..experts import train_experts
    from ..train import resolve_device

    cfg = C.load_preset(preset or "quickstart", profile, overrides)
    if num_experts is not None:
        cfg.experts.num_experts = num_experts
    if keep_epochs:
        cfg.experts.keep_epochs = parse_epochs(keep_epochs)
    with dist_context() as (rank, world):
        dev = local_device(resolve_device(device), rank)
        data = _prepare(cfg.data)
        res = train_experts(cfg.experts, data, out, device=dev, rank=rank, world=world, progress=rank == 0,
                            log=(lambda r: click.echo(json.dumps(r))) if rank == 0 else None)
    if rank == 0:
        click.echo(f"experts in {out}: {res['available']} (trained now: {res['trained']}, {res['seconds']:.0f} s)")


@cli.command("distill")
@preset_options
@click.option("--experts", "experts_dir", default=None, type=click.Path(), help="expert store (trajectory methods)")
@click.option("--out", required=True, type=click.Path())
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--no-eval", is_flag=True, help="skip the final evaluation")
@click.option("--eval-runs", type=int, default=None)
def distill_cmd(preset, profile, overrides, device, experts_dir, out, resume, no_eval, eval_runs):
    """Distil a synthetic set with a preset's method; writes distilled.safetensors, config, log, grid, eval."""
    from ..distill import distill
    from ..evaluate import format_summary
    from ..train import resolve_device

    if preset is None:
        raise LtddError("--preset is required (see `ltdd presets`)")
    from ..distributed import dist_context, local_device

    cfg = C.load_preset(preset, profile, overrides)
    with dist_context() as (rank, world):  # under torchrun: data-parallel over the synthetic batch
        dev = local_device(resolve_device(device), rank)
        data = _prepare(cfg.data)
        res = distill(cfg, data, out, experts_dir=experts_dir, device=dev, resume=resume, evaluate=not no_eval,
                      eval_runs=eval_runs, progress=rank == 0)
    if rank == 0:
        click.echo(f"distilled set in {out} ({res['seconds']:.0f} s, peak memory {res['peak_memory_mb']:.0f} MB)")
        if "eval" in res:
            click.echo(f"evaluation: {format_summary(res['eval'])}")


@cli.command("run")
@preset_options
@click.option("--out", default=None, type=click.Path(), help="run folder (default: runs/<preset>-<time>)")
@click.option("--no-full-data", is_flag=True,
              help="skip the full-data row (the protocol run on every training image: slow on large data)")
@click.option("--no-baselines", is_flag=True, help="skip the initial-set and random-real-images rows")
def run_cmd(preset, profile, overrides, device, out, no_full_data, no_baselines):
    """Data -> experts -> distil -> evaluate -> report in one go. No preset: the quick start (LAD on digits-LT)."""
    from ..train import resolve_device
    from ..workflow import run_pipeline

    name = preset or "quickstart"
    cfg = C.load_preset(name, profile, overrides)
    if out is None:
        import time

        out = str(Path("runs") / f"{Path(name).stem}{'-' + profile if profile else ''}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = run_pipeline(cfg, out, device=resolve_device(device), echo=click.echo, full_data=not no_full_data,
                           baselines=not no_baselines)
    click.echo(f"run folder: {out}  (report: {summary['report']})")
