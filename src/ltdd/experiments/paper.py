"""The papers' published numbers, read from the YAML data files shipped in ``ltdd/experiments/paper``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..config import load_yaml

__all__ = ["PAPER_DIR", "paper_data", "lad_paper_table", "two_stage_paper"]

PAPER_DIR = Path(__file__).parent / "paper"


@lru_cache(maxsize=None)
def paper_data(name: str) -> dict:
    """The parsed YAML file ``paper/<name>.yaml`` (e.g. ``lad-cifar10lt``, ``two-stage``)."""
    return load_yaml(PAPER_DIR / f"{name}.yaml")


def lad_paper_table() -> dict:
    """LAD's Table 1 as ``{IF: {IPC: {method: "mean±std"}}}``, the full-data row under every IPC."""
    raw = paper_data("lad-cifar10lt")
    full = raw["full_data"]
    return {IF: {ipc: {**{m: v[IF][i] for m, v in raw["methods"].items()}, raw["full_data_method"]: full[IF]}
                 for i, ipc in enumerate(raw["ipcs"])} for IF in full}


def two_stage_paper() -> tuple[dict, dict, dict]:
    """The two-stage paper's ``(rows, notes, reference splits)``."""
    raw = paper_data("two-stage")
    return raw["rows"], raw.get("notes") or {}, raw["references"]
