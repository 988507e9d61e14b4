"""How a table command plans, reports or runs: one sequence for the tables (print the plan; rewrite the report from
the finished cells; or compute the missing cells with the report growing cell by cell)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from .cells import log

__all__ = ["drive_table"]


def drive_table(make_grid: Callable, *, plan_lines: Callable, write_report: Callable, stale: Callable,
                results: str, device: str | None, plan: bool, report_only: bool, files: str = "md and .json") -> None:
    """``make_grid(device)`` builds the table's grid; ``plan_lines(grid)`` its ``--plan`` lines;
    ``write_report(grid)`` writes the report and returns its stem; ``stale(grid)`` the names of the cells recorded
    under another key. ``files``: what the report writes, for the closing line."""
    if plan:
        for line in plan_lines(make_grid(None)):
            click.echo(line)
        return
    if report_only:
        grid = make_grid(None)
        stem = write_report(grid)
        left = stale(grid)
        if left:
            log(f"left out {len(left)} cells recorded under another key (stale): {', '.join(left)}")
        log(f"wrote {stem}.{files} from the finished cells")
        return
    from ..train import resolve_device

    grid = make_grid(resolve_device(device))
    Path(results).mkdir(parents=True, exist_ok=True)
    grid.table.on_cell = lambda: write_report(grid)  # the report grows cell by cell
    grid.run()
    stem = write_report(grid)
    log(f"wrote {stem}.{files}")
