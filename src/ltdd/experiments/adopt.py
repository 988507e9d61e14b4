"""One-time import of legacy cells (name-keyed cell JSONs, or an old results JSON) under the current cell keys.

Before cells were keyed, a cell was a file ``<work>/cells/<name>.json`` holding its result (``if10-lad.json``,
``if100-ipc50-dm.json``, ``experts-if100.json``), and the report's JSON held every result as
``{"results": {"if<IF>-ipc<IPC>": {method: result}}}``. Adopting reads either form and records every cell the
current grid names under its current key. It does not, and cannot, check that those results were computed with
today's configuration: adopting asserts that the configuration has not changed since. Cells already recorded
under their current key are kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import LtddError
from .lad_table import LadGrid, cell_name

__all__ = ["read_legacy", "adopt_lad", "legacy_store_hints"]

_COLUMN = re.compile(r"^if(\d+)-ipc(\d+)$")


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LtddError(f"cannot read legacy cell file {path}: {str(e).splitlines()[0]}") from None


def read_legacy(source: str | Path) -> dict[str, dict]:
    """``{cell name: result}`` from a folder of name-keyed cell JSONs or from an old-format results JSON."""
    source = Path(source)
    if source.is_dir():
        out = {}
        for p in sorted(source.glob("*.json")):
            rec = _load(p)
            out[p.stem] = rec["result"] if isinstance(rec, dict) and "key_hash" in rec else rec
        return out
    if source.is_file():
        payload = _load(source)
        results = payload.get("results") if isinstance(payload, dict) else None
        if not isinstance(results, dict):
            raise LtddError(f"{source} is not a results JSON of the old format (no 'results' mapping)")
        out = {}
        for col, row in results.items():
            m = _COLUMN.match(col)
            if not m:
                raise LtddError(f"{source}: column '{col}' is not named if<IF>-ipc<IPC>")
            for method, res in row.items():
                out.setdefault(cell_name(int(m.group(1)), int(m.group(2)), method), res)
        return out
    raise LtddError(f"--adopt-legacy: {source} is neither a folder of cell JSONs nor a results JSON")


def adopt_lad(grid: LadGrid, source: str | Path) -> list[tuple[str, str]]:
    """Record the legacy cells the grid names under their current keys; returns ``(cell, what happened)``."""
    legacy = read_legacy(source)
    cells = [grid.cell(IF, ipc, m)[0] for IF, ipc, m in grid.positions()]
    if any(grid.opts.needs_experts(m) for m in grid.opts.methods):
        cells += [grid.experts_cell(IF) for IF in grid.opts.ifs]
    done = []
    for cell in cells:
        res = legacy.get(cell.name)
        if res is None:
            continue
        if grid.table.fresh(cell) is not None:
            done.append((cell.name, f"kept (already recorded under key {cell.hash})"))
            continue
        grid.table.save(cell, res, adopted_from=str(source))
        done.append((cell.name, f"adopted under key {cell.hash}"))
    return done


def legacy_store_hints(grid: LadGrid, source: str | Path) -> list[str]:
    """For a legacy cells folder ``<old work>/cells``: the old expert stores ``<old work>/experts-if<IF>`` that
    could serve the current grid, and where to move them (nothing is moved here)."""
    source = Path(source)
    hints = []
    if source.is_dir() and any(grid.opts.needs_experts(m) for m in grid.opts.methods):
        for IF in grid.opts.ifs:
            old, new = source.parent / f"experts-if{IF}", grid.store_dir(IF)
            if (old / "store.json").is_file() and not new.exists():
                hints.append(f"legacy expert store {old}: to reuse it (same configuration), move it to {new}")
    return hints
