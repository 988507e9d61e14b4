"""MTT's matching loss against the student's step size at the distilled set's initialisation (and at the finished
set, when the table has distilled it): can the experts' trajectories be matched at all from the set's images, and
at which step size?

    python benchmarks/mtt_step_size.py                        # the two-stage table's paper-real MTT store
    python benchmarks/mtt_step_size.py --profile cpu --append

For each expert and start epoch t, the student starts at the expert's weights of epoch t, takes the phase's
student steps on the set's initial images with step size lr, and the normalised distance to the expert's weights
of epoch t + expert_epochs is reported (the matching loss: 1 = no closer than where it started; step size 0 gives
exactly 1). If every step size above 0 gives more than 1, the learned step size is driven to its floor and the
images, whose updates are proportional to it, stop changing. With a finished set, the same table is computed on its
images, and how far they moved from the initialisation is reported.

The expert store must exist: run the table first (``python benchmarks/reproduce.py --table two-stage --profile
paper-real``; its MTT experts are trained before the MTT set). Writes ``benchmarks/results/mtt_step_size.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common import finish, machine_line, section_heading  # noqa: E402  (benchmarks/common.py)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="paper-real", choices=("paper-real", "cpu"),
                    help="the two-stage table profile whose MTT store and configuration are probed")
    ap.add_argument("--root", default="../shared/data/cifar10-jpeg.tar.gz")
    ap.add_argument("--work", default=None, help="the table's work folder [default: runs/reproduce/two-stage-PROFILE]")
    ap.add_argument("--lrs", default="0.0001,0.0005,0.001,0.003,0.01", help="student step sizes, comma-separated")
    ap.add_argument("--starts", default="0,6,12,19", help="start epochs, comma-separated")
    ap.add_argument("--experts", type=int, default=2, help="how many of the store's experts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--append", action="store_true", help="append a section to the results file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mtt_step_size.md"))
    args = ap.parse_args(argv)
    try:
        lrs = [float(v) for v in args.lrs.split(",")]
        starts = [int(v) for v in args.starts.split(",")]
    except ValueError:
        print(f"mtt_step_size: --lrs and --starts take comma-separated numbers, got '{args.lrs}' and "
              f"'{args.starts}'", file=sys.stderr)
        return 2

    import torch

    from ltdd.data import prepare_data
    from ltdd.distill.engine import TrajectoryMatching
    from ltdd.errors import LtddError
    from ltdd.experiments import two_stage_table as tst
    from ltdd.experiments.cells import store_folder
    from ltdd.runtime import configure_process

    configure_process()  # as every ltdd command
    torch.set_num_threads(args.threads)
    grid = tst.TwoStageGrid(tst.TwoStageOptions(profile=args.profile, root=args.root, work=args.work,
                                                results=str(Path(args.out).parent)))
    store = store_folder(grid.table.work, grid.experts_cell)
    if not (store / "store.json").is_file():
        print(f"mtt_step_size: no MTT expert store in {store}: run the table first (python benchmarks/reproduce.py "
              f"--table two-stage --profile {args.profile})", file=sys.stderr)
        return 2
    cfg = grid.mtt_cfg.distill
    ph = cfg.phases[0]
    bad = [t for t in starts if not 0 <= t <= grid.mtt_cfg.experts.train.epochs - ph.expert_epochs]
    if bad:
        print(f"mtt_step_size: start epochs {bad} leave no {ph.expert_epochs}-epoch segment in experts of "
              f"{grid.mtt_cfg.experts.train.epochs} epochs", file=sys.stderr)
        return 2
    data = prepare_data(grid.dcfg)
    try:
        eng = TrajectoryMatching(cfg, data, experts_dir=store)
        eng.initialise()
        n_experts = min(args.experts, grid.mtt_cfg.experts.num_experts)
        load = os.getloadavg()
        init = eng.images.detach().clone()
        sets = [("initialisation", init)]
        final = grid.table.artifact(grid.mtt_cell)
        if (final / "distilled.safetensors").is_file():
            from ltdd.synset import SyntheticSet

            syn = SyntheticSet.load(final)
            if not torch.equal(syn.labels.long().cpu(), eng.labels.long().cpu()):
                raise LtddError(f"the set in {final} does not have its initialisation's labels")
            sets.append((f"finished set ({final.name})", syn.images.to(init.dtype)))
        tables, t0 = [], time.time()
        for name, images in sets:
            eng.images = images
            rows = []
            for e in range(n_experts):
                for t in starts:
                    losses = [eng.segment_loss(ph.name, e, t, lr) for lr in lrs]
                    rows.append((e, t, losses))
                    print(f"{name}: expert {e} start {t}: "
                          + "  ".join(f"{lr:g}: {v:.3f}" for lr, v in zip(lrs, losses)), flush=True)
            tables.append((name, images, rows))
    except LtddError as err:
        print(f"mtt_step_size: {err}", file=sys.stderr)
        return 2
    seconds = time.time() - t0

    L = [section_heading("mtt_step_size.py", argv),
         "",
         f"Machine: {machine_line(torch.device('cpu'))}; {args.threads} torch thread(s); load average before "
         f"{load[0]:.1f}; {seconds:.0f} s for {sum(len(r) for *_, r in tables) * len(lrs)} evaluations.  ",
         f"Set: the two-stage `{args.profile}` profile's MTT set at its initialisation ({cfg.image_init} images, "
         f"IPC {cfg.ipc}, hard labels); experts: {store.name} ({grid.mtt_cfg.experts.num_experts} x "
         f"{grid.mtt_cfg.experts.train.epochs} epochs, width "
         f"{grid.mtt_cfg.experts.model.args.get('width', 128)}); {ph.syn_steps} student steps, expert_epochs "
         f"{ph.expert_epochs}, DSA {'on' if cfg.dsa else 'off'}.",
         "",
         "Matching loss (1 = the student ends no closer to the expert's target than it started; step size 0 gives "
         "exactly 1)."]
    for name, images, rows in tables:
        L += ["", f"**{name}**" + ("" if images is init else
                                   f": the images moved from the initialisation by a mean |change| of "
                                   f"{float((images - init).abs().mean()):.3g} per pixel value (max "
                                   f"{float((images - init).abs().max()):.3g}); the initial images' mean |value| is "
                                   f"{float(init.abs().mean()):.3g}"),
              "", "| expert | start epoch | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
              "| --- " * (len(lrs) + 3) + "|"]
        for e, t, losses in rows:
            i = min(range(len(lrs)), key=losses.__getitem__)
            best = f"{lrs[i]:g} ({losses[i]:.3f})" if losses[i] < 1.0 else "none below 1"
            L.append(f"| {e} | {t} | " + " | ".join(f"{v:.3f}" for v in losses) + f" | {best} |")
        below = [(e, t) for e, t, losses in rows if min(losses) < 1.0]
        L += ["", f"Segments where some step size brings the student closer than not moving: {len(below)} of "
                  f"{len(rows)}" + (f" (start epochs {sorted({t for _, t in below})})" if below else "") + "."]
    return finish(args.out, "MTT's matching loss against the student's step size", "\n".join(L) + "\n", args.append)


if __name__ == "__main__":
    sys.exit(main())
