"""What an expert's width costs per training image on this CPU, and how far the narrow networks run from the FLOP rate
of the wide one: ConvNet-3 at widths 32, 64 and 128, one training epoch each (an expert's step: batch 256, SGD lr
0.01 without momentum, weight decay 5e-3, DSA on or off), alternated round by round in one process so that machine
noise hits every width alike.

    python benchmarks/width_cost.py                       # 3 rounds, 1 torch thread, 2,048 images, DSA on
    python benchmarks/width_cost.py --widths 32,128 --rounds 5 --no-dsa --append

Per width it prints the median seconds per 1000 training images, the multiply-accumulates of one image's forward
pass (convolutions and the classifier, counted with forward hooks: a training step is about three forward passes),
the FLOP rate this achieves (3 x 2 x MACs per image) and the cost ratio to the first width listed next to the MAC
ratio. If the cost grew with the MACs, the two ratios would be equal; with DSA off the gap is how far the narrow
network runs from the CPU's rate (with DSA on, the augmentation's per-image cost, which does not depend on the width,
is part of it). Writes ``benchmarks/results/width_cost.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from common import finish, machine_line, section_heading  # noqa: E402  (benchmarks/common.py)


def forward_macs(model, shape) -> int:
    """Multiply-accumulates of one image's forward pass through the model's convolutions and linear layers."""
    import torch
    from torch import nn

    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            total += out[0].numel() * k
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()
        model(torch.zeros(1, *shape))
        model.train()
    for h in handles:
        h.remove()
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="32,64,128")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--append", action="store_true", help="append a section to the results file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "width_cost.md"))
    args = ap.parse_args(argv)

    import torch

    from ltdd.config import TrainConfig
    from ltdd.models import create_model
    from ltdd.runtime import tune_cpu_malloc
    from ltdd.train import train_model

    tuned = tune_cpu_malloc()  # as every ltdd command
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, 32, 32, generator=g)  # the cost does not depend on the pixels
    y = torch.randint(0, 10, (args.images,), generator=g)
    cfg = TrainConfig(epochs=1, lr=0.01, momentum=0.0, weight_decay=5e-3, batch_size=256, schedule="constant",
                      dsa=args.dsa)
    models, macs = {}, {}
    for w in widths:
        torch.manual_seed(0)
        models[w] = create_model("convnet", 10, 3, (32, 32), width=w)
        macs[w] = forward_macs(models[w], (3, 32, 32))
        train_model(models[w], x[:256], y[:256], cfg)  # warm-up
    times: dict[int, list[float]] = {w: [] for w in widths}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for w in (widths if r % 2 == 0 else widths[::-1]):
            t0 = time.perf_counter()
            train_model(models[w], x, y, cfg)
            times[w].append(time.perf_counter() - t0)
            print(f"round {r} width {w:4d}: {times[w][-1]:.2f} s", flush=True)
    load_after = os.getloadavg()
    base = widths[0]
    rows = []
    for w in widths:
        s_per_k = statistics.median(times[w]) / args.images * 1000
        gflops = 3 * 2 * macs[w] * args.images / statistics.median(times[w]) / 1e9
        ratio = statistics.median(a / b for a, b in zip(times[w], times[base]))
        rows.append(f"| {w} | {macs[w] / 1e6:.1f} | {s_per_k:.2f} | {gflops:.1f} | {ratio:.2f}x | "
                    f"{macs[w] / macs[base]:.1f}x |")
    section = "\n".join([
        section_heading("width_cost.py", argv), "",
        f"Machine: {machine_line()}; {args.threads} torch thread(s); malloc tuning "
        f"{'on' if tuned else 'unavailable'}; load average before {load_before[0]:.1f}, after {load_after[0]:.1f}.  ",
        f"Work: one training epoch of ConvNet-3 (its default instance norm) on {args.images:,} images 3x32x32, batch "
        f"256, SGD lr 0.01 without momentum, weight decay 5e-3 (an expert's), DSA {'on' if args.dsa else 'off'}; "
        f"{args.rounds} rounds, widths alternated; medians.", "",
        f"| width | forward MMACs / image | s per 1000 images | GFLOP/s (3 x 2 x MACs) | cost / width {base} "
        f"(median of per-round ratios) | MACs / width {base} |",
        "| --- | --- | --- | --- | --- | --- |", *rows, ""])
    return finish(args.out, "Expert width: cost per training image on CPU", section, args.append)


if __name__ == "__main__":
    sys.exit(main())
