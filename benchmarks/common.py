"""Helpers shared by the benchmark scripts (imported as a sibling module: ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ltdd.config import atomic_write_text
from ltdd.experiments.machine import cpu_model, machine_line  # noqa: F401  (re-exported for the scripts)


def write_section(path: str | Path, title: str, section: str, append: bool) -> Path:
    """Write ``# title`` + ``section`` to a results file atomically, or append the section to what is there."""
    path = Path(path)
    if append and path.exists():
        text = path.read_text().rstrip("\n") + "\n\n" + section
    else:
        text = f"# {title}\n\n" + section
    atomic_write_text(path, text)
    print(f"\nwrote {path}")
    return path


def section_heading(script: str, argv: list[str] | None) -> str:
    """A results section's first line: the command that wrote it (``python benchmarks/<script> ...``) and when."""
    cmd = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    return f"`{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M')})"


def finish(path: str | Path, title: str, section: str, append: bool) -> int:
    """Print a results section, write it (:func:`write_section`) and return the script's exit code (0)."""
    print("\n" + section)
    write_section(path, title, section, append)
    return 0
