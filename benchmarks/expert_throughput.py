"""Expert training throughput: ltdd's expert trainer vs a bare training loop over the same in-memory tensor.

    python benchmarks/expert_throughput.py [--images 4096] [--width 32] [--epochs 2] [--reps 3] [--dsa]

Both train the same ConvNet-3 on the same uint8-derived float tensor (32x32x3) with SGD, batch 256, the same
augmentation setting; ltdd's path is ``train_representation_expert`` (the one training loop + a flattened parameter
snapshot after every epoch). Measured alternately in one run; the median ratio is reported.
Writes benchmarks/results/expert_throughput.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

from ltdd.config import ExpertConfig, ModelConfig, TrainConfig, atomic_write_text
from ltdd.data.augment import DSA
from ltdd.experts import train_representation_expert
from ltdd.models import create_model


def bare_loop(x, y, width, epochs, dsa: bool, seed: int) -> float:
    torch.manual_seed(seed)
    model = create_model("convnet", 10, 3, (32, 32), width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0, weight_decay=5e-3)
    aug = DSA() if dsa else None
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 256):
            idx = perm[i:i + 256]
            xb = x[idx]
            if aug is not None:
                xb = aug(xb, generator=g)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def ltdd_expert(data, width, epochs, dsa: bool, seed: int) -> float:
    cfg = ExpertConfig(model=ModelConfig("convnet", {"width": width}), num_experts=1, epochs=epochs,
                       train=TrainConfig(lr=0.01, momentum=0.0, weight_decay=5e-3, batch_size=256, schedule="constant",
                                         dsa=dsa))
    t0 = time.perf_counter()
    train_representation_expert(cfg, data, seed, torch.device("cpu"))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dsa", action="store_true")
    p.add_argument("--out", default="benchmarks/results/expert_throughput.md")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (args.images, 3, 32, 32), dtype=np.uint8)).float().div(255)
    y = torch.from_numpy(rng.integers(0, 10, args.images)).long()
    counts = torch.bincount(y, minlength=10).tolist()
    data = types.SimpleNamespace(num_classes=10, channels=3, im_size=(32, 32), train_x=x, train_y=y,
                                 train_counts=counts)
    bare, ours = [], []
    for r in range(args.reps):
        bare.append(bare_loop(x, y, args.width, args.epochs, args.dsa, r))
        ours.append(ltdd_expert(data, args.width, args.epochs, args.dsa, r))
        print(f"rep {r}: bare {bare[-1]:.2f} s, ltdd expert {ours[-1]:.2f} s", flush=True)
    ratios = [o / b for o, b in zip(ours, bare)]
    med = statistics.median(ratios)
    load = os.getloadavg()
    lines = ["# Expert training throughput vs a bare loop", "",
             f"Command: `python benchmarks/expert_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
             f"Machine: {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
             f"date {time.strftime('%Y-%m-%d')}; load average at the end {load[0]:.1f}.  ",
             f"Work: {args.images} images 32x32x3 in memory, ConvNet-3 width {args.width}, batch 256, {args.epochs} "
             f"epochs, DSA {'on' if args.dsa else 'off'} in both.", "",
             "| rep | bare loop s | ltdd expert s | ratio |", "| --- | --- | --- | --- |"]
    for i, (b, o) in enumerate(zip(bare, ours)):
        lines.append(f"| {i} | {b:.2f} | {o:.2f} | {o / b:.3f} |")
    lines += ["", f"Median ratio (ltdd expert / bare loop): **{med:.3f}** (target: within 1.3x)."]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"median ratio {med:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
