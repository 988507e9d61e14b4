"""The ``ltdd reproduce`` command: plan, compute, report or adopt the cells of one of the papers' tables."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import LtddError
from .lad_table import DEFAULT_ROOT

__all__ = ["reproduce_cmd", "TABLES", "main"]

TABLES = ("lad-cifar10lt", "two-stage", "accuracy-vs-compute", "fair-cifar10lt")
LAD_ONLY = ("ifs", "ipcs", "methods", "variant", "full_epochs")
TWO_STAGE_ONLY = ("width", "real_epochs", "syn_epochs", "gm_iterations", "mtt_iterations", "mtt_experts",
                  "expert_epochs", "mtt_lr_lr", "M", "raw_pixels", "groups")
COMPUTE_ONLY = ("points",)


def _flag(name: str) -> str:
    if name == "raw_pixels":
        return "--raw-pixels/--standardised-pixels"
    return "--" + name.replace("_", "-") if name != "M" else "--M"


@click.command("reproduce")
@click.argument("table", metavar="TABLE")
@click.option("--profile", type=click.Choice(["cpu", "gpu", "paper-real"]), default="cpu", show_default=True,
              help="cpu: a scale for a few CPU cores; gpu: the papers' scale; paper-real (two-stage only): every "
                   "network at the paper's scale, GM and MTT distillation reduced to fit about 4 hours on 2 CPU "
                   "cores, one run per row")
@click.option("--plan", is_flag=True,
              help="list every cell with its key, what it runs and its state (done / running / partial / stale / "
                   "to do); compute nothing")
@click.option("--report-only", "report_only", is_flag=True,
              help="rewrite the report from the finished cells; compute nothing")
@click.option("--work", default=None, help="folder of the heavy artifacts (expert stores, distilled sets, networks) "
                                           "and locks [default: runs/reproduce/TABLE-PROFILE]")
@click.option("--results", default="results", show_default=True,
              help="report folder; the cell records go to RESULTS/cells/TABLE-PROFILE")
@click.option("--root", default=DEFAULT_ROOT, show_default=True,
              help="CIFAR-10 archive or folder (LTDD_DATA: the folder that holds the datasets)")
@click.option("--runs", type=int, default=3, show_default=True,
              help="evaluation runs per cell (gpu: at least 5; two-stage paper-real: 1 unless given)")
@click.option("--device", default=None, help="cpu | cuda | cuda:N [default: CUDA when present]")
@click.option("--threads", type=int, default=None,
              help="torch CPU threads [default: torch's own; two-stage on CPU: 1, paper-real: 2]")
@click.option("--adopt-legacy", "adopt", default=None, metavar="PATH",
              help="one-time import of cells computed before cells were keyed: a folder of name-keyed cell JSONs "
                   "(e.g. runs/reproduce/lad-cifar10lt-cpu/cells) or an old results JSON; every cell the grid "
                   "names is recorded under its current key, which asserts that the configuration has not "
                   "changed since (lad-cifar10lt only; with --plan or --report-only, those follow)")
@click.option("--ifs", default=None, help="lad-cifar10lt, fair-cifar10lt: imbalance factors, comma-separated "
                                         "[default: 10,100]")
@click.option("--ipcs", default=None, help="lad-cifar10lt: images per class [default: 10 cpu, 10,50 gpu]")
@click.option("--methods", default=None,
              help="lad-cifar10lt: comma-separated presets and full-data rows (erm, crt, balanced_softmax); "
                   "NAME-init evaluates a method's initial set, NAME@N runs N iterations "
                   "[default: random,dc,dm,mtt,datm,lad,erm,crt]")
@click.option("--variant", multiple=True, metavar="NAME=PRESET:key=value,...",
              help="lad-cifar10lt: a named variant of a preset, usable in --methods (repeatable); e.g. "
                   "lad-ce=lad:distill.phases.0.inner_loss=soft_ce")
@click.option("--full-epochs", "full_epochs", type=int, default=None,
              help="lad-cifar10lt: epochs of the full-data rows [default: 30 cpu, 200 gpu]")
@click.option("--width", type=int, default=None,
              help="two-stage: ConvNet width of every classifier [default: 32 cpu, 128 gpu and paper-real]")
@click.option("--real-epochs", "real_epochs", type=int, default=None,
              help="two-stage: epochs of a network trained on real images [default: 20 cpu, 300 gpu and paper-real]")
@click.option("--syn-epochs", "syn_epochs", type=int, default=None,
              help="two-stage: epochs of a network trained on distilled images [default: 200 cpu, 300 gpu and "
                   "paper-real]")
@click.option("--gm-iterations", "gm_iterations", type=int, default=None,
              help="two-stage: GM (DC) iterations [default: 20 cpu, 5 paper-real, 1000 gpu]")
@click.option("--mtt-iterations", "mtt_iterations", type=int, default=None,
              help="two-stage: MTT iterations [default: 60 cpu, 30 paper-real, the mtt preset's gpu]")
@click.option("--mtt-experts", "mtt_experts", type=int, default=None,
              help="two-stage: MTT experts [default: 3 cpu, 1 paper-real, the mtt preset's gpu]")
@click.option("--expert-epochs", "expert_epochs", type=int, default=None,
              help="two-stage: epochs per MTT expert [default: 12 cpu, 21 paper-real, the mtt preset's gpu]")
@click.option("--mtt-lr-lr", "mtt_lr_lr", type=float, default=None,
              help="two-stage: MTT step-size learning rate [default: 1e-7 cpu and paper-real (the preset's 1e-5 "
                   "drives the learned step size to its floor on un-whitened pixels), the preset's gpu]")
@click.option("--M", "M", type=int, default=None, help="two-stage: k-means centres per class for the grouping "
                                                       "[default: 5]")
@click.option("--raw-pixels/--standardised-pixels", "raw_pixels", default=None,
              help="two-stage: raw [0, 1] pixels, as the paper, or per-channel standardisation [default: raw for "
                   "paper-real, standardised for cpu and gpu]")
@click.option("--groups", "groups", default=None, metavar="SPLIT",
              help="two-stage: a fixed two-way split whose two-stage rows are computed beside the max-cut split's, "
                   "e.g. '0,1,8,9;2,3,4,5,6,7' (class indices or names, groups separated by ';'); 'none': the "
                   "max-cut split only [default: the vehicles/animals split for paper-real, none for cpu and gpu]")
@click.option("--points", default=None, metavar="NAMES",
              help="accuracy-vs-compute: compute only these points (comma-separated names as --plan lists them, "
                   "e.g. mtt-l,lad-l), in the order given, with the expert stores they read; the report still "
                   "shows every finished point [default: every point, cheapest first]")
def reproduce_cmd(table: str, profile: str, plan: bool, report_only: bool, work, results, root, runs, device,
                  threads, adopt, **table_opts):
    """Reproduce one of the papers' tables as a grid of resumable cells and write a report beside the paper's
    numbers.

    TABLE is lad-cifar10lt (the LAD paper's Table 1 on CIFAR-10-LT: cells of imbalance factor x images per class x
    method; MTT, DATM and LAD share one expert store per imbalance factor), two-stage (the two-stage paper's
    Tables 1-3: flat and two-stage rows on CIFAR-10-LT, n_max 1000, IF 100, with the grouping and its stability)
    , accuracy-vs-compute (CIFAR-10-LT IF 100, IPC 10: random, DM, DC, MTT, DATM, LAD and RLDD, each at several
    distillation budgets, accuracy against measured single-core seconds including the expert stores; cpu profile
    only; --plan shows every point with its estimated compute and the total) or fair-cifar10lt (CIFAR-10-LT IF 10
    and 100, IPC 10: random, DM, DC, MTT, DATM, LAD, LAD + ADSA, RLDD and its ablations, each under the label modes
    hard / own / teacher beside a random real subset of the same size in the same mode, with LRS, class std,
    head/medium/tail and compute).

    Every cell is keyed by everything that determines it (its resolved configuration, the data's fingerprint and
    the options that reach it) and recorded in RESULTS/cells/TABLE-PROFILE/CELL.json, small enough to commit: a
    recorded cell is reused while its key is unchanged and computed again (stale) otherwise. Heavy artifacts stay
    in --work. A killed run continues where it stopped, and several processes (or torchrun ranks) may share one
    work folder: they claim cells with lock files and split the table.
    """
    if table not in TABLES:
        raise LtddError(f"unknown table '{table}' (known: {', '.join(TABLES)})")
    if profile == "paper-real" and table != "two-stage":
        raise LtddError(f"--profile paper-real is a profile of the two-stage table only, not of {table} "
                        f"(use cpu or gpu)")
    given = {k for k, v in table_opts.items() if v is not None and v != ()}  # False: a given off-switch
    foreign = given - set({"lad-cifar10lt": LAD_ONLY, "two-stage": TWO_STAGE_ONLY, "fair-cifar10lt": ("ifs",),
                           "accuracy-vs-compute": COMPUTE_ONLY}
                          .get(table, ()))
    if foreign:
        raise LtddError(f"{', '.join(_flag(k) for k in sorted(foreign))}: "
                        f"{'not an option' if len(foreign) == 1 else 'not options'} of the {table} table")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    common = dict(profile=profile, root=root, runs=runs, device=device, work=work, results=results)
    if table == "lad-cifar10lt":
        _lad(common, table_opts, plan=plan, report_only=report_only, adopt=adopt)
    elif table == "fair-cifar10lt":
        if adopt:
            raise LtddError("--adopt-legacy is for the lad-cifar10lt table")
        _fair(common, table_opts, plan=plan, report_only=report_only)
    elif table == "accuracy-vs-compute":
        if adopt:
            raise LtddError("--adopt-legacy is for the lad-cifar10lt table")
        from .compute_command import run_compute

        run_compute(common, points=table_opts["points"], plan=plan, report_only=report_only)
    else:
        if adopt:
            raise LtddError("--adopt-legacy is for the lad-cifar10lt table (the two-stage table has no legacy cells "
                            "to adopt)")
        _two_stage(common, table_opts, threads=threads, plan=plan, report_only=report_only)


def _lad(common: dict, t: dict, *, plan: bool, report_only: bool, adopt) -> None:
    from .cells import log, plan_lines
    from .lad_table import DEFAULT_IFS, DEFAULT_METHODS, LadGrid, LadOptions

    opts = LadOptions(**common, ifs=t["ifs"] or DEFAULT_IFS, ipcs=t["ipcs"], methods=t["methods"] or DEFAULT_METHODS,
                      variants=t["variant"] or (), full_epochs=t["full_epochs"])
    if adopt:
        from .adopt import adopt_lad, legacy_store_hints

        grid = LadGrid(opts)
        done = adopt_lad(grid, adopt)
        for name, what in done:
            click.echo(f"{name:28s} {what}")
        click.echo(f"{sum(w.startswith('adopted') for _, w in done)} cells adopted from {adopt} into "
                   f"{grid.table.cells_dir} (asserting the configuration has not changed since they were computed)")
        for hint in legacy_store_hints(grid, adopt):
            click.echo(hint)
        if not (plan or report_only):
            return
    if plan:
        grid = LadGrid(opts)
        for line in plan_lines(grid.expert_plan())[:-1]:
            click.echo(line)
        for line in plan_lines(grid.plan()):
            click.echo(line)
        return
    if report_only:
        from .lad_report import write_report

        grid = LadGrid(opts)
        stem = write_report(grid)
        stale = grid.collect()[1]
        if stale:
            log(f"left out {len(stale)} cells recorded under another key (stale): {', '.join(stale)}")
        log(f"wrote {stem}.md and .json from the finished cells")
        return
    _run_lad(opts)


def _run_lad(opts) -> None:
    from ..distributed import dist_context
    from ..train import resolve_device
    from .cells import barrier, log
    from .lad_report import write_report
    from .lad_table import LadGrid

    with dist_context():
        grid = LadGrid(opts, resolve_device(opts.device))
        Path(opts.results).mkdir(parents=True, exist_ok=True)
        if grid.table.rank == 0:
            grid.table.on_cell = lambda: write_report(grid)  # the report grows cell by cell
        grid.run()
        barrier()
        if grid.table.rank == 0:
            stem = write_report(grid)
            log(f"wrote {stem}.md and .json")


def _fair(common: dict, t: dict, *, plan: bool, report_only: bool) -> None:
    from .drive import drive_table
    from .fair_report import write_report
    from .fair_table import FairGrid, FairOptions

    opts = FairOptions(**common, ifs=t["ifs"])
    drive_table(lambda device: FairGrid(opts, device), plan_lines=lambda g: g.plan_lines(), write_report=write_report,
                stale=lambda g: g.collect()[1], results=opts.results, device=opts.device, plan=plan,
                report_only=report_only)


def _two_stage(common: dict, t: dict, *, threads, plan: bool, report_only: bool) -> None:
    from .cells import log, plan_lines
    from .two_stage_table import TwoStageGrid, TwoStageOptions

    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.get_parameter_source("runs") == click.core.ParameterSource.DEFAULT:
        common = {**common, "runs": None}  # the profile's default (paper-real: one run, as the paper)
    opts = TwoStageOptions(**common, threads=threads, **{k: t[k] for k in TWO_STAGE_ONLY})
    grid = TwoStageGrid(opts)
    if plan:
        for line in plan_lines(grid.plan()):
            click.echo(line)
        if opts.profile == "paper-real":
            for line in grid.estimate_lines():
                click.echo(line)
        return
    if report_only:
        stem = grid.write_report()
        log(f"wrote {stem}.md and .json from the finished cells")
        return
    grid.run()


def main(argv: list[str] | None = None, prog_name: str = "ltdd reproduce", defaults: dict | None = None) -> int:
    """Run the command outside the ``ltdd`` group (the benchmark scripts): a user error is one line on stderr and
    exit code 2, as under ``ltdd``. ``defaults``: ``{"--option": value}`` added when the arguments do not give it."""
    from ..runtime import configure_process

    configure_process()  # as the ``ltdd`` group does for every command (CPU malloc tuning)
    argv = list(sys.argv[1:] if argv is None else argv)
    for opt, value in (defaults or {}).items():
        if not any(a == opt or a.startswith(opt + "=") for a in argv):
            argv += [opt, str(value)]
    try:
        reproduce_cmd.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except LtddError as e:
        click.echo(f"ltdd: error: {e}", err=True)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("ltdd: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
