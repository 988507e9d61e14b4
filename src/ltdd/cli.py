"""The ``ltdd`` command. Thin: parse, call one library function, print.

User errors (``LtddError``) print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import yaml

from . import config as C
from .errors import LtddError


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
        from .data import list_sources

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
    from .data import prepare_data

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


# ----------------------------------------------------------------------------------------------------------------
@cli.command("data")
@data_options
@click.option("--seed", type=int, default=None, help="alias of --split-seed")
@click.option("--json", "as_json", is_flag=True, help="print a JSON object")
def data_cmd(seed, as_json, **kw):
    """Build the long-tailed split and print per-class train/test counts and class groups."""
    if seed is not None and kw.get("split_seed") is None:
        kw["split_seed"] = seed
    cfg = data_config(**kw)
    data = _prepare(cfg)
    info = data.describe()
    if as_json:
        _echo_json(info)
        return
    click.echo(f"{data.name}: {len(data.train_y)} train images (IF {cfg.resolved_imbalance_factor():g}), "
               f"{len(data.test_y)} test images, {data.num_classes} classes, {data.channels}x{data.im_size[0]}x"
               f"{data.im_size[1]}")
    click.echo(f"{'class':>4}  {'name':<16}{'train':>8}{'test':>8}")
    for c, name in enumerate(data.class_names):
        click.echo(f"{c:>4}  {name[:16]:<16}{data.train_counts[c]:>8}{data.test_counts[c]:>8}")
    for key, members in data.groups.items():
        click.echo(f"{key:>12}: {members}")


# ----------------------------------------------------------------------------------------------------------------
@cli.command("train")
@data_options
@click.option("--method", default="erm", help="erm | resample | balanced_softmax | logit_adjust | crt")
@click.option("--model", "model_name", default="convnet", help="model name (see `ltdd models`)")
@click.option("--width", type=int, default=None, help="ConvNet width")
@click.option("--epochs", type=int, default=30)
@click.option("--lr", type=float, default=0.01)
@click.option("--batch-size", type=int, default=256)
@click.option("--crt-epochs", type=int, default=10)
@click.option("--no-dsa", is_flag=True, help="train without DSA augmentation")
@click.option("--runs", type=int, default=1)
@click.option("--seed", type=int, default=0)
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present)")
@click.option("--out", type=click.Path(), default=None, help="folder for metrics.json and config.yaml")
@click.option("--json", "as_json", is_flag=True)
def train_cmd(method, model_name, width, epochs, lr, batch_size, crt_epochs, no_dsa, runs, seed, device, out,
              as_json, **kw):
    """Full-data training on the long-tailed split with a long-tail method; prints and saves the metrics."""
    from .evaluate import format_summary
    from .lt_methods import METHODS, run_full
    from .train import resolve_device

    if method not in METHODS:
        raise LtddError(f"unknown long-tail method '{method}' (known: {', '.join(METHODS)})")
    cfg = data_config(**kw)
    dev = resolve_device(device)
    data = _prepare(cfg)
    model_cfg = C.ModelConfig(model_name, {"width": width} if width else {})
    tcfg = C.TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, dsa=not no_dsa, schedule="cosine")
    result = run_full(data, method, model_cfg, tcfg, runs=runs, device=dev, seed=seed, crt_epochs=crt_epochs,
                      progress=not as_json)
    result["data"] = data.describe()
    if out:
        C.save_json(Path(out) / "metrics.json", result)
        C.save_yaml(Path(out) / "config.yaml", {"data": cfg, "model": model_cfg, "train": tcfg, "method": method,
                                                "crt_epochs": crt_epochs, "seed": seed, "runs": runs})
    if as_json:
        _echo_json(result)
    else:
        click.echo(f"{method}: {format_summary(result['summary'])}")
        click.echo("per-class: " + " ".join(f"{100 * a:.1f}" for a in result["summary"]["per_class"]))


# ----------------------------------------------------------------------------------------------------------------
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
    from .distributed import dist_context, local_device
    from .synset import SyntheticSet
    from .train import resolve_device

    syn = SyntheticSet.load(distilled)
    base = C.from_dict(C.DataConfig, syn.meta["data"]) if isinstance(syn.meta.get("data"), dict) else None
    cfg = data_config(base, **kw)

    proto = C.apply_overrides(C.protocol_preset(protocol), list(overrides))
    with dist_context() as (rank, world):  # under torchrun the protocol's runs are spread over the ranks
        dev = local_device(resolve_device(device), rank)
        data = _prepare(cfg)
        result = _eval_body(syn, data, proto, protocol, dev, seed, runs, as_json, distilled, out, rank)
    if rank == 0:
        _print_eval(result, protocol, as_json)


def _eval_body(syn, data, proto, protocol, dev, seed, runs, as_json, distilled, out, rank):
    from .evaluate import run_protocol

    if int(syn.labels.max()) >= data.num_classes or int(syn.labels.min()) < 0:
        raise LtddError(f"distilled labels go up to {int(syn.labels.max())}, but {data.name} has "
                        f"{data.num_classes} classes")
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
    from .evaluate import format_summary

    if as_json:
        _echo_json(result)
    else:
        click.echo(f"{protocol} protocol, lr {result['lr']:.4g}: {format_summary(result['summary'])}")
        click.echo(f"wrote {result['written']}")


@cli.command("models")
def models_cmd():
    """List the registered model architectures."""
    from .models import list_models

    for name in list_models():
        click.echo(name)


def main(argv=None) -> None:
    try:
        cli.main(args=argv, prog_name="ltdd", standalone_mode=True)
    except LtddError as e:  # errors raised while parsing
        click.echo(f"ltdd: error: {e}", err=True)
        sys.exit(2)



# ----------------------------------------------------------------------------------------------------------------
def preset_options(f):
    for o in reversed([
        click.option("--preset", default=None, help="preset name (see `ltdd presets`) or a YAML path"),
        click.option("--profile", default=None, help="a profile of the preset, e.g. cpu"),
        click.option("--set", "overrides", multiple=True, help="override any field: --set distill.ipc=20"),
        click.option("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present)"),
    ]):
        f = o(f)
    return f


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


@cli.command("experts")
@preset_options
@click.option("--out", "out", required=True, type=click.Path(), help="expert store folder (appended to)")
@click.option("--num-experts", type=int, default=None)
@click.option("--keep-epochs", default=None, help="store only these epochs, e.g. 0-22 or 0,1,2,10")
def experts_cmd(preset, profile, overrides, device, out, num_experts, keep_epochs):
    """Train representation and classifier experts into a trajectory store (skips experts already there)."""
    from .distributed import dist_context, local_device
    from .experts import train_experts
    from .train import resolve_device

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


@cli.command("distill")
@preset_options
@click.option("--experts", "experts_dir", default=None, type=click.Path(), help="expert store (trajectory methods)")
@click.option("--out", required=True, type=click.Path())
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--no-eval", is_flag=True, help="skip the final evaluation")
@click.option("--eval-runs", type=int, default=None)
def distill_cmd(preset, profile, overrides, device, experts_dir, out, resume, no_eval, eval_runs):
    """Distil a synthetic set with a preset's method; writes distilled.safetensors, config, log, grid, eval."""
    from .distill import distill
    from .evaluate import format_summary
    from .train import resolve_device

    if preset is None:
        raise LtddError("--preset is required (see `ltdd presets`)")
    from .distributed import dist_context, local_device

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
def run_cmd(preset, profile, overrides, device, out):
    """Data -> experts -> distil -> evaluate -> report in one go. No preset: the quick start (LAD on digits-LT)."""
    from .train import resolve_device
    from .workflow import run_pipeline

    name = preset or "quickstart"
    cfg = C.load_preset(name, profile, overrides)
    if out is None:
        import time

        out = str(Path("runs") / f"{Path(name).stem}{'-' + profile if profile else ''}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = run_pipeline(cfg, out, device=resolve_device(device), echo=click.echo)
    click.echo(f"run folder: {out}  (report: {summary['report']})")


@cli.command("report")
@click.argument("run_dir", type=click.Path())
def report_cmd(run_dir):
    """Turn a run folder into report.md and report.html (plots embedded)."""
    from .report import write_report

    path = write_report(run_dir)
    click.echo(f"wrote {path} and {path.with_suffix('.html')}")


# ----------------------------------------------------------------------------------------------------------------
@cli.command("export")
@click.argument("distilled", type=click.Path())
@click.option("--format", "fmt", default="imagefolder", help="imagefolder | ddranking")
@click.option("--out", required=True, type=click.Path(), help="output folder (must be new or empty)")
@click.option("--overwrite", is_flag=True, help="replace a non-empty --out")
@data_options
def export_cmd(distilled, fmt, out, overwrite, **kw):
    """Export a distilled set: un-whitened PNGs in out/<class>/<i>.png, or DD-Ranking's images.pt, labels.pt, lr.pt."""
    import hashlib

    from .export import export_ddranking, export_imagefolder
    from .synset import SyntheticSet

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
    want = syn.meta.get("split_sha")
    got = hashlib.sha256(data.split.indices.tobytes()).hexdigest()[:16]
    if want and want != got:
        raise LtddError(f"the long-tailed split rebuilt for {distilled} differs from the one it was distilled on, so "
                        "its preprocessing cannot be undone; check --root and the data options")
    if tuple(syn.images.shape[1:]) != (data.channels, *data.im_size):
        raise LtddError(f"images have shape {tuple(syn.images.shape)}, expected (N, {data.channels}, "
                        f"{data.im_size[0]}, {data.im_size[1]}) for dataset {data.name}")
    if len(syn.labels) and int(syn.labels.max()) >= data.num_classes:
        raise LtddError(f"distilled labels go up to {int(syn.labels.max())}, but {data.name} has "
                        f"{data.num_classes} classes")
    export_imagefolder(syn, data, out, data.class_names, overwrite=overwrite)
    click.echo(f"wrote {len(syn.labels)} PNGs in {data.num_classes} class folders under {out}")


from .cli_analysis import register as _register_analysis  # noqa: E402  (groups, two-stage)

_register_analysis(cli)


if __name__ == "__main__":  # at the end, so that `python -m ltdd.cli` sees every command
    main()
