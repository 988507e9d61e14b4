"""Cost of one student step of the trajectory-matching engine, relative to one plain SGD training step.

    python benchmarks/step_cost.py                      # CPU, ConvNet-3 width 128, batch 100, N = 10, 5 repetitions
    python benchmarks/step_cost.py --device cuda --reps 10
    python benchmarks/step_cost.py --steps 20 --batch 50 --modes exact

cost(mode) = [time of one engine iteration (``TrajectoryMatching.step``) of one phase with N student steps] / N,
i.e. one inner step plus its share of the gradient back to the synthetic images / soft labels / step size, divided
by the time of one plain SGD training step (forward + cross-entropy + backward + ``optimizer.step()``) of the same
architecture built from stock PyTorch modules (``nn.Conv2d``, ``nn.GroupNorm(C, C)`` as instance norm, ``nn.ReLU``,
``nn.AvgPool2d``, ``nn.Linear``) on a batch of the same size.

The engine runs on a hand-made expert store (random-walk trajectories, no training) and an in-memory random data
set with the model's input shape; timings do not depend on the values. No DSA augmentation (``--dsa`` turns it on),
soft labels with the soft cross-entropy inner loss, every synthetic image in every inner step (``batch_syn`` = all),
as in LAD/DATM at IPC 10.

Measurement: one warm-up round, then ``--reps`` rounds; in every round each measured thing (plain step, then each
gradient mode) is timed once, alternately, so that load from other processes on a shared machine hits all of them
alike. The plain step is timed over N consecutive steps. A ratio is formed within each round; the table gives the
median ratio over rounds and the median raw times. Results go to ``benchmarks/results/step_cost.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import machine_line, write_section  # noqa: E402  (benchmarks/common.py)
from ltdd.config import DistillConfig, ExpertConfig, ModelConfig, PhaseConfig, TrainConfig
from ltdd.runtime import tune_cpu_malloc
from ltdd.distill.engine import TrajectoryMatching
from ltdd.experts import Trajectory, TrajectoryStore
from ltdd.models import create_model
from ltdd.models.functional import ParamLayout

MODES = ("exact", "constant_memory")


# ---- the engine on synthetic inputs ------------------------------------------------------------------------------
class _Identity:
    def to_pixels(self, x):
        return x

    def config(self):
        return {"kind": "identity"}


def make_data(num_classes: int, per_class: int, channels: int = 3, im: int = 32, seed: int = 0):
    """A random in-memory data namespace with what the engine reads (``per_class`` training images per class)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(num_classes).repeat_interleave(per_class)
    xs = torch.randn(len(ys), channels, im, im, generator=g)
    ty = torch.arange(num_classes)
    tx = torch.randn(num_classes, channels, im, im, generator=g)
    return types.SimpleNamespace(
        name="bench", class_names=[f"c{i}" for i in range(num_classes)], num_classes=num_classes, channels=channels,
        im_size=(im, im), train_x=xs, train_y=ys, test_x=tx, test_y=ty, train_counts=[per_class] * num_classes,
        test_counts=[1] * num_classes, split=types.SimpleNamespace(indices=np.arange(len(ys))),
        preprocessor=_Identity(), groups={"head": list(range(num_classes)), "medium": [], "tail": []})


def make_store(root, data, model_cfg: ModelConfig, epochs: int = 3, seed: int = 0) -> TrajectoryStore:
    """One representation expert whose trajectory is a random walk around the initial weights."""
    model = create_model(model_cfg.name, data.num_classes, data.channels, data.im_size, **model_cfg.args)
    layout = ParamLayout(model)
    store = TrajectoryStore(root)
    store.initialise(ExpertConfig(model=model_cfg, num_experts=1, train=TrainConfig(epochs=epochs),
                                  classifier_train=TrainConfig(epochs=epochs)), data,
                     layout)
    g = torch.Generator().manual_seed(seed)
    start = layout.flatten(model).detach().clone()
    steps = 0.01 * torch.randn(epochs, layout.total, generator=g)
    rows = torch.cat([start[None], start[None] + steps.cumsum(0)])
    store.save("representation", 0, Trajectory(rows, list(range(epochs + 1)), rows[-1]))
    return store


def make_engine(store, data, *, mode: str, steps: int, ipc: int, dsa: bool = False,
                device: torch.device = torch.device("cpu"), options: dict | None = None) -> TrajectoryMatching:
    ph = PhaseConfig(name="bench", store="representation", min_start_epoch=0, max_start_epoch=1, syn_steps=steps,
                     expert_epochs=2, match="all", inner_loss="soft_ce", student_update="all", batch_syn=None)
    cfg = DistillConfig(ipc=ipc, iterations=1_000_000, phases=[ph], gradient=mode, image_init="real",
                        soft_labels=True, label_init="onehot", label_store="representation", dsa=dsa,
                        lr_init=0.01, lr_img=1.0, lr_lr=1e-7, lr_y=1e-3, options=dict(options or {}))
    eng = TrajectoryMatching(cfg, data, experts_dir=store.root, device=device)
    eng.initialise()
    return eng


def model_config(width: int, depth: int, norm: str, norm_impl: str | None) -> ModelConfig:
    args = {"width": width, "depth": depth, "norm": norm}
    if norm_impl is not None:
        args["norm_impl"] = norm_impl
    return ModelConfig("convnet", args)


# ---- the reference: a plain training step of the same architecture from stock modules ---------------------------
def stock_convnet(num_classes: int, channels: int, im: int, width: int, depth: int, norm: str) -> nn.Module:
    layers: list[nn.Module] = []
    c, h = channels, im
    for _ in range(depth):
        layers.append(nn.Conv2d(c, width, 3, padding=1))
        if norm == "instancenorm":
            layers.append(nn.GroupNorm(width, width, affine=True))
        elif norm != "none":
            raise SystemExit(f"the stock reference supports norm instancenorm|none, not {norm}")
        layers += [nn.ReLU()]
        if h >= 2:
            layers.append(nn.AvgPool2d(2, 2))
            h //= 2
        c = width
    layers += [nn.Flatten(), nn.Linear(width * h * h, num_classes)]
    return nn.Sequential(*layers)


class PlainStep:
    def __init__(self, num_classes, channels, im, width, depth, norm, batch, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.model = stock_convnet(num_classes, channels, im, width, depth, norm).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.x = torch.randn(batch, channels, im, im, generator=g).to(device)
        self.y = torch.randint(0, num_classes, (batch,), generator=g).to(device)

    def __call__(self):
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()


# ---- timing -----------------------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _load() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=10, help="student steps N per iteration (default 10)")
    ap.add_argument("--batch", type=int, default=100,
                    help="synthetic images = plain-step batch (default 100 = IPC 10 x 10 classes)")
    ap.add_argument("--reps", type=int, default=5, help="measured rounds (default 5) after one warm-up round")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--norm", default="instancenorm", choices=["instancenorm", "none"])
    ap.add_argument("--norm-impl", default=None, help="ConvNet norm_impl (default: the library default)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated gradient modes")
    ap.add_argument("--dsa", action="store_true", help="DSA augmentation in the inner steps (off by default)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--stock-kernels", action="store_true",
                    help="engine option double_backward_kernels=False (PyTorch's own second derivatives)")
    ap.add_argument("--compare-stock", action="store_true",
                    help="also time every mode with double_backward_kernels=False, in the same rounds")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="skip ltdd.runtime.tune_cpu_malloc (glibc's default mmap/trim behaviour)")
    ap.add_argument("--out", default="benchmarks/results/step_cost.md", help="markdown report ('' to skip)")
    ap.add_argument("--append", action="store_true", help="append a section to --out instead of replacing it")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.batch % args.classes:
        raise SystemExit(f"--batch must be a multiple of --classes ({args.classes}) (IPC x classes)")
    ipc = args.batch // args.classes
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m} (known: {', '.join(MODES)})")
    torch.manual_seed(0)
    if not args.no_malloc_tuning:
        tune_cpu_malloc()  # what every ltdd command applies (process-wide)
    base_opts = {"double_backward_kernels": not args.stock_kernels}
    variants = [(m, m, base_opts) for m in modes]
    if args.compare_stock and not args.stock_kernels:
        variants += [(f"{m}, stock kernels", m, {**base_opts, "double_backward_kernels": False}) for m in modes]
    load_before = _load()

    data = make_data(args.classes, ipc)
    mcfg = model_config(args.width, args.depth, args.norm, args.norm_impl)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "experts", data, mcfg)
        engines = {name: make_engine(store, data, mode=mode, steps=args.steps, ipc=ipc, dsa=args.dsa, device=device,
                                     options=opts) for name, mode, opts in variants}
        plain = PlainStep(args.classes, 3, 32, args.width, args.depth, args.norm, args.batch, device)
        iteration = {name: 0 for name in engines}

        def plain_n():
            for _ in range(args.steps):
                plain()

        def engine_fn(name):
            def fn():
                engines[name].step(iteration[name])
                iteration[name] += 1
            return fn

        things = {"plain": plain_n, **{name: engine_fn(name) for name in engines}}
        times: dict[str, list[float]] = {k: [] for k in things}
        cpu: dict[str, list[float]] = {k: [] for k in things}
        for rep in range(args.reps + 1):
            for name, fn in things.items():
                c0 = time.process_time()
                t = timed(fn, device)
                c = time.process_time() - c0
                if rep > 0:  # round 0 is the warm-up
                    times[name].append(t / args.steps)
                    cpu[name].append(c / args.steps)
            if rep > 0:
                print(f"round {rep}: " + ", ".join(f"{k} {1e3 * v[-1]:.1f} ms/step" for k, v in times.items()),
                      flush=True)
    load_after = _load()

    names = list(engines)
    ratios = {k: [a / b for a, b in zip(times[k], times["plain"])] for k in names}
    cpu_ratios = {k: [a / b for a, b in zip(cpu[k], cpu["plain"])] for k in names}
    med = statistics.median
    norm_desc = args.norm if args.norm == "none" else f"{args.norm} (norm_impl {args.norm_impl or 'default'})"
    setup = (f"ConvNet-{args.depth}, width {args.width}, {norm_desc}, 32x32x3, {args.classes} classes, "
             f"batch {args.batch} (IPC {ipc}), N = {args.steps} student steps, DSA {'on' if args.dsa else 'off'}, "
             f"soft labels (soft CE), device {args.device}, engine options {base_opts}, {args.reps} rounds "
             f"(+1 warm-up); load average (1/5/15 min) {load_before} before, {load_after} after")
    lines = ["| measured | median wall time per student step | median ratio to the plain step (min-max) | "
             "median CPU-time ratio |", "|---|---:|---:|---:|",
             f"| plain SGD step (stock modules) | {1e3 * med(times['plain']):.1f} ms | 1 | 1 |"]
    for k in names:
        lines.append(f"| engine, {k} | {1e3 * med(times[k]):.1f} ms | **{med(ratios[k]):.2f}x** "
                     f"({min(ratios[k]):.2f}-{max(ratios[k]):.2f}) | {med(cpu_ratios[k]):.2f}x |")
    table = "\n".join(lines)
    print()
    print(setup)
    print(table)

    if args.out:
        cmd = "python benchmarks/step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
        raw = "\n".join(f"- {k}: " + ", ".join(f"{1e3 * v:.1f}" for v in vs) + " ms/step" for k, vs in times.items())
        section = (f"## `{cmd.strip()}`\n\nDate: {datetime.datetime.now().isoformat(timespec='minutes')}  \n"
                   f"Machine: {machine_line(device)}  \nSetup: {setup}\n\n{table}\n\nRaw wall times per round "
                   f"(per student step):\n\n{raw}\n")
        write_section(args.out, "Student-step cost of the trajectory-matching engine", section, args.append)
    return {"times": times, "cpu": cpu, "ratios": ratios}


if __name__ == "__main__":
    main()
