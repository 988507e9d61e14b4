"""What the two-stage table's paper-real profile costs per unit on this CPU, measured with the profile's own
configurations: one epoch of a width-128 network on the 2,478 real images (and on a 100-image distilled set), one
GM (DC) iteration at the paper's settings, one MTT expert epoch (DSA) and one MTT iteration.

    python benchmarks/two_stage_costs.py                    # 1 torch thread
    python benchmarks/two_stage_costs.py --threads 2 --append

The table's size (``PAPER_REAL_*`` in ``ltdd.experiments.two_stage_table``) is computed from these figures
(``EPOCH_S``, ``EXPERT_EPOCH_S``, ``TEST_LOGITS_S``, ``GM_ITERATION_S``, ``MTT_ITERATION_S``); the script prints
its measurements beside the values the code holds when it runs.
Units are timed after a warm-up unit and reported as medians. Writes ``benchmarks/results/two_stage_costs.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import finish, machine_line, section_heading  # noqa: E402  (benchmarks/common.py)


def _per_iteration(log_path: Path, skip: int = 1) -> list[float]:
    import json

    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return [r["seconds"] for r in recs if "seconds" in r][skip:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3, help="real-image epochs timed (after one warm-up epoch)")
    ap.add_argument("--gm-iterations", type=int, default=2, help="GM iterations timed (after one warm-up)")
    ap.add_argument("--mtt-iterations", type=int, default=5, help="MTT iterations timed (after one warm-up)")
    ap.add_argument("--append", action="store_true", help="append a section to the results file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "two_stage_costs.md"))
    args = ap.parse_args(argv)

    import torch

    from ltdd.data import prepare_data
    from ltdd.experiments import two_stage_table as tst
    from ltdd.experiments.kinds import ensure_distilled
    from ltdd.experts import train_experts
    from ltdd.runtime import configure_process
    from ltdd.train import train_model

    tuned = configure_process()["malloc_tuning"]  # as every ltdd command
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        grid = tst.TwoStageGrid(tst.TwoStageOptions(profile="paper-real", root=args.root, work=tmp, results=tmp))
        data = grid.nets.data = prepare_data(grid.dcfg)
        nets = grid.nets
        assert len(data.train_y) == tst.NUM_TRAIN

        def epochs_of(x, y, n: int, train_cfg=grid.train_cfg) -> list[float]:
            model = nets._new(tst.NUM_CLASSES, 0)
            cfg = dataclasses.replace(train_cfg, epochs=1)
            out = []
            for _ in range(n + 1):  # the first is the warm-up
                t0 = time.perf_counter()
                train_model(model, x, y, cfg, num_classes=tst.NUM_CLASSES, seed=0)
                out.append(time.perf_counter() - t0)
            return out[1:]

        real = epochs_of(data.train_x, data.train_y, args.epochs)
        print(f"real epoch (2,478 images): {[round(t, 2) for t in real]}", flush=True)
        idx = torch.cat([torch.nonzero(data.train_y == c).flatten()[:10] for c in range(tst.NUM_CLASSES)])
        syn = epochs_of(data.train_x[idx], data.train_y[idx], 10)
        print(f"distilled-set epoch (100 images): {[round(t, 4) for t in syn]}", flush=True)

        from ltdd.train import predict

        t0 = time.perf_counter()
        predict(nets._new(tst.NUM_CLASSES, 0), data.test_x)
        test_s = time.perf_counter() - t0
        print(f"test pass (10k images): {test_s:.1f} s", flush=True)

        dc = grid.dc_cfg
        dc.distill.iterations = args.gm_iterations + 1
        dc.distill.checkpoint_every = 1000
        ensure_distilled(dc, data, Path(tmp) / "gm", device=torch.device("cpu"))
        gm = _per_iteration(Path(tmp) / "gm" / "log.jsonl")
        print(f"GM iteration: {[round(t, 1) for t in gm]}", flush=True)

        mtt = grid.mtt_cfg
        ex = mtt.experts
        ex.num_experts, ex.train.epochs = 1, 3
        for ph in mtt.distill.phases:
            ph.min_start_epoch, ph.max_start_epoch = 0, 1
        # an expert's epoch: its own training configuration (DSA, no momentum) on the real images
        expert_epochs = epochs_of(data.train_x, data.train_y, args.epochs, ex.train)
        print(f"MTT expert epoch (DSA): {[round(t, 2) for t in expert_epochs]}", flush=True)
        train_experts(ex, data, Path(tmp) / "experts", device=torch.device("cpu"), progress=False)
        mtt.distill.iterations = args.mtt_iterations + 1
        mtt.distill.checkpoint_every = 1000
        ensure_distilled(mtt, data, Path(tmp) / "mtt", experts_dir=Path(tmp) / "experts", device=torch.device("cpu"))
        mi = _per_iteration(Path(tmp) / "mtt" / "log.jsonl")
        print(f"MTT iteration: {[round(t, 1) for t in mi]}", flush=True)
    load_after = os.getloadavg()

    med = statistics.median
    d = grid.dc_cfg.distill.options
    rows = [
        ("epoch, 2,478 real images (batch 256, no augmentation)", med(real), tst.EPOCH_S, "EPOCH_S", len(real)),
        ("epoch, 100 distilled images", med(syn), tst.EPOCH_S * 100 / tst.NUM_TRAIN, "EPOCH_S x 100 / 2,478",
         len(syn)),
        ("test pass, 10,000 images", test_s, tst.TEST_LOGITS_S, "TEST_LOGITS_S", 1),
        (f"GM iteration (outer {d['outer_loop']}, inner {d['inner_loop']}, {d['batch_real']} real per class)", med(gm),
         tst.GM_ITERATION_S, "GM_ITERATION_S", len(gm)),
        ("MTT expert epoch (DSA, no momentum)", med(expert_epochs), tst.EXPERT_EPOCH_S, "EXPERT_EPOCH_S",
         len(expert_epochs)),
        (f"MTT iteration ({mtt.distill.phases[0].syn_steps} student steps on 100 images)", med(mi),
         tst.MTT_ITERATION_S, "MTT_ITERATION_S", len(mi)),
    ]
    table = [f"| {name} | {got:.2f} | {n} | {held:.2f} ({what}) | {held / got:.2f}x |"
             for name, got, held, what, n in rows]
    section = "\n".join([
        section_heading("two_stage_costs.py", argv), "",
        f"Machine: {machine_line()}; {args.threads} torch thread(s); malloc tuning "
        f"{'on' if tuned else 'unavailable'}; load average before {load_before[0]:.1f}, after {load_after[0]:.1f}.  ",
        "Work: the paper-real profile's own configurations (ConvNet-3 width 128, raw [0, 1] pixels, CIFAR-10-LT "
        "n_max 1000, IF 100); medians after one warm-up unit (the test pass: one pass, no warm-up).", "",
        "| unit | measured s | units timed | the code's estimate | estimate / measured |",
        "| --- | --- | --- | --- | --- |", *table, ""])
    return finish(args.out, "Two-stage paper-real: unit costs on CPU", section, args.append)


if __name__ == "__main__":
    sys.exit(main())
