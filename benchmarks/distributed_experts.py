"""Expert training with 1 and 2 processes (torchrun, gloo on CPU / nccl on CUDA): wall time and speed-up.

    python benchmarks/distributed_experts.py [--experts 4] [--epochs 3] [--dataset digits|cifar10]

Each configuration fills a fresh store with the same experts through
``python -m torch.distributed.run --nproc_per_node=K -m ltdd experts ...``; the ranks take disjoint experts.
Writes benchmarks/results/distributed_experts.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ltdd.config import atomic_write_text


def run(k: int, store: Path, args) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={k}", "--master_port",
           str(29500 + k), "-m", "ltdd", "experts", "--preset", args.preset, "--out", str(store),
           "--num-experts", str(args.experts), "--set", f"experts.train.epochs={args.epochs}",
           "--set", f"experts.classifier_train.epochs={args.classifier_epochs}"]
    if args.profile:
        cmd += ["--profile", args.profile]
    for s in args.set:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // k)))
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.time() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"torchrun with {k} processes failed")
    return dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quickstart")
    p.add_argument("--profile", default=None)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--classifier-epochs", type=int, default=2)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/distributed_experts.md")
    args = p.parse_args(argv)
    times: dict[int, list[float]] = {1: [], 2: []}
    work = Path(tempfile.mkdtemp(prefix="ltdd-dist-"))
    try:
        for rep in range(args.reps):
            for k in (1, 2):  # alternate, so both see the same machine state
                store = work / f"k{k}-r{rep}"
                times[k].append(run(k, store, args))
                n = len(list((store / "representation").glob("*.safetensors")))
                assert n == args.experts, f"{n} experts written, expected {args.experts}"
                print(f"rep {rep}: {k} process(es): {times[k][-1]:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    speedup = med[1] / med[2]
    lines = ["# Expert training with torch.distributed: 1 vs 2 processes", "",
             f"Command: `python benchmarks/distributed_experts.py {' '.join(argv or sys.argv[1:])}`  ",
             f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, CUDA: {torch.cuda.is_available()}; "
             f"date {time.strftime('%Y-%m-%d')}.  ",
             f"Work: preset `{args.preset}`{' profile ' + args.profile if args.profile else ''}, {args.experts} "
             f"representation + classifier experts, {args.epochs} + {args.classifier_epochs} epochs; each process gets "
             f"cores/K threads.", "",
             "| processes | wall seconds (each repetition) | median |", "| --- | --- | --- |"]
    for k in (1, 2):
        lines.append(f"| {k} | {', '.join(f'{t:.1f}' for t in times[k])} | {med[k]:.1f} |")
    load = os.getloadavg()
    lines += ["", f"Speed-up with 2 processes: **{speedup:.2f}x** (includes process start-up and data loading in "
                  f"every rank).", "",
              f"Load average when the run ended: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min). On a "
              f"machine busy with other jobs, one process with 2 threads loses more to thread contention than two "
              f"1-thread processes, which inflates the speed-up; on an idle 2-core machine expect at most 2x."]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(json.dumps({"median_seconds": med, "speedup": speedup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
