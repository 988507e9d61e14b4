"""Reproduce the papers' tables: ``ltdd reproduce`` with the results in benchmarks/results.

    python benchmarks/reproduce.py --profile cpu --table lad-cifar10lt            # IF 10 and 100, IPC 10
    python benchmarks/reproduce.py --profile gpu --table lad-cifar10lt            # paper scale, IPC 10 and 50
    python benchmarks/reproduce.py --profile cpu --table two-stage
    python benchmarks/reproduce.py --profile paper-real --table two-stage         # real nets at the paper's scale
    python benchmarks/reproduce.py --profile cpu --table fair-cifar10lt           # every method x label mode
    python benchmarks/reproduce.py --profile cpu --table accuracy-vs-compute
    python benchmarks/reproduce.py ... --plan           # list every cell, its key, preset, scale and state
    python benchmarks/reproduce.py ... --report-only    # rewrite the report from the finished cells
    torchrun --nproc_per_node=K benchmarks/reproduce.py ...   # cells and experts spread over the ranks

``--table NAME`` (default lad-cifar10lt) is the command's TABLE argument; every other option is the command's
(``ltdd reproduce --help``), with --results benchmarks/results and --root ../shared/data/cifar10-jpeg.tar.gz unless
given. The grid, its cells and the reports live in :mod:`ltdd.experiments`.
"""

from __future__ import annotations

import sys

from ltdd.experiments.command import main

# as before the command existed: results beside the scripts, the data where this checkout's machines keep it
DEFAULTS = {"--results": "benchmarks/results", "--root": "../shared/data/cifar10-jpeg.tar.gz"}


def command_argv(argv: list[str]) -> list[str]:
    """``--table NAME`` (or ``--table=NAME``) becomes the command's TABLE argument."""
    argv, table = list(argv), "lad-cifar10lt"
    for i, a in enumerate(argv):
        if a == "--table" and i + 1 < len(argv):
            table = argv[i + 1]
            del argv[i:i + 2]
            break
        if a.startswith("--table="):
            table = a.split("=", 1)[1]
            del argv[i]
            break
    return [table] + argv


if __name__ == "__main__":
    sys.exit(main(command_argv(sys.argv[1:]), prog_name="benchmarks/reproduce.py", defaults=DEFAULTS))
