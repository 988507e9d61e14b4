"""``ltdd data``, ``ltdd train`` and ``ltdd models``: the long-tailed split, full-data long-tail training, the model registry."""

from __future__ import annotations

from pathlib import Path

import click

from .. import config as C
from ..errors import LtddError
from .common import _echo_json, _prepare, cli, data_config, data_options


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
    from ..evaluate import format_summary
    from ..lt_methods import METHODS, run_full
    from ..train import resolve_device

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


@cli.command("models")
def models_cmd():
    """List the registered model architectures."""
    from ..models import list_models

    for name in list_models():
        click.echo(name)
