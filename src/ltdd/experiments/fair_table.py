"""The fair table as a grid of cells: every method's set under every label mode beside a random real subset.

Rows (``grids/fair-cifar10lt.yaml``) are presets at the table's profile with the imbalance factor and IPC set. Per
imbalance factor the table has:

- expert stores: the LAD preset's trajectory store (read by MTT, DATM and LAD, as in the LAD table) and one
  debiased store per distinct RLDD expert configuration; each a cell recording the seconds of every expert;
- a distillation cell per row (the set, and the seconds it took);
- evaluation cells per row and label mode: ``hard`` (hard labels) and ``own`` (the set's own soft labels; a
  hard-label set has none, its own mode is its hard mode) under the trajectory-matching protocol, ``teacher``
  (relabelled on every batch by one teacher per IF, the debiased teacher of the ``teacher`` row's store) under the
  relabel protocol; a row with ``calibrate`` re-evaluates another row's set with its soft labels shifted by ADSA;
- the random-subset baselines: the random real subset of the same size drawn from the long-tailed train set, under
  the same protocol and mode - one per IF for ``hard`` and ``teacher``; per row for ``own`` (the random images get
  the soft labels the row's method would have initialised them with, calibrated as the row's when it is);
- the full-data references (ERM, cRT) of the split; a record of the LAD table under the same key is reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, list_presets, load_preset, protocol_preset
from ..typed import apply_overrides
from ..errors import LtddError
from .cells import (Cell, CellTable, TableOptions, config_material, data_key, log, material, plan_lines,
                    store_folder)
from .grid_files import check_keys, phases_misfit, read_grid, strings
from .lad_table import DEFAULT_ROOT, default_full_epochs, full_data_cell, ints, released_preset
from .lad_table import TABLE as LAD_TABLE

__all__ = ["TABLE", "GRID_FILE", "Row", "FairOptions", "FairGrid"]

TABLE = "fair-cifar10lt"
GRID_FILE = Path(__file__).parent / "grids" / f"{TABLE}.yaml"


@dataclass(frozen=True)
class Row:
    name: str
    preset: str | None = None  # None: a re-evaluation of row ``of``
    of: str | None = None
    calibrate: bool = False
    set: tuple[str, ...] = ()


@dataclass
class FairOptions(TableOptions):
    """Where the table runs and what it reads. ``grid_file``: another rows file (tests); ``extra_set``: overrides
    applied to every row and store after the file's (tests: another dataset); ``lad_results``: where the LAD
    table's cell records are looked up for full-data references computed under the same key (default: the same
    results folder)."""

    TABLE_NAME = TABLE

    profile: str = "cpu"
    root: str = DEFAULT_ROOT
    ifs: tuple[int, ...] | None = None
    runs: int = 3
    device: str | None = None
    work: str | None = None
    results: str = "results"
    grid_file: str | None = None
    extra_set: tuple[str, ...] = ()
    poll_s: float = 15.0

    def __post_init__(self):
        if self.profile not in ("cpu", "gpu"):
            raise LtddError(f"unknown profile '{self.profile}' (known: cpu, gpu)")
        if int(self.runs) < 1:
            raise LtddError("--runs must be at least 1")
        if self.profile == "gpu":
            self.runs = max(int(self.runs), 5)
        self.ifs = ints(self.ifs) if self.ifs is not None else None
        self.extra_set = tuple(self.extra_set)


class FairGrid:
    """The rows, stores, distillations, evaluations and baselines of the table, their keys, plan and run."""

    def __init__(self, opts: FairOptions, device=None):
        self.opts = opts
        raw, where = read_grid(opts.grid_file or GRID_FILE, {"description", "ipc", "ifs", "common", "protocols",
                                                             "teachers", "rows", "full_data", "trajectory_store"})
        self.description = str(raw.get("description", ""))
        self.ipc = int(raw.get("ipc", 10))
        self.ifs = opts.ifs or ints(raw.get("ifs") or [100])
        self.common = strings(raw.get("common"), f"{where}: common")
        self.trajectory_set = strings(raw.get("trajectory_store"), f"{where}: trajectory_store")
        protos = dict((raw.get("protocols") or {}).get(opts.profile) or {})
        pset = strings(protos.pop("set", None), f"{where}: protocols.{opts.profile}.set")
        if set(protos) != {"sgd", "relabel"}:
            raise LtddError(f"{where}: protocols.{opts.profile} must name an 'sgd' and a 'relabel' protocol "
                            "(and optionally 'set': overrides applied to both)")
        self.protocol_names = {k: str(v) + (" (" + ", ".join(pset) + ")" if pset else "") for k, v in protos.items()}
        try:
            self.protocols = {k: apply_overrides(protocol_preset(str(v)), pset) for k, v in protos.items()}
        except LtddError as e:
            raise LtddError(f"{where}: protocols.{opts.profile}: {e}") from None
        if type(self.protocols["relabel"]).__name__ != "RelabelProtocolConfig":
            raise LtddError(f"{where}: protocol '{protos['relabel']}' is not a relabel protocol")
        self.full = tuple(raw.get("full_data") or ())
        known = set(list_presets())
        self.rows: list[Row] = []
        for r in raw.get("rows") or []:
            if not isinstance(r, dict) or not r.get("name"):
                raise LtddError(f"{where}: every row needs a name")
            check_keys(r, {"name", "preset", "of", "calibrate", "set"}, f"{where}: row '{r['name']}'")
            if (r.get("preset") is None) == (r.get("of") is None):
                raise LtddError(f"{where}: row '{r['name']}' needs either a preset or 'of: ROW'")
            if r.get("preset") is not None and r["preset"] not in known:
                raise LtddError(f"{where}: row '{r['name']}': unknown preset '{r['preset']}' (see `ltdd presets`)")
            self.rows.append(Row(str(r["name"]), r.get("preset"), r.get("of"), bool(r.get("calibrate", False)),
                                 strings(r.get("set"), f"{where}: row {r['name']}")))
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names) or not names:
            raise LtddError(f"{where}: rows need distinct names (and at least one row)")
        for r in self.rows:
            if r.of is not None and (r.of not in names or self.row(r.of).of is not None):
                raise LtddError(f"{where}: row '{r.name}' re-evaluates '{r.of}', which is not a distilled row")
            if r.calibrate and r.of is None:
                raise LtddError(f"{where}: row '{r.name}': calibrate applies to a re-evaluation (of: ROW)")
        from ..lt_methods import METHODS as LT_METHODS

        teachers = raw.get("teachers")
        if not isinstance(teachers, list) or not teachers or not all(isinstance(t, str) for t in teachers):
            raise LtddError(f"{where}: 'teachers' must be a list of names (a row with a debiased store, or a "
                            f"long-tail method trained on the full set: {', '.join(LT_METHODS)})")
        for name in teachers:
            if name not in names and name not in LT_METHODS:
                raise LtddError(f"{where}: teacher '{name}' is neither a row nor a long-tail method "
                                f"({', '.join(LT_METHODS)})")
        if len(set(teachers)) != len(teachers):
            raise LtddError(f"{where}: a teacher is named twice")
        self.teachers = [str(t) for t in teachers]
        # the first teacher's mode is 'teacher', the others' 'teacher-<name>'
        self.teacher_modes = {("teacher" if i == 0 else f"teacher-{n}"): n for i, n in enumerate(self.teachers)}
        self.all_modes = ("hard", "own", *self.teacher_modes)
        self.table = CellTable(opts.table, opts.work_dir(), opts.results, device)
        self.lad_cells = Path(opts.results) / "cells" / f"{LAD_TABLE}-{opts.profile}"
        self._cfg: dict = {}
        self.check()

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def distilled_rows(self) -> list[Row]:
        return [r for r in self.rows if r.of is None]

    # ---- configurations -----------------------------------------------------------------------------------------
    @property
    def preset_profile(self) -> str | None:
        return "cpu" if self.opts.profile == "cpu" else None

    def _load(self, preset: str, over: tuple[str, ...], what: str) -> RunConfig:
        try:
            return load_preset(preset, self.preset_profile, [f"data.root={self.opts.root}", *over,
                                                             *self.opts.extra_set])
        except LtddError as e:
            raise LtddError(f"{what}: {e}") from None

    def config(self, row: Row, IF: int) -> RunConfig:
        """A row's resolved configuration at an IF: LAD's released configuration for (IF, IPC) where there is one
        (as the LAD table), else the preset with the IF and IPC set."""
        key = (row.name, IF)
        if key not in self._cfg:
            released = released_preset(row.preset, IF, self.ipc) if not self.opts.extra_set else None
            if released:
                self._cfg[key] = self._load(released, (*self.common, *row.set), f"row {row.name}")
            else:
                self._cfg[key] = self._load(row.preset, (f"data.imbalance_factor={IF}", f"distill.ipc={self.ipc}",
                                                         *self.common, *row.set), f"row {row.name}")
        return self._cfg[key]

    def store_config(self, row: Row, IF: int) -> RunConfig | None:
        """The expert store a row reads: trajectory rows read the LAD preset's experts (one store per IF, as in the
        LAD table), RLDD rows their own preset's debiased experts; None for a method without experts."""
        from ..distill import DISTILLERS

        cfg = self.config(row, IF)
        if not DISTILLERS[cfg.distill.method].needs_experts:
            return None
        if cfg.experts.kind == "trajectory":
            key = ("store:lad", IF)
            if key not in self._cfg:
                self._cfg[key] = self._load("lad", (f"data.imbalance_factor={IF}", *self.trajectory_set,
                                                    *[c for c in self.common if c.startswith("data.")]),
                                            "the trajectory store")
            return self._cfg[key]
        return cfg

    def store_cell(self, row: Row, IF: int) -> Cell | None:
        scfg = self.store_config(row, IF)
        if scfg is None:
            return None
        # named by the first row that reads a store of this key (rows with one expert configuration share it)
        key = {"kind": "experts", "experts": material(scfg.experts), "data": data_key(scfg.data)}
        for r in self.distilled_rows():
            other = self.store_config(r, IF)
            if other is not None and {"kind": "experts", "experts": material(other.experts),
                                      "data": data_key(other.data)} == key:
                name = "experts" if other.experts.kind == "trajectory" else f"experts-{r.name}"
                return Cell(f"if{IF}-{name}", key)
        raise AssertionError("unreachable: the row itself reads this store")

    def store_dir(self, row: Row, IF: int) -> Path | None:
        cell = self.store_cell(row, IF)
        return None if cell is None else store_folder(self.table.work, cell)

    def stores(self, IF: int) -> list[tuple[Cell, Row]]:
        """The distinct stores of an IF with the first row that reads each."""
        out, seen = [], set()
        for r in self.distilled_rows():
            cell = self.store_cell(r, IF)
            if cell is not None and cell.hash not in seen:
                seen.add(cell.hash)
                out.append((cell, r))
        return out

    def check(self) -> None:
        """Every row is distilled from the same data (one teacher relabels them all, one random subset is their
        baseline); each trajectory row reads only epochs its store trains; a teacher row has a debiased store."""
        for IF in self.ifs:
            keys = {r.name: data_key(self.config(r, IF).data) for r in self.distilled_rows()}
            first = next(iter(keys))
            odd = [n for n, k in keys.items() if k != keys[first]]
            if odd:
                raise LtddError(f"rows {', '.join(odd)} at IF {IF} use other data settings than '{first}' "
                                f"({keys[odd[0]]} vs {keys[first]}); set them alike (common: data.*=...)")
            for r in self.distilled_rows():
                cfg, scfg = self.config(r, IF), self.store_config(r, IF)
                if scfg is None or cfg.distill.method != "tm":
                    continue
                misfit = phases_misfit(cfg.distill, scfg.experts)
                if misfit:
                    raise LtddError(f"row {r.name} at IF {IF}: {misfit}")
            for name in self.teachers:
                if not self.teacher_is_row(name):
                    continue
                t = self.store_config(self.row(name), IF)
                if t is None or t.experts.kind != "debiased":
                    raise LtddError(f"teacher row '{name}' has no debiased store (its teacher relabels every row "
                                    "in its teacher mode)")

    # ---- cells --------------------------------------------------------------------------------------------------
    def distill_cell(self, row: Row, IF: int) -> Cell:
        cfg = self.config(row, IF)
        conf = config_material(cfg)
        for k in ("protocol", "protocol_resolved"):  # the distillation does not evaluate (eval_every 0)
            conf.pop(k, None)
        store = self.store_cell(row, IF)
        return Cell(f"if{IF}-{row.name}", {"kind": "distill", "config": conf, "data": data_key(cfg.data),
                                           "experts": store.hash if store else None})

    def teacher_is_row(self, name: str) -> bool:
        return any(r.name == name for r in self.rows)

    def teacher_name(self, mode: str) -> str | None:
        return self.teacher_modes.get(mode)

    def teacher_cell(self, IF: int, name: str | None = None) -> Cell:
        """A teacher: a row's debiased store (its teacher network), or a network trained on the full long-tailed
        set with a long-tail method (the full-data references' network and recipe, seed 0)."""
        name = name or self.teachers[0]
        if self.teacher_is_row(name):
            return self.store_cell(self.row(name), IF)
        from .lad_table import CRT_EPOCHS, full_train_config

        cfg = self.config(self.rows[0], IF)
        return Cell(f"if{IF}-teacher-{name}", {"kind": "teacher", "method": name, "data": data_key(cfg.data),
                                               "model": material(self.protocols["sgd"].model),
                                               "train": material(full_train_config(default_full_epochs(self.opts.profile))),
                                               "crt_epochs": CRT_EPOCHS, "seed": 0})

    def teacher_path(self, IF: int, name: str) -> Path:
        cell = self.teacher_cell(IF, name)
        folder = store_folder(self.table.work, cell) if self.teacher_is_row(name) else self.table.artifact(cell)
        return folder / "teacher.safetensors"

    def modes(self, row: Row, IF: int) -> tuple[str, ...]:
        """The label modes a row is evaluated in: hard, own (a set with soft labels; a hard-label set's own labels
        are its hard labels) and one teacher mode per teacher; own only for a calibrated re-evaluation."""
        if row.calibrate:
            return ("own",)
        soft = self.has_soft(self.row(row.of) if row.of else row, IF)
        return ("hard", *(("own",) if soft else ()), *self.teacher_modes)

    def has_soft(self, row: Row, IF: int) -> bool:
        d = self.config(row, IF).distill
        return d.method == "rldd" or (d.method == "tm" and bool(d.soft_labels))

    def _eval_key(self, mode: str, IF: int, set_hash: str | None, calibrate: bool, **extra) -> dict:
        name = self.teacher_name(mode)
        proto = "relabel" if name else "sgd"
        return {"kind": "evaluate", "set": set_hash, "mode": "teacher" if name else mode, "calibrate": calibrate,
                "protocol": material(self.protocols[proto]),
                "teacher": self.teacher_cell(IF, name).hash if name else None,
                "runs": int(self.opts.runs), **extra}

    def teacher_test_cell(self, IF: int, name: str | None = None) -> Cell:
        """A teacher's own test accuracy (what its teacher mode's labels are worth)."""
        name = name or self.teachers[0]
        cname = f"if{IF}-teacher-test" if name == self.teachers[0] else f"if{IF}-teacher-{name}-test"
        return Cell(cname, {"kind": "teacher-test", "teacher": self.teacher_cell(IF, name).hash,
                            "data": data_key(self.config(self.rows[0], IF).data)})

    def eval_cell(self, row: Row, IF: int, mode: str) -> Cell:
        src = self.row(row.of) if row.of else row
        return Cell(f"if{IF}-{row.name}-{mode}", self._eval_key(mode, IF, self.distill_cell(src, IF).hash,
                                                                row.calibrate))

    def baseline_cell(self, IF: int, mode: str, row: Row | None = None) -> Cell:
        """The random real subset of the table's IPC under ``mode``: per IF for hard and teacher, per row for own
        (soft labels from the row's method, calibrated as the row's)."""
        if mode != "own":
            return Cell(f"if{IF}-baseline-{mode}", self._eval_key(mode, IF, None, False, ipc=self.ipc,
                                                                  data=data_key(self.config(self.rows[0], IF).data)))
        src = self.row(row.of) if row.of else row
        labeller = {"method": material(self.config(src, IF).distill),
                    "experts": (self.store_cell(src, IF).hash if self.store_cell(src, IF) else None)}
        return Cell(f"if{IF}-{row.name}-own-baseline", self._eval_key(
            "own", IF, None, row.calibrate, ipc=self.ipc, data=data_key(self.config(src, IF).data),
            labeller=labeller))

    def full_cell(self, method: str, IF: int) -> Cell:
        cfg = self.config(self.rows[0], IF)
        return full_data_cell(f"if{IF}-{method}", method, cfg.data, self.protocols["sgd"].model,
                              profile=self.opts.profile, runs=self.opts.runs,
                              full_epochs=default_full_epochs(self.opts.profile))

    def cells(self, IF: int) -> list[tuple[Cell, str, str]]:
        """Every cell of an IF as (cell, kind, what), in the order they are computed."""
        out = [(c, "store", f"experts of {r.name}" + (" (a teacher)" if r.name in self.teachers else ""))
               for c, r in self.stores(IF)]
        out += [(self.teacher_cell(IF, n), "teacher", f"teacher {n}: trained on the full long-tailed set")
                for n in self.teachers if not self.teacher_is_row(n)]
        out += [(self.full_cell(m, IF), "full", f"{m} on the full long-tailed set") for m in self.full]
        out += [(self.distill_cell(r, IF), "distill", f"{r.name}: {self.config(r, IF).distill.method}")
                for r in self.distilled_rows()]
        out += [(self.teacher_test_cell(IF, n), "teacher", f"teacher {n}'s own test accuracy") for n in self.teachers]
        out += [(self.baseline_cell(IF, m), "baseline", f"random real subset, {m} labels")
                for m in ("hard", *self.teacher_modes)]
        for r in self.rows:
            for m in self.modes(r, IF):
                out.append((self.eval_cell(r, IF, m), "eval", f"{r.name} in mode {m}"))
                if m == "own":
                    out.append((self.baseline_cell(IF, "own", r), "baseline",
                                f"random real subset with {r.name}'s own soft labels"))
        return out

    def plan(self) -> list[dict]:
        rows = []
        for IF in self.ifs:
            for cell, kind, what in self.cells(IF):
                partial = None
                if kind == "distill":
                    partial = self.table.artifact(cell) / "checkpoint.safetensors"
                rows.append({"cell": cell.name, "hash": cell.hash, "state": self.table.state(cell, partial),
                             "preset": kind, "what": what})
        return rows

    def plan_lines(self) -> list[str]:
        return plan_lines(self.plan())

    # ---- run ----------------------------------------------------------------------------------------------------
    def _data(self, IF: int, cache: dict):
        from ..data import prepare_data

        if IF not in cache:
            cache[IF] = prepare_data(self.config(self.rows[0], IF).data)
        return cache[IF]

    def _set(self, row: Row, IF: int):
        from ..synset import SyntheticSet

        src = self.row(row.of) if row.of else row
        return SyntheticSet.load(self.table.artifact(self.distill_cell(src, IF)))

    def _teacher(self, IF: int, data, name: str | None = None):
        from ..labels import load_teacher

        return load_teacher(self.teacher_path(IF, name or self.teachers[0]), data, device=self.table.device)

    def _evaluate(self, syn, data, mode: str, IF: int, *, calibrate: bool = False, baseline: bool = False,
                  labeller=None) -> dict:
        from ..evaluate import evaluate_baseline, evaluate_set

        name = self.teacher_name(mode)
        proto = "relabel" if name else "sgd"
        mode = "teacher" if name else mode
        kw = dict(teacher=self._teacher(IF, data, name) if name else None, calibrate=calibrate,
                  protocol_name=self.protocol_names[proto], device=self.table.device, seed=0,
                  runs=int(self.opts.runs))
        if baseline:
            res = evaluate_baseline(syn, data, self.protocols[proto], mode, own_labeller=labeller, **kw)
            if res.get("status") == "n/a":
                raise LtddError(f"no own-mode baseline: {res.get('reason')}")
        else:
            res = evaluate_set(syn, data, self.protocols[proto], mode, **kw)
        return {k: v for k, v in res.items() if k != "protocol"}

    def borrow_full(self, cell: Cell) -> bool:
        """Reuse the LAD table's record of a full-data cell computed under the same key."""
        path = self.lad_cells / f"{cell.name}.json"
        if self.table.fresh(cell) is not None or not path.is_file():
            return self.table.fresh(cell) is not None
        rec = json.loads(path.read_text())
        if rec.get("key_hash") != cell.hash:
            return False
        self.table.save(cell, rec["result"], borrowed_from=f"{LAD_TABLE}-{self.opts.profile}/{cell.name}")
        log(f"{cell.name}: reused the {LAD_TABLE} table's record (same key)")
        return True

    def tasks(self, IF: int) -> list[tuple[Cell, tuple[Cell, ...], object]]:
        """Every cell of an IF as (cell, the cells it needs first, how to compute it), in the order they run."""
        from ..labels import method_soft_labeller
        from .compute_table import fill_store, timed_distill
        from .kinds import full_data

        t, out = self.table, []
        data = lambda: self._data(IF, self._cache)  # noqa: E731 - loaded when a cell first needs it
        for cell, r in self.stores(IF):
            out.append((cell, (), lambda cell=cell, r=r: fill_store(
                t, cell, self.store_config(r, IF).experts, store_folder(t.work, cell), data(), wait=False,
                poll_s=self.opts.poll_s, label=cell.name)))
        for n in self.teachers:
            if not self.teacher_is_row(n):
                cell = self.teacher_cell(IF, n)
                out.append((cell, (), lambda cell=cell, n=n: t.cell(cell, lambda: self._train_teacher(cell, n, data()),
                                                                    deal=False)))
        for m in self.full:
            cell = self.full_cell(m, IF)
            out.append((cell, (), lambda cell=cell, m=m: self.borrow_full(cell) or t.cell(cell, lambda: full_data(
                data(), m, self.protocols["sgd"].model, _full_train(self.opts.profile), runs=cell.key["runs"],
                device=t.device, crt_epochs=cell.key["crt_epochs"], checkpoint_dir=t.artifact(cell)), deal=False)))
        for r in self.distilled_rows():
            cell, store = self.distill_cell(r, IF), self.store_cell(r, IF)
            out.append((cell, (store,) if store else (), lambda cell=cell, r=r: t.cell(cell, lambda: timed_distill(
                self.config(r, IF), data(), t.artifact(cell), experts_dir=self.store_dir(r, IF), device=t.device),
                deal=False)))
        sets = lambda r: (self.distill_cell(self.row(r.of) if r.of else r, IF),)  # noqa: E731
        needs = lambda m: (self.teacher_cell(IF, self.teacher_name(m)),) if self.teacher_name(m) else ()  # noqa: E731
        for n in self.teachers:
            tcell = self.teacher_test_cell(IF, n)
            out.append((tcell, (self.teacher_cell(IF, n),), lambda tcell=tcell, n=n: t.cell(
                tcell, lambda: _teacher_test(self._teacher(IF, data(), n), data()), deal=False)))
        first = self.distilled_rows()[0]  # any set of the table's IPC gives the baselines their size
        for m in ("hard", *self.teacher_modes):
            out.append((self.baseline_cell(IF, m), sets(first) + needs(m),
                        lambda m=m: t.cell(self.baseline_cell(IF, m), lambda: self._evaluate(
                            self._set(first, IF), data(), m, IF, baseline=True), deal=False)))
        for r in self.rows:
            src = self.row(r.of) if r.of else r
            for m in self.modes(r, IF):
                cell = self.eval_cell(r, IF, m)
                out.append((cell, sets(r) + needs(m),
                            lambda cell=cell, r=r, m=m: t.cell(cell, lambda: self._evaluate(
                                self._set(r, IF), data(), m, IF, calibrate=r.calibrate), deal=False)))
                if m == "own":
                    cell = self.baseline_cell(IF, "own", r)
                    store = self.store_cell(src, IF)
                    out.append((cell, sets(r) + ((store,) if store else ()),
                                lambda cell=cell, r=r, src=src: t.cell(cell, lambda: self._evaluate(
                                    self._set(r, IF), data(), "own", IF, calibrate=r.calibrate, baseline=True,
                                    labeller=method_soft_labeller(_distill_dict(self.config(src, IF)), data(),
                                                                  self.store_dir(src, IF))), deal=False)))
        return out

    def _train_teacher(self, cell: Cell, name: str, data) -> dict:
        """Train a teacher on the full long-tailed set with long-tail method ``name`` and write it beside the cell."""
        import time

        from ..evaluate import summarise
        from ..labels import save_teacher
        from ..lt_methods import remove_checkpoints, train_full

        t0 = time.time()
        timing: dict = {}
        work = self.table.artifact(cell)
        model, m = train_full(data, name, self.protocols["sgd"].model, _full_train(self.opts.profile),
                              crt_epochs=cell.key["crt_epochs"], device=self.table.device, seed=cell.key["seed"],
                              checkpoint_dir=work, timing=timing)
        path = save_teacher(work / "teacher.safetensors", model.cpu(), self.protocols["sgd"].model,
                            data, description=f"{name} on the full long-tailed set, "
                                              f"{cell.key['train'].get('epochs')} epochs, seed {cell.key['seed']}")
        remove_checkpoints(work, name, cell.key["seed"])  # kept until the teacher was saved
        return {"summary": summarise([m]), "path": str(path), "seconds": time.time() - t0 + timing["seconds_before"]}

    # what a recorded cell leaves in the work folder (a new machine has the record but not the file)
    _ARTIFACT = {"distill": "distilled.safetensors", "teacher": "teacher.safetensors"}

    def _ready(self, cell: Cell) -> bool:
        """A needed cell is done, and what it left in the work folder (a set, a teacher) is there."""
        if self.table.fresh(cell) is None:
            return False
        kind = cell.key.get("kind")
        return kind not in self._ARTIFACT or (self.table.artifact(cell) / self._ARTIFACT[kind]).is_file()

    def run(self) -> None:
        """Compute every cell not done yet, IF by IF, each once the cells it needs are done (a cell that waits for
        another process lets the next ones, of any IF, go first). Several processes may share the work folder: a
        cell another process holds is skipped and its dependants wait for it. A recorded distillation whose set (or
        a teacher whose network) is not in the work folder (another machine) is made again, keeping its record."""
        import time

        from .compute_table import timed_distill

        self._cache: dict = {}
        t = self.table
        pending = [(IF, item) for IF in self.ifs for item in self.tasks(IF)]  # IF by IF, in the table's order
        while pending:
            progressed = False
            for entry in list(pending):
                IF, (cell, needs, fn) = entry
                if not all(self._ready(c) for c in needs):
                    continue
                fn()
                if t.fresh(cell) is None:
                    continue  # held by another process (or a store another process is finishing)
                if cell.key.get("kind") == "distill" and not self._ready(cell):
                    r = next(r for r in self.distilled_rows() if self.distill_cell(r, IF).name == cell.name)
                    log(f"{cell.name}: the set is not in {t.work}; distilling it again")
                    timed_distill(self.config(r, IF), self._data(IF, self._cache), t.artifact(cell),
                                  experts_dir=self.store_dir(r, IF), device=t.device)
                if cell.key.get("kind") == "teacher" and not self._ready(cell):
                    log(f"{cell.name}: the teacher is not in {t.work}; training it again")
                    self._train_teacher(cell, cell.key["method"], self._data(IF, self._cache))
                pending.remove(entry)
                progressed = True
            if pending and not progressed:
                log(f"waiting for {len(pending)} cells that need another process's work")
                time.sleep(self.opts.poll_s)

    def collect(self) -> tuple[dict, list[str]]:
        """``({cell name: result}, stale cell names)`` under the current keys."""
        results, stale = {}, []
        for IF in self.ifs:
            for cell, _, _ in self.cells(IF):
                res = self.table.fresh(cell)
                if res is not None:
                    results[cell.name] = res
                elif self.table.record(cell.name) is not None:
                    stale.append(cell.name)
        return results, stale


def _teacher_test(teacher, data) -> dict:
    from ..evaluate import summarise, test_metrics

    m = test_metrics(teacher.model, data)
    return {"summary": summarise([m]), "metrics": m.to_dict(), "teacher": teacher.identity}


def _full_train(profile: str):
    from .lad_table import full_train_config

    return full_train_config(default_full_epochs(profile))


def _distill_dict(cfg: RunConfig) -> dict:
    from ..config import to_dict

    return to_dict(cfg.distill)
