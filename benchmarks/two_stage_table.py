"""The two-stage paper's Tables 1-3 on CIFAR-10-LT: ``ltdd reproduce two-stage`` with the results in benchmarks/results.

    python benchmarks/two_stage_table.py --profile cpu
    python benchmarks/two_stage_table.py --profile paper-real --plan   # the paper's scale for real-image networks
    python benchmarks/two_stage_table.py --profile cpu --plan      # every cell, its key and state
    python benchmarks/reproduce.py --profile cpu --table two-stage   # the same

Every option is the command's (``ltdd reproduce --help``); the grid lives in :mod:`ltdd.experiments.two_stage_table`.
"""

from __future__ import annotations

import sys

from ltdd.experiments.command import main
from reproduce import DEFAULTS  # noqa: E402  (benchmarks/reproduce.py: the same defaults)

if __name__ == "__main__":
    sys.exit(main(["two-stage"] + sys.argv[1:], prog_name="benchmarks/two_stage_table.py", defaults=DEFAULTS))
