"""Peak memory of one trajectory-matching iteration against the number of student steps N, in both gradient modes.

    python benchmarks/memory.py                          # CPU, ConvNet-3 width 128, 100 images, N = 10 20 40 80
    python benchmarks/memory.py --device cuda
    python benchmarks/memory.py --steps 10 20 --modes constant_memory

Every (mode, N) runs in a fresh subprocess (this script with ``--child``), which builds the engine (hand-made expert
store and random data as in ``step_cost.py``, no DSA, soft labels, every synthetic image in every step) and then
runs exactly one iteration (``TrajectoryMatching.step``):

- CPU: peak resident set size during the iteration minus the resident set size just before it. The peak is the
  kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` right before the iteration, so the
  set-up does not count); where that reset is not available, ``ru_maxrss`` is used instead (then a set-up peak above
  the iteration's would hide it; the report says which one was used). No warm-up iteration: with the engine's CPU
  malloc tuning freed memory stays mapped, so a second iteration would mostly reuse the first one's pages.
- CUDA: ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` before the iteration.

Exact mode stores every step's graph, so its memory grows linearly with N; before a configuration is started its
need is extrapolated linearly from the two previous N of the same mode, and it is skipped (and reported as such)
when that exceeds ``--max-fraction`` of the memory available now (``MemAvailable``), so that the benchmark never
pushes a shared machine into swapping or the OOM killer. Results go to ``benchmarks/results/memory.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_model, write_section  # noqa: E402  (benchmarks/common.py)

MODES = ("exact", "constant_memory")


# ---- child: one configuration --------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child(args) -> None:
    import resource
    import tempfile

    import torch

    from step_cost import make_data, make_engine, make_store, model_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ipc = args.batch // args.classes
    data = make_data(args.classes, ipc)
    if not args.no_malloc_tuning:
        from ltdd.runtime import tune_cpu_malloc

        tune_cpu_malloc()  # what every ltdd command applies (process-wide)
    opts = {"double_backward_kernels": not args.stock_kernels}
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "experts", data, model_config(args.width, args.depth, "instancenorm", None))
        eng = make_engine(store, data, mode=args.mode, steps=args.n, ipc=ipc, device=device, options=opts)
        eng._trajectory("representation", 0)  # load the expert before measuring
        result = {"mode": args.mode, "n": args.n, "torch": torch.__version__, "threads": torch.get_num_threads()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            eng.step(0)
            torch.cuda.synchronize(device)
            result.update(seconds=time.perf_counter() - t0, method="torch.cuda.max_memory_allocated",
                          peak_mib=(torch.cuda.max_memory_allocated(device) - base) / 2**20,
                          device_name=torch.cuda.get_device_name(device))
        else:
            base_kib = _status_kib("VmRSS")
            reset = base_kib is not None and _reset_hwm() and (_status_kib("VmHWM") or 0) <= base_kib + 1024
            ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t0 = time.perf_counter()
            eng.step(0)
            seconds = time.perf_counter() - t0
            if reset:
                peak_kib, method = _status_kib("VmHWM"), "VmHWM (reset before the iteration) - VmRSS before"
            else:
                peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
                base_kib = ru_before if base_kib is None else base_kib
                method = "ru_maxrss after - VmRSS before (ru_maxrss before: %d KiB)" % ru_before
            result.update(seconds=seconds, method=method, peak_mib=(peak_kib - base_kib) / 1024,
                          base_mib=base_kib / 1024)
    print("RESULT " + json.dumps(result), flush=True)


# ---- parent: one subprocess per configuration ------------------------------------------------------------------------
def _mem_available_mib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80], help="values of N (default 10 20 40 80)")
    ap.add_argument("--batch", type=int, default=100, help="synthetic images (default 100 = IPC 10 x 10 classes)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated gradient modes")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children")
    ap.add_argument("--stock-kernels", action="store_true", help="engine option double_backward_kernels=False")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="skip ltdd.runtime.tune_cpu_malloc")
    ap.add_argument("--max-fraction", type=float, default=0.5,
                    help="skip a configuration whose extrapolated need exceeds this fraction of MemAvailable")
    ap.add_argument("--out", default="benchmarks/results/memory.md", help="markdown report ('' to skip)")
    ap.add_argument("--append", action="store_true", help="append a section to --out instead of replacing it")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="exact", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=10, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.batch % args.classes:
        raise SystemExit(f"--batch must be a multiple of --classes ({args.classes})")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m} (known: {', '.join(MODES)})")
    steps = sorted(set(args.steps))
    passthrough = ["--device", args.device, "--batch", str(args.batch), "--classes", str(args.classes),
                   "--width", str(args.width), "--depth", str(args.depth)]
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    if args.stock_kernels:
        passthrough.append("--stock-kernels")
    if args.no_malloc_tuning:
        passthrough.append("--no-malloc-tuning")

    results: dict[tuple[str, int], dict] = {}
    for mode in modes:
        done: list[tuple[int, float]] = []
        for n in steps:
            avail = _mem_available_mib() if args.device == "cpu" else None
            if avail is not None and len(done) >= 2:
                (n1, m1), (n2, m2) = done[-2], done[-1]
                need = m2 + (m2 - m1) / (n2 - n1) * (n - n2)
                if need > args.max_fraction * avail:
                    results[(mode, n)] = {"skipped": f"extrapolated {need / 1024:.1f} GiB > {args.max_fraction:g} x "
                                                     f"{avail / 1024:.1f} GiB available"}
                    print(f"{mode:16s} N={n:3d}  skipped: {results[(mode, n)]['skipped']}", flush=True)
                    continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode, "--n", str(n)]
            proc = subprocess.run(cmd + passthrough, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                results[(mode, n)] = {"skipped": f"child failed (rc {proc.returncode}): {' | '.join(tail)}"}
                print(f"{mode:16s} N={n:3d}  FAILED: {results[(mode, n)]['skipped']}", flush=True)
                continue
            res = json.loads(line[-1][len("RESULT "):])
            results[(mode, n)] = res
            done.append((n, res["peak_mib"]))
            print(f"{mode:16s} N={n:3d}  peak {res['peak_mib']:9.1f} MiB  ({res['seconds']:.1f} s)", flush=True)

    any_res = next((r for r in results.values() if "peak_mib" in r), {})
    lines = ["| mode | " + " | ".join(f"N = {n}" for n in steps) + " | N = %d / N = %d |" % (steps[-1], steps[0]),
             "|---|" + "---:|" * (len(steps) + 1)]
    for mode in modes:
        cells = []
        for n in steps:
            r = results.get((mode, n), {})
            cells.append(f"{r['peak_mib']:.0f} MiB" if "peak_mib" in r else "skipped")
        first, last = results.get((mode, steps[0]), {}), results.get((mode, steps[-1]), {})
        ratio = (f"{last['peak_mib'] / first['peak_mib']:.2f}x" if "peak_mib" in first and "peak_mib" in last
                 and first["peak_mib"] > 0 else "n/a")
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {ratio} |")
    table = "\n".join(lines)
    notes = [f"- {mode}, N = {n}: {r['skipped']}" for (mode, n), r in results.items() if "skipped" in r]
    secs = [f"{mode} N={n}: {r['seconds']:.0f} s" for (mode, n), r in results.items() if "seconds" in r]
    dev = any_res.get("device_name") or cpu_model()
    setup = (f"ConvNet-{args.depth}, width {args.width}, instance norm, 32x32x3, {args.classes} classes, "
             f"{args.batch} synthetic images (IPC {args.batch // args.classes}), every image in every student step, "
             f"no DSA, soft labels; engine options: double_backward_kernels={not args.stock_kernels}, "
             f"malloc tuning={not args.no_malloc_tuning}; measured: {any_res.get('method', 'n/a')}")
    print()
    print(setup)
    print(table)
    for note in notes:
        print(note)
    if args.out:
        cmd = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
        section = (f"## `{cmd.strip()}`\n\nDate: {datetime.datetime.now().isoformat(timespec='minutes')}  \n"
                   f"Machine: {dev}; nproc {os.cpu_count()}, torch threads {any_res.get('threads', 'n/a')}, "
                   f"torch {any_res.get('torch', 'n/a')}, Python {platform.python_version()}, "
                   f"{platform.system()} {platform.release()}  \nSetup: {setup}\n\nPeak memory of one iteration "
                   f"above the memory in use before it (each configuration in a fresh process):\n\n{table}\n"
                   + ("\n" + "\n".join(notes) + "\n" if notes else "")
                   + f"\nIteration times (one iteration, not a timing benchmark): {', '.join(secs)}\n")
        write_section(args.out, "Peak memory of one trajectory-matching iteration", section, args.append)


if __name__ == "__main__":
    main()
