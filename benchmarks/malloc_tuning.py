"""What the CLI's process-wide CPU malloc tuning buys plain training and prediction (not only the distillation engine).

    python benchmarks/malloc_tuning.py                 # 5 alternated rounds, 1 torch thread per process
    python benchmarks/malloc_tuning.py --rounds 3 --threads 2 --append

Work (the two-stage paper's real-data rows): ConvNet-3 width 128, instance norm, 2,478 images of 3x32x32 (the size of
CIFAR-10-LT with n_max 1000 and IF 100; random pixels, since the cost does not depend on the content), one training
epoch (batch 256, SGD with momentum, DSA on) and one prediction pass over 10,000 images. Each measurement runs in a
fresh subprocess (the tuning is process-wide and cannot be undone), with the tuning on (``ltdd.runtime.
tune_cpu_malloc``, what every ``ltdd`` command applies) and off, alternated round by round so that machine noise
hits both alike; the ratio is off / on per round, and the report gives medians. Writes
``benchmarks/results/malloc_tuning.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import finish, machine_line, section_heading  # noqa: E402  (benchmarks/common.py)


def child(tuned: bool, threads: int) -> dict:
    import torch

    from ltdd.config import TrainConfig
    from ltdd.models import create_model
    from ltdd.runtime import tune_cpu_malloc
    from ltdd.train import predict, train_model

    applied = tune_cpu_malloc() if tuned else False
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2478, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (2478,), generator=g)
    xt = torch.randn(10000, 3, 32, 32, generator=g)
    torch.manual_seed(0)
    model = create_model("convnet", 10, 3, (32, 32), width=128)
    cfg = TrainConfig(epochs=1, lr=0.01, momentum=0.9, batch_size=256, schedule="constant", dsa=True)
    train_model(model, x[:256], y[:256], cfg)  # warm-up: first-touch costs of the allocator and the kernels
    t0 = time.perf_counter()
    train_model(model, x, y, cfg)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict(model, xt)
    t_pred = time.perf_counter() - t0
    return {"tuned": applied, "train_epoch_s": t_train, "predict_s": t_pred}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--append", action="store_true", help="append a section to the results file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "malloc_tuning.md"))
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child == "on", args.threads)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res: dict[str, list[dict]] = {"on": [], "off": []}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--threads", str(args.threads)],
                                 capture_output=True, text=True, env=env, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            res[mode].append(rec)
            print(f"round {r} {mode:3s}: train epoch {rec['train_epoch_s']:.2f} s, predict {rec['predict_s']:.2f} s",
                  flush=True)
    load_after = os.getloadavg()
    if not all(rec["tuned"] for rec in res["on"]):
        print("note: the tuning could not be applied on this platform (not glibc); both columns are untuned")
    med = {m: {k: statistics.median(rec[k] for rec in res[m]) for k in ("train_epoch_s", "predict_s")} for m in res}
    ratio = {k: statistics.median(off[k] / on[k] for on, off in zip(res["on"], res["off"]))
             for k in ("train_epoch_s", "predict_s")}
    section = "\n".join([
        section_heading("malloc_tuning.py", argv), "",
        f"Machine: {machine_line()}; load average before {load_before[0]:.1f}/{load_before[1]:.1f}, after "
        f"{load_after[0]:.1f}/{load_after[1]:.1f}; {args.threads} torch thread(s) per process, {args.rounds} "
        "alternated rounds, a fresh process per measurement.", "",
        "| work | tuning on (median s) | tuning off (median s) | off / on (median of per-round ratios) |",
        "| --- | --- | --- | --- |",
        f"| one training epoch, ConvNet-3 w128, 2,478 images, DSA | {med['on']['train_epoch_s']:.2f} | "
        f"{med['off']['train_epoch_s']:.2f} | {ratio['train_epoch_s']:.2f}x |",
        f"| prediction, 10,000 images | {med['on']['predict_s']:.2f} | {med['off']['predict_s']:.2f} | "
        f"{ratio['predict_s']:.2f}x |", ""])
    return finish(args.out, "CPU malloc tuning: plain training and prediction", section, args.append)


if __name__ == "__main__":
    sys.exit(main())
