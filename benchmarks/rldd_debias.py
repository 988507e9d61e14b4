"""Does RLDD's expert debiasing act? Its teacher trained under several debias schedules and weight scalings, each
tested per class (the tail especially), on CIFAR-10-LT at the `cpu` profile.

    python benchmarks/rldd_debias.py                         # IF 100, ZCA (the fair table's data), 5 variants
    python benchmarks/rldd_debias.py --variants quadratic/sum,none/sum --if 10 --append

The paper's loss is ``alpha * sum_k(-w_k y_k log p_k) + (1 - alpha) * CE`` with ``alpha = (t / T)^2`` and weights
``w_k = r_k^-q / sum_j r_j^-q`` that sum to 1. Two things may keep it from acting: alpha is large only in the last
epochs, where the cosine learning rate is already small, and weights summing to 1 make the re-weighted term about
1/C of CE. The variants pull these apart (schedule / weight normalisation): ``quadratic/sum`` (the paper's, the
fair table's RLDD teacher), ``none/sum`` (plain CE: no debiasing), ``quadratic/mean`` (weights averaging 1),
``linear/mean`` (earlier) and ``constant/mean`` (class-balanced CE throughout). Every variant trains the same network
from the same seed on the same split (the teacher of the rldd preset at its cpu profile; --epochs to change), so the
differences are the loss alone. The share of the learning-rate mass that alpha weights, sum_t lr_t alpha_t /
sum_t lr_t, is printed beside each. Writes ``benchmarks/results/rldd_debias.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import finish, machine_line, section_heading  # noqa: E402  (benchmarks/common.py)

VARIANTS = "quadratic/sum,none/sum,quadratic/mean,linear/mean,constant/mean"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=VARIANTS, help="schedule/weight_norm pairs, comma-separated")
    ap.add_argument("--if", dest="imbalance", type=float, default=100.0)
    ap.add_argument("--zca", action=argparse.BooleanOptionalAction, default=True,
                    help="ZCA-whitened pixels (the fair table's common setting)")
    ap.add_argument("--epochs", type=int, default=None, help="teacher epochs [default: the cpu profile's]")
    ap.add_argument("--root", default=None, help="CIFAR-10 archive or folder [default: ${LTDD_DATA}/cifar10-jpeg.tar.gz]")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="further overrides of the preset (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--append", action="store_true", help="append a section to the results file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rldd_debias.md"))
    args = ap.parse_args(argv)

    import dataclasses

    import torch

    from ltdd.config import load_preset
    from ltdd.data import prepare_data
    from ltdd.debiased_experts import role_model, train_debiased_model
    from ltdd.evaluate import test_metrics
    from ltdd.models import create_model
    from ltdd.rldd_losses import alpha_schedule
    from ltdd.runtime import tune_cpu_malloc
    from ltdd.train import lr_at

    tune_cpu_malloc()
    torch.set_num_threads(args.threads)
    sets = [f"data.imbalance_factor={args.imbalance:g}", f"data.zca={'true' if args.zca else 'false'}"]
    if args.root:
        sets.append(f"data.root={args.root}")
    if args.epochs:
        sets.append(f"experts.train.epochs={args.epochs}")
    cfg = load_preset("rldd", "cpu", sets + args.sets)
    data = prepare_data(cfg.data)
    e = cfg.experts
    names = data.class_names
    T = e.train.epochs
    rows = []
    for v in [s.strip() for s in args.variants.split(",") if s.strip()]:
        schedule, norm = v.split("/")
        d = dataclasses.replace(e.debiased, schedule=schedule, weight_norm=norm)
        lr = [lr_at(e.train, t, e.train.lr) for t in range(T)]
        share = sum(l_ * alpha_schedule(t, T, schedule) for t, l_ in enumerate(lr)) / sum(lr)
        seed = e.seed * 100003 + 1  # the teacher's seed in an expert store
        torch.manual_seed(seed)
        mcfg = role_model(e, "teacher")
        model = create_model(mcfg.name, data.num_classes, data.channels, data.im_size, **mcfg.args)
        t0 = time.perf_counter()
        train_debiased_model(model, data.train_x, data.train_y, data.num_classes, data.train_counts, e.train, d,
                             seed=seed, desc=v)
        secs = time.perf_counter() - t0
        m = test_metrics(model.eval(), data)
        g = m.groups
        pc = " / ".join(f"{100 * a:.0f}" for a in m.per_class)
        grp = " | ".join("–" if g.get(k) is None else f"{100 * g[k]:.1f}" for k in ("head", "medium", "tail"))
        rows.append(f"| {v} | {share:.2f} | {100 * m.accuracy:.1f} | {grp} | {100 * m.class_std:.1f} | {pc} | "
                    f"{secs:.0f} |")
        print(rows[-1], flush=True)
    counts = ", ".join(str(int(c)) for c in data.train_counts)
    section = "\n".join([
        section_heading("rldd_debias.py", argv), "",
        f"Machine: {machine_line()}; {args.threads} torch thread(s).  ",
        f"Data: CIFAR-10-LT IF {args.imbalance:g} ({counts} training images per class, head to tail), "
        f"{'ZCA' if args.zca else 'no ZCA'}; balanced 10,000-image test set.  ",
        f"Teacher: the rldd preset's at the cpu profile: {mcfg.name} {mcfg.args}, {T} epochs, SGD lr {e.train.lr} "
        f"({e.train.schedule}), batch {e.train.batch_size}, q {e.debiased.q}, gamma_robust {e.debiased.gamma_robust}, "
        f"two {e.debiased.mix} views; the same seed for every variant.", "",
        "| schedule / weights | share of lr mass weighted by alpha | test acc % | head | medium | tail | class std | "
        f"per class % ({', '.join(names)}) | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""])
    return finish(args.out, "RLDD's expert debiasing: schedules and weight scaling", section, args.append)


if __name__ == "__main__":
    sys.exit(main())
