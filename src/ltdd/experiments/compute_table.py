"""The accuracy-vs-compute table as a grid of cells: its points and expert stores (YAML data), keys, plan and run.

The points live in ``grids/accuracy-vs-compute.yaml``: each is a method's preset at the ``cpu`` profile plus
``--set`` overrides (iterations, student steps, start window, width), evaluated with one common protocol. Trajectory
and RLDD points name an expert store from the file's ``stores``; a store is its own cell, keyed by its expert
configuration and data, and trained once for every point that names it. Every point records the seconds of its
distillation (and of its evaluation) and every store the seconds of each expert it trained (the sum of its training
log, which stays exact when several processes split a store), so that the report prices each point by what was
measured. Several processes may share the work folder: they claim experts and cells with lock files.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig, list_presets, load_preset, save_json
from ..errors import LtddError
from .cells import TableOptions, Cell, CellTable, config_material, data_key, key_hash, log, material
from .grid_files import check_keys, phases_misfit, read_grid, strings
from .compute_cost import check_cost_model, distill_estimate, eval_estimate, kinds_read, store_estimate
from .lad_table import DEFAULT_ROOT

__all__ = ["TABLE", "GRID_FILE", "Point", "ComputeOptions", "ComputeGrid", "checkpoint_iteration", "fill_store",
           "store_record", "timed_distill", "timed_distill_evaluate", "strings"]

TABLE = "accuracy-vs-compute"
GRID_FILE = Path(__file__).parent / "grids" / f"{TABLE}.yaml"
POLL_S = 15.0


@dataclass(frozen=True)
class Point:
    name: str
    method: str  # the grid's method name (a line of the plot)
    preset: str
    set: tuple[str, ...]
    store: str | None = None


@dataclass
class ComputeOptions(TableOptions):
    """Where the table runs and what it reads. ``grid_file``: another points file (tests); ``extra_set``: overrides
    applied to every store and point after the file's (tests: another dataset)."""

    TABLE_NAME = TABLE

    profile: str = "cpu"
    root: str = DEFAULT_ROOT
    runs: int = 3
    device: str | None = None
    work: str | None = None
    results: str = "results"
    grid_file: str | None = None
    extra_set: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    poll_s: float = POLL_S

    def __post_init__(self):
        if self.profile != "cpu":
            raise LtddError(f"the {TABLE} table is defined at the cpu profile only (its points are cpu-profile "
                            f"presets scaled up and down), not '{self.profile}'")
        if int(self.runs) < 1:
            raise LtddError("--runs must be at least 1")
        self.extra_set = tuple(self.extra_set)
        self.only = tuple(self.only)



def checkpoint_iteration(path: Path) -> int:
    """The iteration a distillation checkpoint was saved at (0 when there is none)."""
    if not path.is_file():
        return 0
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("iteration", 0))
    except Exception:  # noqa: BLE001 - a corrupt checkpoint is reported by the distillation itself
        return 0


class ComputeGrid:
    """The points and stores of the table, their configurations, keys, estimates, plan and run."""

    def __init__(self, opts: ComputeOptions, device=None):
        self.opts = opts
        raw, where = read_grid(opts.grid_file or GRID_FILE, {"description", "protocol", "data", "common", "stores",
                                                             "methods", "cost_model"})
        self.description = str(raw.get("description", ""))
        self.protocol = str(raw.get("protocol") or "cpu")
        self.data_set = strings(raw.get("data"), f"{where}: data")
        self.common = strings(raw.get("common"), f"{where}: common")
        self.cost = check_cost_model(raw.get("cost_model"), where)
        stores = raw.get("stores") or {}
        methods = raw.get("methods") or {}
        if not isinstance(stores, dict) or not isinstance(methods, dict) or not methods:
            raise LtddError(f"{where}: 'methods' (and 'stores', if any) must be mappings by name")
        known = set(list_presets())
        self.stores: dict[str, tuple[str, tuple[str, ...]]] = {}
        for name, spec in stores.items():
            if not isinstance(spec, dict) or spec.get("preset") not in known:
                raise LtddError(f"{where}: store '{name}' needs a known preset (see `ltdd presets`)")
            check_keys(spec, {"preset", "set"}, f"{where}: store '{name}'")
            self.stores[str(name)] = (spec["preset"], strings(spec.get("set"), f"{where}: store {name}"))
        self.methods: dict[str, tuple[str, ...]] = {}
        self.points: list[Point] = []
        for m, spec in methods.items():
            if not isinstance(spec, dict) or spec.get("preset") not in known:
                raise LtddError(f"{where}: method '{m}' needs a known preset (see `ltdd presets`)")
            check_keys(spec, {"preset", "set", "points"}, f"{where}: method '{m}'")
            self.methods[str(m)] = strings(spec.get("set"), f"{where}: method {m}")
            for p in spec.get("points") or []:
                if not isinstance(p, dict) or not p.get("name"):
                    raise LtddError(f"{where}: every point of method '{m}' needs a name")
                check_keys(p, {"name", "store", "set"}, f"{where}: point '{p['name']}'")
                if p.get("store") is not None and p["store"] not in self.stores:
                    raise LtddError(f"{where}: point '{p['name']}' names an unknown store '{p['store']}'")
                self.points.append(Point(str(p["name"]), str(m), spec["preset"],
                                         self.methods[str(m)] + strings(p.get("set"), f"{where}: point {p['name']}"),
                                         p.get("store")))
        names = [p.name for p in self.points]  # store cells are named store-NAME
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise LtddError(f"{where}: point names used twice: {', '.join(dup)}")
        self.table = CellTable(opts.table, opts.work_dir(), opts.results, device)
        self._cfg: dict[str, RunConfig] = {}
        self.check()

    # ---- configurations -----------------------------------------------------------------------------------------
    def _load(self, preset: str, over: tuple[str, ...], what: str) -> RunConfig:
        try:
            return load_preset(preset, "cpu", [f"data.root={self.opts.root}", *self.data_set, *over,
                                               *self.opts.extra_set])
        except LtddError as e:
            raise LtddError(f"{what}: {e}") from None

    def store_config(self, name: str) -> RunConfig:
        key = f"store:{name}"
        if key not in self._cfg:
            preset, over = self.stores[name]
            self._cfg[key] = self._load(preset, over, f"store {name}")
        return self._cfg[key]

    def point_config(self, p: Point) -> RunConfig:
        if p.name not in self._cfg:
            self._cfg[p.name] = self._load(p.preset, (*self.common, *p.set, f"protocol={self.protocol}"),
                                           f"point {p.name}")
        return self._cfg[p.name]

    def used_stores(self) -> list[str]:
        """The stores some point names, in the file's order."""
        used = {p.store for p in self.points}
        return [s for s in self.stores if s in used]

    def users(self, store: str) -> dict[str, list[str]]:
        """{kind of expert: names of the points that read it} of a store."""
        out: dict[str, list[str]] = {}
        for p in self.points:
            if p.store == store:
                for k in kinds_read(self.point_config(p)):
                    out.setdefault(k, []).append(p.name)
        return out

    def check(self) -> None:
        """Each point's store fits it (kind, data, epochs), and each trajectory store trains exactly the epochs its
        points read."""
        from ..distill import DISTILLERS

        for p in self.points:
            cfg = self.point_config(p)
            cls = DISTILLERS[cfg.distill.method]
            if cls.needs_experts != (p.store is not None):
                raise LtddError(f"point {p.name}: method '{cfg.distill.method}' "
                                + ("needs an expert store (store: NAME)" if cls.needs_experts else
                                   f"uses no experts; remove its store '{p.store}'"))
            if p.store is None:
                continue
            scfg = self.store_config(p.store)
            if scfg.experts.kind != cls.expert_kind:
                raise LtddError(f"point {p.name}: store '{p.store}' holds {scfg.experts.kind} experts, but "
                                f"'{cfg.distill.method}' needs {cls.expert_kind} experts")
            if data_key(scfg.data) != data_key(cfg.data):
                raise LtddError(f"point {p.name}: store '{p.store}' is trained on other data (its preset's data "
                                f"settings differ from the point's)")
            misfit = phases_misfit(cfg.distill, scfg.experts)
            if misfit:
                raise LtddError(f"point {p.name} (store '{p.store}'): {misfit}")
        for s in self.used_stores():
            e = self.store_config(s).experts
            if e.kind != "trajectory":
                continue
            need = max((ph.max_start_epoch - 1 + ph.expert_epochs for p in self.points if p.store == s
                        for ph in self.point_config(p).distill.phases if ph.store == "representation"), default=0)
            if need and e.train.epochs > need:
                raise LtddError(f"store {s} trains {e.train.epochs} representation epochs, but its points read at "
                                f"most {need} (start epochs below W, plus M): set experts.train.epochs={need}")

    # ---- cells --------------------------------------------------------------------------------------------------
    def store_cell(self, name: str) -> Cell:
        cfg = self.store_config(name)
        return Cell(f"store-{name}", {"kind": "experts", "experts": material(cfg.experts), "data": data_key(cfg.data)})

    def store_dir(self, name: str) -> Path:
        """A store's folder, named by its whole key (the number of experts included: a point reads every expert
        of its store)."""
        cell = self.store_cell(name)
        return self.table.work / f"{cell.name}-{cell.hash[:8]}"

    def point_cell(self, p: Point) -> Cell:
        cfg = self.point_config(p)
        experts = self.store_cell(p.store).hash if p.store else None
        return Cell(p.name, {"kind": "distill-evaluate", "config": config_material(cfg), "data": data_key(cfg.data),
                             "experts": experts, "runs": int(self.opts.runs)})

    # ---- estimates and plan -------------------------------------------------------------------------------------
    def store_estimate(self, name: str) -> dict[str, float]:
        return store_estimate(self.store_config(name), self.cost)

    def estimate(self, p: Point) -> dict:
        """Estimated single-core seconds of a point: distillation, the store parts it reads (in full and amortised
        over the points that read them), its evaluation."""
        cfg = self.point_config(p)
        store_full = store_amortised = 0.0
        width = None
        if p.store:
            parts, users = self.store_estimate(p.store), self.users(p.store)
            for k in kinds_read(cfg):
                store_full += parts.get(k, 0.0)
                store_amortised += parts.get(k, 0.0) / max(1, len(users.get(k, [])))
            e = self.store_config(p.store).experts
            width = (e.model.args or {}).get("width", 128)
        distill = distill_estimate(cfg, self.cost, width)
        return {"distill": distill, "store": store_full, "store_amortised": store_amortised,
                "compute": distill + store_full, "compute_amortised": distill + store_amortised,
                "eval": eval_estimate(int(self.opts.runs), self.cost)}

    def knobs(self, p: Point) -> str:
        """The point's scale in a few words."""
        d = self.point_config(p).distill
        from ..distill import DISTILLERS

        if getattr(DISTILLERS[d.method], "one_shot", False):
            return "selection only"
        out = f"{d.iterations} it"
        if d.method == "tm":
            out += ", N " + "+".join(str(ph.syn_steps) for ph in d.phases)
            out += ", W " + "/".join(str(ph.max_start_epoch) for ph in d.phases)
        if d.method in ("dm", "dc", "dsa"):
            out += f", width {((d.options or {}).get('model') or {}).get('args', {}).get('width', 128)}"
        if p.store:
            e = self.store_config(p.store).experts
            n = 2 if e.kind == "debiased" else e.num_experts
            out += f"; {p.store}: {n} x {e.train.epochs} ep, width {(e.model.args or {}).get('width', 128)}"
        return out

    def plan(self) -> tuple[list[dict], list[dict]]:
        """(store rows, point rows): name, state, key hash, preset, scale and estimates; computes nothing."""
        stores = []
        for s in self.used_stores():
            cell, e = self.store_cell(s), self.store_config(s).experts
            parts = self.store_estimate(s)
            what = (f"observer + teacher x {e.train.epochs} epochs" if e.kind == "debiased" else
                    f"{e.num_experts} x {e.train.epochs} epochs" + (f" + classifier x {e.classifier_train.epochs}"
                                                                    if e.classifier_experts else ""))
            what += f", width {(e.model.args or {}).get('width', 128)}"
            stores.append({"cell": cell.name, "hash": cell.hash, "state": self.table.state(
                cell, self.store_dir(s) / "store.json"), "preset": self.stores[s][0], "what": what,
                "estimate": sum(parts.values()), "parts": parts, "users": self.users(s)})
        points = []
        for p in self.points:
            cell = self.point_cell(p)
            state = self.table.state(cell, self.table.artifact(cell) / "checkpoint.safetensors")
            points.append({"cell": cell.name, "hash": cell.hash, "state": state, "method": p.method,
                           "preset": p.preset, "store": p.store, "what": self.knobs(p), "estimate": self.estimate(p)})
        return stores, points

    def total_estimate(self) -> dict:
        """Single-core seconds to fill the table: every store once, every distillation and evaluation."""
        stores = sum(sum(self.store_estimate(s).values()) for s in self.used_stores())
        est = [self.estimate(p) for p in self.points]
        distill, evals = sum(e["distill"] for e in est), sum(e["eval"] for e in est)
        return {"stores": stores, "distill": distill, "eval": evals, "total": stores + distill + evals}

    # ---- run ----------------------------------------------------------------------------------------------------
    def _data(self, cfg: RunConfig, cache: dict):
        from ..data import prepare_data

        k = key_hash(data_key(cfg.data))
        if k not in cache:
            cache[k] = prepare_data(cfg.data)
        return cache[k]

    def fill_store(self, name: str, data, wait: bool) -> bool:
        """Train the store's experts that nobody is training; with ``wait``, also wait for those another process
        trains (a dead one's are taken over). True once the store is complete (:func:`fill_store`)."""
        return fill_store(self.table, self.store_cell(name), self.store_config(name).experts, self.store_dir(name),
                          data, wait=wait, poll_s=self.opts.poll_s, label=f"store {name}")

    def _point(self, p: Point, cache: dict) -> None:
        cfg = self.point_config(p)
        cell = self.point_cell(p)
        store = self.store_dir(p.store) if p.store else None
        self.table.cell(cell, lambda: timed_distill_evaluate(cfg, self._data(cfg, cache), self.table.artifact(cell),
                                                             experts_dir=store, runs=int(self.opts.runs),
                                                             device=self.table.device), deal=False)

    def selected(self) -> list[Point]:
        """The points ``--points`` names, in its order ([] when it names none); an unknown name is an error."""
        by_name = {p.name: p for p in self.points}
        unknown = [n for n in self.opts.only if n not in by_name]
        if unknown:
            raise LtddError(f"--points: no point {', '.join(map(repr, unknown))} in the {TABLE} table (known: "
                            f"{', '.join(by_name)})")
        return [by_name[n] for n in dict.fromkeys(self.opts.only)]

    def run(self) -> None:
        """Compute every point and store not done yet, cheapest point first (by estimate) so that the report fills
        early: a store is trained when its first point comes (the experts nobody else is training); a point whose
        store another process is still finishing waits for the second pass. With ``--points``, only those points, in
        the order given."""
        cache: dict = {}
        pending = self.selected() or sorted(self.points, key=lambda p: self.estimate(p)["compute"])
        for wait in (False, True):
            for p in list(pending):
                if p.store and self.table.fresh(self.point_cell(p)) is None and not self.fill_store(
                        p.store, self._data(self.store_config(p.store), cache), wait=wait):
                    continue
                self._point(p, cache)
                pending.remove(p)

    def collect(self) -> tuple[dict, dict, list[str]]:
        """``({point: result}, {store: record}, stale cell names)`` of the finished cells under the current keys."""
        results, stores, stale = {}, {}, []
        for s in self.used_stores():
            cell = self.store_cell(s)
            rec = self.table.fresh(cell)
            if rec is not None:
                stores[s] = rec
            elif self.table.record(cell.name) is not None:
                stale.append(cell.name)
        for p in self.points:
            cell = self.point_cell(p)
            res = self.table.fresh(cell)
            if res is not None:
                results[p.name] = res
            elif self.table.record(cell.name) is not None:
                stale.append(cell.name)
        return results, stores, stale


def fill_store(table: CellTable, cell: Cell, e, folder: Path, data, *, wait: bool, poll_s: float,
               label: str) -> bool:
    """Train the experts of store ``folder`` (configuration ``e``) that nobody is training; with ``wait``, also wait
    for those another process trains (a dead one's are taken over). True once the store is complete; its cell then
    records the seconds of every expert from the store's training log."""
    from ..experts import train_experts

    if table.fresh(cell) is not None:
        return True
    while True:
        res = train_experts(e, data, folder, device=table.device, progress=False)
        if _complete(e, res["available"]):
            if table.fresh(cell) is None:
                table.save(cell, store_record(e, folder))
                log(f"{label}: complete ({folder})")
            return True
        if not wait:
            return False
        log(f"{label}: waiting for experts another process is training")
        time.sleep(poll_s)


def _complete(e, available: dict) -> bool:
    if e.kind == "debiased":
        return all(available.values())
    need = {"representation": e.num_experts, "classifier": e.num_experts if e.classifier_experts else 0}
    return all(available.get(k, 0) >= n for k, n in need.items())


def store_record(e, folder: Path) -> dict:
    """A complete store's cell: the seconds of each kind of expert (summed from its training log: one record per
    expert, the last if it was trained twice), their total and this process's torch threads."""
    from ..debiased_experts import DebiasedStore
    from ..experts import TrajectoryStore

    store = DebiasedStore(folder) if e.kind == "debiased" else TrajectoryStore(folder)
    last: dict = {}
    for rec in store.read_log():
        kind = rec.get("expert") if e.kind == "debiased" else rec.get("kind")
        last[(kind, rec.get("expert"))] = float(rec.get("seconds", 0.0))
    parts: dict[str, float] = {}
    for (kind, _), s in last.items():
        parts[kind] = parts.get(kind, 0.0) + s
    return {"expert_seconds": parts, "seconds": sum(parts.values()), "experts": len(last),
            "threads": torch.get_num_threads()}


def timed_distill(cfg: RunConfig, data, out: Path, *, experts_dir, device=None) -> dict:
    """Distil into ``out`` unless it holds a finished set, timed; the timing is kept beside the set
    (``timing.json``), so a run killed later keeps it. A distillation resumed from a checkpoint records the iteration
    it resumed at and its seconds extrapolated to the whole run (``distill_seconds_full``)."""
    from .kinds import ensure_distilled

    timing = out / "timing.json"
    if (out / "distilled.safetensors").is_file() and timing.is_file():
        return json.loads(timing.read_text())
    if (out / "distilled.safetensors").is_file():
        return {"distill_seconds": None, "note": "distilled by an earlier run that did not time it"}
    start = checkpoint_iteration(out / "checkpoint.safetensors")
    seconds = ensure_distilled(cfg, data, out, experts_dir=experts_dir, device=device)
    n = int(cfg.distill.iterations)
    t = {"distill_seconds": seconds, "resumed_from": start, "iterations": n, "threads": torch.get_num_threads()}
    if 0 < start < n:
        t["distill_seconds_full"] = seconds * n / (n - start)
    save_json(timing, t)
    return t


def timed_distill_evaluate(cfg: RunConfig, data, out: Path, *, experts_dir, runs: int, device=None) -> dict:
    """:func:`timed_distill`, then evaluate with the configuration's protocol."""
    from .kinds import distill_evaluate

    t = timed_distill(cfg, data, out, experts_dir=experts_dir, device=device)
    res = distill_evaluate(cfg, data, out, experts_dir=experts_dir, runs=runs, device=device)
    res.update({k: v for k, v in t.items() if k != "threads"})
    res["distill_threads"] = t.get("threads", torch.get_num_threads())
    res["seconds"] = (t["distill_seconds"] or 0.0) + res["eval_seconds"]
    res["threads"] = torch.get_num_threads()
    return res
