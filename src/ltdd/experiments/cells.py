"""A table's cells: each keyed by everything that determines it, stored as a small JSON record, claimed with locks.

A cell is a name (``if100-lad``, ``original+gm``) and a *key*: a JSON-able dict of everything its result depends
on - the resolved configuration, the data's key (:func:`data_key`) and the table's options that reach the
computation. The record ``<results>/cells/<table>-<profile>/<name>.json`` holds ``{"cell", "key_hash", "key",
"result"}``; it is reused only while its ``key_hash`` equals the current key's hash, otherwise the cell is *stale*
and computed again.
The records are small (they can be committed, so a new machine resumes instead of recomputing); heavy artifacts
(distilled sets, expert stores, networks) live in the work folder, in folders named by the cell and its hash.

Processes sharing a work folder claim a cell with a lock file (``<work>/locks/<name>.lock``, :mod:`ltdd.locks`); a
process skips cells a live process holds and takes over those of a dead one. Under torchrun the cells are dealt
round-robin to the ranks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import DataConfig, RunConfig, save_json
from ..typed import material  # noqa: F401  (re-exported: the tables key their cells with it)
from ..data.fingerprint import digest
from ..distributed import local_only, rank_world
from ..errors import LtddError
from ..locks import lock_is_stale, try_lock, unlock

__all__ = ["FORMAT", "Cell", "CellTable", "key_hash", "root_identity", "data_key", "config_material",
           "store_folder", "plan_lines", "barrier", "log"]

FORMAT = 1  # the cell record's format; part of every key
STATES = ("done", "running", "partial", "to do", "stale")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def key_hash(material) -> str:
    """The short hash of key material (canonical JSON, :func:`ltdd.data.fingerprint.digest`)."""
    return digest({"format": FORMAT, "key": material}, length=12)


def root_identity(root) -> str | None:
    """A data root as key material: its base name (``cifar10-jpeg.tar.gz``). Not the path, so the same archive
    elsewhere (or under ``${LTDD_DATA}``) gives the same key, and not its size or content, so a key does not depend
    on whether the data is present (``--plan`` and ``--report-only`` need no data)."""
    return None if root is None else Path(str(root).rstrip("/")).name


def data_key(cfg: DataConfig) -> dict:
    """The data a cell is computed on, from its configuration (no data is loaded): dataset, the root's identity,
    imbalance factor, split seed, preprocessing and every other field of the data configuration."""
    d = material(cfg)
    d["root"] = root_identity(cfg.root)
    d["imbalance_factor"] = cfg.resolved_imbalance_factor()
    d.pop("imbalance_ratio", None)
    return d


def config_material(cfg: RunConfig) -> dict:
    """A resolved run configuration as key material: everything but its description, its profile table (already
    applied) and its data section (the cell's data fingerprint stands for it), plus the resolved protocol."""
    d = material(cfg)
    for k in ("description", "profiles", "data"):
        d.pop(k, None)
    d["protocol_resolved"] = material(cfg.protocol_config())
    return d


class TableOptions:
    """What every table's options share: the table's name at its profile and its work folder (``--work``, default
    ``runs/reproduce/<table>-<profile>``). A subclass sets ``TABLE_NAME`` and has ``profile`` and ``work`` fields."""

    TABLE_NAME = ""

    @property
    def table(self) -> str:
        return f"{self.TABLE_NAME}-{self.profile}"

    def work_dir(self) -> Path:
        """Where the table's heavy artifacts (expert stores, distilled sets, networks) and locks live."""
        return Path(self.work or f"runs/reproduce/{self.table}")


@dataclass
class Cell:
    name: str
    key: dict
    hash: str = field(init=False)

    def __post_init__(self):
        self.hash = key_hash(self.key)


class CellTable:
    """The cells of one table at one profile: records under ``<results>/cells/<name>``, artifacts and locks under
    ``work``."""

    def __init__(self, name: str, work: str | Path, results: str | Path, device=None):
        self.name = name
        self.work = Path(work)
        self.cells_dir = Path(results) / "cells" / name
        self.device = device
        self.rank, self.world = rank_world()
        self.count = 0
        self.on_cell: Callable[[], None] | None = None  # called after every computed cell (incremental report)

    def path(self, name: str) -> Path:
        return self.cells_dir / f"{name}.json"

    def lock_path(self, name: str) -> Path:
        return self.work / "locks" / f"{name}.lock"

    def artifact(self, cell: Cell) -> Path:
        """The work folder of a cell's heavy output (a distilled set), named by the cell and its key."""
        return self.work / f"{cell.name}-{cell.hash[:8]}"

    def record(self, name: str) -> dict | None:
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return rec if isinstance(rec, dict) and "key_hash" in rec else None

    def fresh(self, cell: Cell) -> dict | None:
        """The cell's result if its record was made under the current key, else None."""
        rec = self.record(cell.name)
        return rec["result"] if rec is not None and rec["key_hash"] == cell.hash else None

    def state(self, cell: Cell, partial: Path | None = None) -> str:
        """done / running / partial (``partial`` exists: a checkpoint) / stale (recorded under another key) / to do."""
        rec = self.record(cell.name)
        if rec is not None and rec["key_hash"] == cell.hash:
            return "done"
        lock = self.lock_path(cell.name)
        if lock.is_file() and not lock_is_stale(lock):
            return "running"
        if partial is not None and partial.is_file():
            return "partial"
        return "stale" if rec is not None else "to do"

    def save(self, cell: Cell, result: dict, **extra) -> None:
        save_json(self.path(cell.name), {"cell": cell.name, "key_hash": cell.hash, "key": cell.key, **extra,
                                         "result": result})

    def cell(self, cell: Cell, fn: Callable[[], dict], deal: bool = True) -> dict | None:
        """Compute (or reuse) one cell. ``deal``: under torchrun the cells are dealt round-robin and a rank returns
        None for the cells it does not own. A cell another live process holds is skipped (None)."""
        self.count += 1
        res = self.fresh(cell)
        if res is not None:
            log(f"{cell.name}: done before, reusing")
            return res
        old = self.record(cell.name)
        if deal and (self.count - 1) % self.world != self.rank:
            return None
        lock = self.lock_path(cell.name)
        if not try_lock(lock):
            log(f"{cell.name}: another process is computing it, skipping")
            return None
        try:
            res = self.fresh(cell)
            if res is not None:  # finished by another process between the check above and the claim
                return res
            log(f"{cell.name}: " + (f"stale (recorded under key {old['key_hash']}, now {cell.hash}), recomputing"
                                    if old else "running"))
            t0 = time.time()
            with local_only():  # a cell is one rank's independent work
                res = fn()
            res.setdefault("seconds", time.time() - t0)
            if "summary" in res:  # an evaluated cell says how many threads its process had
                res.setdefault("threads", torch.get_num_threads())
            self.save(cell, res)
        finally:
            unlock(lock)
        if self.on_cell:
            self.on_cell()
        acc = res.get("summary", {}).get("accuracy", {}).get("mean") if isinstance(res.get("summary"), dict) else None
        log(f"{cell.name}: " + (f"acc {100 * acc:.1f} " if acc is not None else "done ") + f"({res['seconds']:.0f} s)")
        return res

    def require(self, cell: Cell, fn: Callable[[], dict]) -> dict:
        """:meth:`cell` for a step the rest of the table needs now: never dealt away; a cell held by another live
        process is an error."""
        res = self.cell(cell, fn, deal=False)
        if res is None:
            raise LtddError(f"cell {cell.name} is being computed by another process on {self.work}; wait for it or "
                            f"use another --work folder")
        return res


def store_folder(work: Path, cell: Cell) -> Path:
    """The folder of an expert store cell (key ``{"experts": ..., ...}``), named by everything of its key but the
    number of experts: a store asked for more experts extends the same trajectories."""
    key = dict(cell.key)
    key["experts"] = {k: v for k, v in key["experts"].items() if k != "num_experts"}
    return Path(work) / f"{cell.name}-{key_hash(key)[:8]}"


def plan_lines(rows: list[dict]) -> list[str]:
    """``--plan`` output: one line per cell (name, state, key hash, preset, what it runs) and a count."""
    out = [f"{r['cell']:28s} {r['state']:8s} {r['hash']}  preset {r['preset']:24s} {r['what']}" for r in rows]
    n = {s: sum(r["state"] == s for r in rows) for s in STATES}
    out.append(f"{len(rows)} cells: {n['done']} done, {n['running']} running, {n['partial']} partial, "
               f"{n['to do']} to do" + (f", {n['stale']} stale (recorded under another key: recomputed)"
                                        if n["stale"] else ""))
    return out
