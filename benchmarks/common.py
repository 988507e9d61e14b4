"""Helpers shared by the benchmark scripts (imported as a sibling module: ``python benchmarks/<script>.py``)."""

from __future__ import annotations

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
