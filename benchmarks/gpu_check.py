"""One short GPU check: every method's CUDA path end to end at a tiny scale, the engine's step cost and memory on
CUDA, and the CIFAR-10-LT IF 100 IPC 10 LAD cell at the largest scale the remaining time allows.

    bash benchmarks/gpu_check.sh                       # on a machine with a GPU; about 10 minutes
    python benchmarks/gpu_check.py --device cpu --tiny # the same plumbing on CPU, in a few minutes (no results file)

Every step runs the installed ``ltdd`` command (or a benchmark script) in a subprocess with a time limit, so one
failure is recorded and the rest still runs. Results: ``benchmarks/results/gpu_check.md`` (each step: command,
exit code, seconds, test accuracy where there is one, the last lines of its output on failure).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import machine_line, write_section  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["random", "herding", "kcenter", "dc", "dsa", "dm", "mtt", "datm", "lad"]
TRAJECTORY = {"mtt", "datm", "lad"}


def run(cmd: list[str], limit: float, env: dict) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, limit), env=env, cwd=ROOT)
        rc, out = p.returncode, (p.stdout + p.stderr)
    except subprocess.TimeoutExpired as e:
        rc, out = 124, ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
    return {"cmd": " ".join(shlex.quote(c) for c in cmd), "rc": rc, "seconds": time.time() - t0,
            "tail": "\n".join(out.strip().splitlines()[-6:])}


def accuracy(run_dir: Path) -> float | None:
    f = run_dir / "eval.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text())["summary"]["accuracy"]["mean"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=560.0, help="seconds for the whole check (default 560)")
    ap.add_argument("--tiny", action="store_true", help="smallest settings everywhere (a plumbing check on CPU)")
    ap.add_argument("--work", default="runs/gpu_check")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.md", help="results file ('' to skip)")
    args = ap.parse_args(argv)
    t_start = time.time()
    left = lambda: args.budget - (time.time() - t_start)  # noqa: E731
    env = {**os.environ, "LTDD_DATA": os.environ.get("LTDD_DATA", str((ROOT.parent / "shared" / "data").resolve()))}
    work = (ROOT / args.work).resolve()
    ltdd = [sys.executable, "-m", "ltdd"]
    dev = ["--device", args.device]
    tiny = args.tiny
    steps: list[dict] = []

    # 1. experts for the trajectory methods: 4 representation experts x 3 epochs, classifier experts x 2 epochs
    experts = work / "experts"
    e_over = ["--set", "experts.num_experts=2" if tiny else "experts.num_experts=4",
              "--set", "experts.train.epochs=3", "--set", "experts.classifier_train.epochs=2"]
    step_limit = 600 if tiny else 90  # tiny runs on CPU: slow, but only the plumbing is checked
    steps.append({"step": "experts (lad preset, cpu profile, tiny)",
                  **run(ltdd + ["experts", "--preset", "lad", "--profile", "cpu", "--out", str(experts)] + e_over + dev,
                        min(150 if not tiny else 600, left()), env)})

    # 2. every method end to end: 20 iterations (5 tiny), a 50-epoch evaluation (5 tiny), one run
    its, ev = (5, 5) if tiny else (20, 50)
    for m in METHODS:
        out = work / m
        over = ["--set", f"protocol_overrides.train.epochs={ev}", "--set", "protocol_overrides.runs=1"]
        if m not in ("random", "herding", "kcenter"):
            over += ["--set", f"distill.iterations={its}"]
        if m in TRAJECTORY:  # start at epoch 0 (the tiny experts have 3 epochs); no sequential generation
            over += ["--experts", str(experts), "--set", "distill.phases.0.max_start_epoch=1",
                     "--set", "distill.phases.0.expansion_end_iteration=0"]
        r = run(ltdd + ["distill", "--preset", m, "--profile", "cpu", "--out", str(out)] + over + dev,
                min(step_limit, left()), env)
        steps.append({"step": f"{m}: {its} iterations, {ev}-epoch evaluation", **r, "accuracy": accuracy(out)})

    # 2b. RLDD: debiased observer + teacher, recovery and relabelling, then the teacher label mode (relabel protocol)
    rexp, rset = work / "rldd-experts", work / "rldd"
    r = run(ltdd + ["experts", "--preset", "rldd", "--profile", "cpu", "--out", str(rexp),
                    "--set", "experts.train.epochs=2"] + dev, min(step_limit, left()), env)
    steps.append({"step": "rldd: observer + teacher, 2 epochs each", **r})
    r = run(ltdd + ["distill", "--preset", "rldd", "--profile", "cpu", "--experts", str(rexp), "--out", str(rset),
                    "--set", f"distill.iterations={its}", "--set", f"protocol_overrides.train.epochs={ev}",
                    "--set", "protocol_overrides.runs=1"] + dev, min(step_limit, left()), env)
    steps.append({"step": f"rldd: {its} iterations, {ev}-epoch relabel evaluation", **r, "accuracy": accuracy(rset)})
    r = run(ltdd + ["eval", str(rset), "--labels", "teacher", "--teacher", str(rexp / "teacher.safetensors"),
                    "--protocol", "relabel_cpu", "--set", f"train.epochs={ev}", "--runs", "1",
                    "--out", str(work / "rldd-teacher")] + dev, min(step_limit, left()), env)
    steps.append({"step": f"label mode teacher (relabel_cpu, {ev} epochs)", **r,
                  "accuracy": accuracy(work / "rldd-teacher")})

    # 3. the engine's step cost and memory on this device
    if not tiny and left() > 120:
        steps.append({"step": "step cost (exact and constant-memory vs a plain SGD step)",
                      **run([sys.executable, "benchmarks/step_cost.py", "--device", args.device, "--reps", "3",
                             "--out", "benchmarks/results/step_cost.md", "--append"], min(120, left()), env)})
    if not tiny and left() > 120:
        steps.append({"step": "peak memory, N = 10..80",
                      **run([sys.executable, "benchmarks/memory.py", "--device", args.device,
                             "--out", "benchmarks/results/memory.md", "--append"], min(120, left()), env)})

    # 4. the IF 100 IPC 10 LAD cell at the largest scale that fits what is left (width 128, the released preset)
    if left() > 60:
        budget = left() - 20
        big = work / "lad-if100"
        n_exp, ep = (2, 3) if tiny else (8, 22)
        iters = 5 if tiny else (300 if budget > 300 else 100)
        prof = ["--profile", "cpu"] if tiny else []  # tiny (a CPU plumbing check): width 32
        r1 = run(ltdd + ["experts", "--preset", "lad-cifar10-if100-ipc10", "--out", str(big / "experts")] + prof + [
                         "--set", f"experts.num_experts={n_exp}", "--set", f"experts.train.epochs={ep}",
                         "--set", "experts.classifier_train.epochs=2"] + dev, budget * 0.45, env)
        steps.append({"step": f"LAD IF 100 IPC 10, width 128: {n_exp} experts x {ep} epochs", **r1})
        window = ["--set", "distill.phases.0.max_start_epoch=1"] if tiny else []  # tiny: 3-epoch experts
        r2 = run(ltdd + ["distill", "--preset", "lad-cifar10-if100-ipc10", "--experts", str(big / "experts"),
                         "--out", str(big / "set"), "--set", f"distill.iterations={iters}"] + prof + window + [
                         "--set", "protocol=lad", "--set", "protocol_overrides.train.epochs=300" if not tiny else
                         "protocol_overrides.train.epochs=5", "--set", "protocol_overrides.runs=2"] + dev,
                 max(10.0, left() - 10), env)
        steps.append({"step": f"LAD IF 100 IPC 10: {iters} iterations (released settings), 300-epoch evaluation x 2",
                      **r2, "accuracy": accuracy(big / "set")})

    lines = [f"`python benchmarks/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
             f"({time.strftime('%Y-%m-%d %H:%M')}, {time.time() - t_start:.0f} s in all)", "",
             f"Machine: {machine_line(args.device if args.device != 'cuda' else 'cuda')}", "",
             "| step | exit | seconds | test accuracy |", "| --- | --- | --- | --- |"]
    for s in steps:
        acc = f"{100 * s['accuracy']:.1f}" if s.get("accuracy") is not None else ""
        lines.append(f"| {s['step']} | {s['rc']} | {s['seconds']:.0f} | {acc} |")
    failed = [s for s in steps if s["rc"] != 0]
    for s in failed:
        lines += ["", f"Failed: {s['step']} (exit {s['rc']})", "", "```", s["cmd"], s["tail"], "```"]
    lines.append("")
    section = "\n".join(lines)
    print(section)
    if args.out and not tiny:
        write_section(args.out, "GPU check", section, append=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
