"""The LAD paper's Table 1 on CIFAR-10-LT as a grid of cells (IF, IPC, method): configs, keys, plan and run.

Methods are preset names (``lad``, ``datm``, ``mtt``, ``dm``, ``dc``, coresets, ...), the full-data rows (``erm``,
``crt``, ``balanced_softmax``: trained on the whole long-tailed set, one cell per IF), ``<method>-init`` (the
method's initial set evaluated with no distillation iteration), ``<method>@<N>`` (N iterations instead of the
preset's) and named variants ``NAME=PRESET:key=value,...``. MTT, DATM and LAD share one expert store per IF. LAD
runs its released configuration for (IF, IPC) where there is one, under every profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, TrainConfig, list_presets, load_preset
from ..errors import LtddError
from .cells import TableOptions, Cell, CellTable, barrier, config_material, data_key, log, material, store_folder

__all__ = ["TABLE", "DEFAULT_ROOT", "CIFAR10_CLASSES", "DEFAULT_METHODS", "FULL_DATA", "TRAJECTORY", "INIT_SUFFIX",
           "LadOptions", "LadGrid", "parse_variant", "col_name", "cell_name", "full_data_cell", "full_train_config",
           "released_preset", "CRT_EPOCHS"]

TABLE = "lad-cifar10lt"
DEFAULT_ROOT = "${LTDD_DATA}/cifar10-jpeg.tar.gz"  # as the presets say: $LTDD_DATA is the folder of the datasets
# the CIFAR-10 batches' label names in label order (= head to tail: the long-tailed split keeps the natural order)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_METHODS = ("random", "dc", "dm", "mtt", "datm", "lad", "erm", "crt")
DEFAULT_IFS = (10, 100)
FULL_DATA = ("erm", "crt", "balanced_softmax")  # trained on the real long-tailed set: one cell per IF, no IPC
TRAJECTORY = ("mtt", "datm", "lad", "lad-no-dam", "lad-no-ed")  # need the expert store
INIT_SUFFIX = "-init"
CRT_EPOCHS = 10


def default_ipcs(profile: str) -> tuple[int, ...]:
    return (10,) if profile == "cpu" else (10, 50)


def default_full_epochs(profile: str) -> int:
    return 30 if profile == "cpu" else 200


def full_train_config(full_epochs: int) -> TrainConfig:
    """How a full-data row trains on the whole long-tailed set (the protocol's network)."""
    return TrainConfig(epochs=int(full_epochs), lr=0.01, batch_size=256, schedule="cosine", dsa=True)


def full_runs(profile: str, runs: int) -> int:
    return 1 if profile == "cpu" else int(runs)  # cpu: one seed (time)


def full_data_cell(name: str, method: str, data_cfg, model_cfg, *, profile: str, runs: int,
                   full_epochs: int) -> Cell:
    """A full-data cell (ERM, cRT, ...) on the data of ``data_cfg`` with the network ``model_cfg``; other tables
    build theirs here too, so a record under the same key can be shared between them."""
    return Cell(name, {"kind": "full-data", "method": method, "data": data_key(data_cfg), "model": material(model_cfg),
                       "train": material(full_train_config(full_epochs)), "runs": full_runs(profile, runs),
                       "crt_epochs": CRT_EPOCHS})


def ints(text) -> tuple[int, ...]:
    """``"10,100"`` (or a sequence) -> (10, 100); a bad number is a one-line error."""
    if isinstance(text, (list, tuple)):
        return tuple(int(x) for x in text)
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise LtddError(f"expected comma-separated integers, got '{text}'") from None


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """``NAME=PRESET:key=value,key=value`` -> (NAME, PRESET, overrides)."""
    name, eq, rest = text.partition("=")
    preset, colon, over = rest.partition(":")
    if not eq or not colon or not name.strip() or not preset.strip() or "@" in name or name.endswith(INIT_SUFFIX):
        raise LtddError(f"--variant '{text}': expected NAME=PRESET:key=value[,key=value...] (NAME without @ or "
                        f"a '{INIT_SUFFIX}' ending)")
    pairs = [o.strip() for o in over.split(",") if o.strip()]
    if not pairs or any("=" not in o for o in pairs):
        raise LtddError(f"--variant '{text}': the overrides must be key=value pairs")
    return name.strip(), preset.strip(), pairs


@dataclass
class LadOptions(TableOptions):
    """What the LAD table computes and where; ``None`` fields take the profile's defaults."""

    TABLE_NAME = TABLE

    profile: str = "cpu"
    root: str = DEFAULT_ROOT
    ifs: tuple[int, ...] = DEFAULT_IFS
    ipcs: tuple[int, ...] | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    variants: tuple[str, ...] = ()  # NAME=PRESET:key=value,... texts
    runs: int = 3
    full_epochs: int | None = None
    device: str | None = None
    work: str | None = None
    results: str = "results"
    variant_map: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        if self.profile not in ("cpu", "gpu"):
            raise LtddError(f"unknown profile '{self.profile}' (known: cpu, gpu)")
        self.ifs = ints(self.ifs)
        self.ipcs = ints(self.ipcs) if self.ipcs is not None else default_ipcs(self.profile)
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        self.methods = tuple(self.methods)
        self.variants = tuple(self.variants)
        if self.full_epochs is None:
            self.full_epochs = default_full_epochs(self.profile)
        if self.profile == "gpu":
            self.runs = max(int(self.runs), 5)
        for v in self.variants:
            name, preset, over = parse_variant(v)
            if preset not in list_presets():
                raise LtddError(f"--variant '{v}': unknown preset '{preset}' (see `ltdd presets`)")
            self.variant_map[name] = (preset, over)
        if not self.ifs or not self.ipcs or not self.methods:
            raise LtddError("--ifs, --ipcs and --methods must each name at least one value")
        known = set(list_presets()) | set(FULL_DATA)
        for m in self.methods:
            base = m if m in FULL_DATA else self.base_method(m)[0]
            if base not in known:
                raise LtddError(f"unknown method '{m}' in --methods (known: presets, {', '.join(FULL_DATA)}, "
                                f"--variant names, with an optional '{INIT_SUFFIX}' or '@<iterations>' suffix)")


    def base_method(self, method: str) -> tuple[str, list[str]]:
        """(preset, overrides) of a method name: ``lad`` -> (lad, []); ``lad-init`` -> (lad, [iterations=0]);
        ``lad@300`` -> (lad, [iterations=300]); a variant name -> its preset and overrides (suffixes apply to
        variants too)."""
        extra: list[str] = []
        if method.endswith(INIT_SUFFIX):  # the method's initialisation alone: images and soft labels, no iteration
            method, extra = method[: -len(INIT_SUFFIX)], ["distill.iterations=0"]
        elif "@" in method:
            name, _, its = method.partition("@")
            if not its.isdigit():
                raise LtddError(f"method '{method}': the part after @ must be a number of iterations")
            method, extra = name, [f"distill.iterations={int(its)}"]
        if method in self.variant_map:
            preset, over = self.variant_map[method]
            return preset, over + extra
        return method, extra

    def needs_experts(self, method: str) -> bool:
        return method not in FULL_DATA and self.base_method(method)[0] in TRAJECTORY


def col_name(IF: int, ipc: int) -> str:
    return f"if{IF}-ipc{ipc}"


def cell_name(IF: int, ipc: int, method: str) -> str:
    """A cell's name. Full-data cells are shared by every IPC of an IF; IPC 10 cells keep the short names of the
    first (IPC 10 only) version of the table."""
    if method in FULL_DATA or ipc == 10:
        return f"if{IF}-{method}"
    return f"if{IF}-ipc{ipc}-{method}"


def released_preset(method: str, IF: int, ipc: int) -> str | None:
    """LAD's released configuration for (IF, IPC) on CIFAR-10-LT, when there is one (under every profile: its own
    lambdas, windows and learning rates, scaled by the profile)."""
    name = f"lad-cifar10-if{IF}-ipc{ipc}"
    return name if method == "lad" and name in list_presets() else None


class LadGrid:
    """The cells of the LAD table for one set of options, with their configurations and keys."""

    def __init__(self, opts: LadOptions, device=None):
        self.opts = opts
        self.table = CellTable(opts.table, opts.work_dir(), opts.results, device)
        self._experts: dict[tuple[int, int], RunConfig] = {}

    @property
    def preset_profile(self) -> str | None:
        return "cpu" if self.opts.profile == "cpu" else None

    def columns(self) -> list[tuple[int, int]]:
        """The table's columns: (IF, IPC) pairs."""
        return [(IF, ipc) for IF in self.opts.ifs for ipc in self.opts.ipcs]

    # ---- configurations -----------------------------------------------------------------------------------------
    def method_config(self, method: str, IF: int, ipc: int) -> tuple[str, RunConfig]:
        """(preset name, resolved config) of a distillation cell: LAD's released configuration for (IF, IPC) where
        there is one, else the method's preset at the profile with the IF and IPC set."""
        o = self.opts
        base, extra = o.base_method(method)
        released = released_preset(base, IF, ipc)
        if released:
            return released, load_preset(released, self.preset_profile, [f"data.root={o.root}"] + extra)
        over = [f"data.imbalance_factor={IF}", f"data.root={o.root}", f"distill.ipc={ipc}"]
        return base, load_preset(base, self.preset_profile, over + extra)

    def store_epochs(self, IF: int, ipc: int) -> int:
        """Epochs of the representation experts a column needs: the LAD preset's, or more where LAD's released
        configuration for (IF, IPC) starts later (e.g. IPC 50's wider start window). Columns that need the same
        number share one store; a column that needs more gets its own, so adding it never changes the others."""
        p = self.preset_profile
        released = released_preset("lad", IF, ipc)
        need = load_preset(released, p).experts.train.epochs if released else 0
        return max(load_preset("lad", p).experts.train.epochs, need)

    def expert_config(self, IF: int, ipc: int | None = None) -> RunConfig:
        """The expert store of a column: the LAD preset's experts (representation + classifier experts), shared by
        MTT, DATM and LAD so that they are compared on the same trajectories. ``ipc=None``: the base store of the
        IF (the LAD preset's epochs). Its data is the data of every cell of that IF."""
        epochs = self.store_epochs(IF, ipc) if ipc is not None else load_preset("lad", self.preset_profile).experts.train.epochs
        key = (IF, epochs)
        if key not in self._experts:
            self._experts[key] = load_preset("lad", self.preset_profile, [
                f"data.imbalance_factor={IF}", f"data.root={self.opts.root}", f"experts.train.epochs={epochs}"])
        return self._experts[key]

    def store_columns(self, IF: int) -> dict[int, list[int]]:
        """{epochs: [IPCs]} of the IF's expert stores for the requested columns."""
        out: dict[int, list[int]] = {}
        for ipc in self.opts.ipcs:
            out.setdefault(self.store_epochs(IF, ipc), []).append(ipc)
        return out

    def full_train_config(self) -> TrainConfig:
        return full_train_config(self.opts.full_epochs)

    def full_runs(self) -> int:
        return full_runs(self.opts.profile, self.opts.runs)

    # ---- cells and keys -----------------------------------------------------------------------------------------
    def experts_cell(self, IF: int, ipc: int | None = None) -> Cell:
        base = self.expert_config(IF, ipc)
        default = load_preset("lad", self.preset_profile).experts.train.epochs
        epochs = base.experts.train.epochs
        name = f"experts-if{IF}" if epochs == default else f"experts-if{IF}-e{epochs}"
        return Cell(name, {"kind": "experts", "experts": material(base.experts), "data": data_key(base.data)})

    def store_dir(self, IF: int, ipc: int | None = None) -> Path:
        """The expert store of a column (named by its key without the number of experts)."""
        return store_folder(self.table.work, self.experts_cell(IF, ipc))

    def cell(self, IF: int, ipc: int, method: str) -> tuple[Cell, str, RunConfig | None]:
        """(cell, preset, config) of one grid position; full-data cells have preset '-' and no run config."""
        base = self.expert_config(IF)
        data = data_key(base.data)
        name = cell_name(IF, ipc, method)
        if method in FULL_DATA:
            return full_data_cell(name, method, base.data, base.protocol_config().model, profile=self.opts.profile,
                                  runs=self.opts.runs, full_epochs=self.opts.full_epochs), "-", None
        preset, cfg = self.method_config(method, IF, ipc)
        experts = self.experts_cell(IF, ipc).hash if self.opts.needs_experts(method) else None
        return Cell(name, {"kind": "distill-evaluate", "config": config_material(cfg), "data": data,
                           "experts": experts, "runs": self.opts.runs}), preset, cfg

    def positions(self):
        """Every (IF, IPC, method) of the grid, once per cell (full-data cells: under the first IPC)."""
        seen = set()
        for IF, ipc in self.columns():
            for m in self.opts.methods:
                name = cell_name(IF, ipc, m)
                if name not in seen:
                    seen.add(name)
                    yield IF, ipc, m

    # ---- plan, run, results -------------------------------------------------------------------------------------
    def plan(self) -> list[dict]:
        """Every cell of the table with what it will run and its state; computes nothing."""
        from ..distill import DISTILLERS

        rows = []
        for IF, ipc, m in self.positions():
            cell, preset, cfg = self.cell(IF, ipc, m)
            row = {"cell": cell.name, "hash": cell.hash, "IF": IF, "ipc": None if cfg is None else ipc,
                   "method": m, "preset": preset}
            if cfg is None:
                rows.append({**row, "state": self.table.state(cell),
                             "what": f"full long-tailed set, {self.opts.full_epochs} epochs"})
                continue
            d = cfg.distill
            one_shot = getattr(DISTILLERS[d.method], "one_shot", False)
            what = f"ipc {d.ipc}, " + ("one-shot selection" if one_shot else f"{d.iterations} iterations")
            if self.opts.needs_experts(m):
                what += ", phases " + ", ".join(f"{ph.name}(N={ph.syn_steps}, M={ph.expert_epochs}, "
                                                f"start<{ph.max_start_epoch}, {ph.match})" for ph in d.phases)
                e = self.expert_config(IF, ipc).experts
                what += f"; experts {e.num_experts} x {e.train.epochs} epochs"
            state = self.table.state(cell, self.table.artifact(cell) / "checkpoint.safetensors")
            rows.append({**row, "state": state, "what": what})
        return rows

    def expert_plan(self) -> list[dict]:
        """The expert stores the table needs, with their state."""
        out = []
        for IF in self.opts.ifs:
            if not any(self.opts.needs_experts(m) for m in self.opts.methods):
                continue
            for epochs, ipcs in self.store_columns(IF).items():
                cell = self.experts_cell(IF, ipcs[0])
                e = self.expert_config(IF, ipcs[0]).experts
                store = self.store_dir(IF, ipcs[0])
                state = self.table.state(cell, store / "store.json")
                out.append({"cell": cell.name, "hash": cell.hash, "state": state, "preset": "lad",
                            "what": f"{e.num_experts} x {e.train.epochs} epochs (+ classifier experts x "
                                    f"{e.classifier_train.epochs}) for IPC {', '.join(map(str, ipcs))} in {store}"})
        return out

    def run(self) -> None:
        """Compute every cell this process owns (reusing finished ones)."""
        from ..data import prepare_data
        from .kinds import distill_evaluate, fill_experts, full_data

        o, table = self.opts, self.table
        for IF in o.ifs:
            base = self.expert_config(IF)
            data = prepare_data(base.data)
            if any(o.needs_experts(m) for m in o.methods):
                for epochs, ipcs in self.store_columns(IF).items():
                    store = self.store_dir(IF, ipcs[0])
                    log(f"IF {IF}: experts for IPC {', '.join(map(str, ipcs))} ({store})")
                    fill_experts(self.expert_config(IF, ipcs[0]).experts, data, store, table,
                                 self.experts_cell(IF, ipcs[0]))
                barrier()
            for ipc in o.ipcs:
                store = self.store_dir(IF, ipc)
                for m in o.methods:
                    cell, _, cfg = self.cell(IF, ipc, m)
                    if cfg is None:
                        proto = base.protocol_config()
                        table.cell(cell, lambda cell=cell, m=m, proto=proto: full_data(
                            data, m, proto.model, self.full_train_config(), runs=self.full_runs(),
                            device=table.device, crt_epochs=CRT_EPOCHS, checkpoint_dir=table.artifact(cell)))
                        continue
                    experts = store if o.needs_experts(m) else None
                    table.cell(cell, lambda cell=cell, cfg=cfg, experts=experts: distill_evaluate(
                        cfg, data, table.artifact(cell), experts_dir=experts, runs=o.runs, device=table.device))

    def collect(self) -> tuple[dict, list[str]]:
        """``({column name: {method: result}}, stale cell names)`` for the cells of the requested columns; a cell
        recorded under another key is left out (stale)."""
        results: dict = {}
        stale: list[str] = []
        for IF, ipc in self.columns():
            for m in self.opts.methods:
                cell = self.cell(IF, ipc, m)[0]
                res = self.table.fresh(cell)
                if res is not None:
                    results.setdefault(col_name(IF, ipc), {})[m] = res
                elif self.table.record(cell.name) is not None and cell.name not in stale:
                    stale.append(cell.name)
        return results, stale
