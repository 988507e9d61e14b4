"""The two-stage paper's Tables 1-3 on CIFAR-10-LT (n_max 1000, IF 100, IPC 10) as a grid of keyed cells.

In order (every step resumable):

1. the paper's split: CIFAR-10, exponential profile, n_max = 1000, IF 100 -> 2,478 training images; the balanced
   10k test set; a balanced probe split of 200 unused training images per class for the grouping;
2. Original flat: ConvNet-3 trained on the 2,478 real images (``runs`` seeds);
3. the groups: the run-0 Original-flat model embeds the probe split, per-class k-means with M centres, the class
   distance, exhaustive max-cut into two groups (:func:`ltdd.grouping.grouping_of`), ranked against the paper's
   candidate splits and a frequency split;
4. a GM (= DC) distilled set with the ``dc`` preset and an MTT set with the ``mtt`` preset on its own small expert
   store; GM flat and MTT flat;
5. the two-stage rows (Original + GM, Original + MTT, Original + Original, GM + GM): a 2-way group classifier on the
   stage-1 data, one intra-group classifier per group on the stage-2 images of its classes; hard routing as the
   paper, plus soft routing and the group-prior correction from the same networks (:mod:`ltdd.two_stage`);
6. the partition each flat model gives (stability across seeds and training sets, against a random control).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DataConfig, ModelConfig, TrainConfig, load_preset, save_json
from ..errors import LtddError
from .cells import TableOptions, Cell, CellTable, config_material, data_key, log, material, store_folder
from .lad_table import DEFAULT_ROOT
from .netstore import NetStore
from .paper import two_stage_paper

__all__ = ["TABLE", "ROWS", "SOURCE_LABEL", "TwoStageOptions", "TwoStageGrid", "profile_settings"]

TABLE = "two-stage"
NUM_TRAIN = 2478  # the paper's split: [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
NUM_CLASSES = 10
# row name -> (label, table, stage-1 source, stage-2 source); flat rows have stage 2 = None
ROWS = {
    "original_flat": ("Original (flat)", 1, "real", None),
    "gm_flat": ("GM (flat)", 1, "gm", None),
    "mtt_flat": ("MTT (flat)", 1, "mtt", None),
    "original+gm": ("Original + GM", 2, "real", "gm"),
    "original+mtt": ("Original + MTT", 2, "real", "mtt"),
    "original+original": ("Original + Original", 3, "real", "real"),
    "gm+gm": ("GM + GM", 3, "gm", "gm"),
}
TWO_STAGE_ORDER = ("original+gm", "original+mtt", "gm+gm", "original+original")  # the order rows are computed in
SOURCE_LABEL = {"real": "Original (2,478 real LT images)", "gm": "GM / DC distilled (IPC 10)",
                "mtt": "MTT distilled (IPC 10)"}
STABILITY_RANDOM = 1000  # random partitions of the stability control


@dataclass
class TwoStageOptions(TableOptions):
    """What the two-stage table computes and where; ``None`` fields take the profile's defaults."""

    TABLE_NAME = TABLE

    profile: str = "cpu"
    root: str = DEFAULT_ROOT
    runs: int = 3
    device: str | None = None
    work: str | None = None
    results: str = "results"
    threads: int | None = None
    width: int | None = None
    real_epochs: int | None = None
    syn_epochs: int | None = None
    gm_iterations: int | None = None
    mtt_iterations: int | None = None
    mtt_experts: int | None = None
    expert_epochs: int | None = None
    mtt_lr_lr: float | None = None
    M: int | None = None
    raw_pixels: bool | None = None
    seed: int = 0

    def __post_init__(self):
        if self.profile not in ("cpu", "gpu"):
            raise LtddError(f"unknown profile '{self.profile}' (known: cpu, gpu)")
        if self.profile == "gpu":
            self.runs = max(int(self.runs), 5)
        self.M = int(self.M or 5)
        self.raw_pixels = bool(self.raw_pixels)



def profile_settings(o: TwoStageOptions) -> dict:
    """The scale of a profile. ``cpu``: sized for ~45 min on 2 shared CPU cores; ``gpu``: the paper's scale (every
    network 300 epochs at width 128, the presets' full distillation)."""
    if o.profile == "cpu":
        return {
            "width": int(o.width or 32),
            "real_epochs": int(o.real_epochs or 20),
            "syn_epochs": int(o.syn_epochs or 200),
            "dc_overrides": [f"distill.iterations={int(o.gm_iterations or 20)}"],
            "mtt_overrides": [f"experts.num_experts={int(o.mtt_experts or 3)}",
                              f"experts.train.epochs={int(o.expert_epochs or 12)}",
                              f"distill.iterations={int(o.mtt_iterations or 60)}",
                              # the preset's lr_lr 1e-5 collapses the learned step size to its floor (1e-6) at
                              # iteration 0 on un-whitened pixels (initial matching loss ~8), which freezes the
                              # images at their real init; 1e-7 lets the step size adapt slowly instead (measured)
                              f"distill.lr_lr={float(o.mtt_lr_lr or 1e-7):g}"],
            "probe_per_class": 200,
            "preset_profile": "cpu",
        }
    return {"width": int(o.width or 128), "real_epochs": 300, "syn_epochs": 300,
            "dc_overrides": [], "mtt_overrides": [], "probe_per_class": 200, "preset_profile": None}


def gsig(groups) -> str:
    return "-".join("".join(str(c) for c in g) for g in groups)


class TwoStageGrid:
    """The cells of the two-stage table for one set of options, their keys, the plan and the run."""

    def __init__(self, opts: TwoStageOptions, device=None, data_config: DataConfig | None = None):
        """``data_config``: other data than the paper's split (tests, other datasets); ten classes."""
        o = self.opts = opts
        self.settings = st = profile_settings(opts)
        self.table = CellTable(o.table, o.work_dir(), o.results, device)
        self.seeds = [o.seed * 1000 + r for r in range(int(o.runs))]
        self.dcfg = data_config or DataConfig(dataset="cifar10", root=o.root, imbalance_factor=100.0,
                                              max_per_class=1000, zca=False, normalize=not o.raw_pixels,
                                              probe_per_class=st["probe_per_class"])
        self.expect_train = NUM_TRAIN if data_config is None else None
        self.model_cfg = ModelConfig("convnet", {"width": st["width"]})
        self.train_cfg = TrainConfig(epochs=300, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256,
                                     schedule="constant", dsa=False)
        data_over = [f"data.root={o.root}", "data.imbalance_factor=100", "data.max_per_class=1000", "data.zca=false",
                     f"data.normalize={'false' if o.raw_pixels else 'true'}"]
        self.dc_cfg = load_preset("dc", st["preset_profile"], data_over + st["dc_overrides"])
        self.mtt_cfg = load_preset("mtt", st["preset_profile"], data_over + st["mtt_overrides"])
        _, _, self.references = two_stage_paper()
        dk = self.data_key = data_key(self.dcfg)
        self.data_cell = Cell("data", {"kind": "data", "data": dk})
        self.gm_cell = Cell("distill-gm", {"kind": "distilled-set", "config": config_material(self.dc_cfg), "data": dk})
        self.experts_cell = Cell("experts-mtt", {"kind": "experts", "experts": material(self.mtt_cfg.experts),
                                                 "data": dk})
        self.mtt_cell = Cell("distill-mtt", {"kind": "distilled-set", "config": config_material(self.mtt_cfg),
                                             "data": dk, "experts": self.experts_cell.hash})
        sources = {"real": "real", "gm": self.gm_cell.hash, "mtt": self.mtt_cell.hash}
        epochs = {"real": st["real_epochs"], "gm": st["syn_epochs"], "mtt": st["syn_epochs"]}
        self.nets = NetStore(self.table.work / "nets", self.model_cfg, self.train_cfg, dk, sources, epochs, device)
        self.grouping_cell = Cell("grouping", {
            "kind": "grouping", "net": self.nets.key(*self.flat_net("real", self.seeds[0])), "features": "probe",
            "k": 2, "M": o.M, "method": "exhaustive", "top": 5, "seed": o.seed, "references": self.references})
        self.stability_cell = Cell("grouping-stability", {
            "kind": "grouping-stability", "grouping": self.grouping_cell.hash, "M": o.M, "seed": o.seed,
            "n_random": STABILITY_RANDOM,
            "nets": [self.nets.key(*self.flat_net(src, s)) for src in ("real", "gm", "mtt") for s in self.seeds]})

    # ---- cells --------------------------------------------------------------------------------------------------
    def flat_net(self, src: str, seed: int) -> tuple[str, str, int, int]:
        return f"flat-{src}-s{seed}", src, NUM_CLASSES, seed

    def row_cell(self, row: str) -> Cell:
        _, _, st1, st2 = ROWS[row]
        return Cell(row, {"kind": "flat-row" if st2 is None else "two-stage-row", "row": row,
                          "stage1": self.nets.sources[st1], "stage2": self.nets.sources[st2] if st2 else None,
                          "epochs": {s: self.nets.epochs[s] for s in {st1, st2} - {None}},
                          "grouping": self.grouping_cell.hash, "seeds": self.seeds, "model": material(self.model_cfg),
                          "train": material(self.train_cfg), "data": self.data_key})

    def cells(self) -> list[tuple[Cell, str, str, Path | None]]:
        """Every cell in the order of the run: (cell, preset, what it runs, file whose presence means partial)."""
        st, o = self.settings, self.opts
        gm, mtt, ex = self.dc_cfg.distill, self.mtt_cfg.distill, self.mtt_cfg.experts
        pixels = "raw [0, 1] pixels" if o.raw_pixels else "per-channel standardised pixels"
        d = self.dcfg
        split = (f"CIFAR-10-LT n_max 1000, IF 100 ({NUM_TRAIN} images)" if self.expect_train else
                 f"{d.dataset}, IF {d.resolved_imbalance_factor():g}")
        out = [(self.data_cell, "-", f"{split}, probe {d.probe_per_class} per class, {pixels}", None),
               (self.grouping_cell, "-", f"run-0 Original-flat model (width {st['width']}, {st['real_epochs']} "
                                         f"epochs), probe features, M = {o.M}, exhaustive max-cut", None)]
        rows = {r: (self.row_cell(r), "-", self._row_text(r), None) for r in ROWS}
        out += [rows["original_flat"],
                (self.gm_cell, "dc", f"ipc {gm.ipc}, {gm.iterations} iterations",
                 self.table.artifact(self.gm_cell) / "checkpoint.safetensors"),
                rows["gm_flat"],
                (self.experts_cell, "mtt", f"{ex.num_experts} x {ex.train.epochs} epochs, width "
                                           f"{ex.model.args.get('width', 128)}",
                 store_folder(self.table.work, self.experts_cell) / "store.json"),
                (self.mtt_cell, "mtt", f"ipc {mtt.ipc}, {mtt.iterations} iterations, lr_lr {mtt.lr_lr:g}",
                 self.table.artifact(self.mtt_cell) / "checkpoint.safetensors"),
                rows["mtt_flat"]]
        out += [rows[r] for r in TWO_STAGE_ORDER]
        out.append((self.stability_cell, "-", f"the partition of each flat model ({3 * len(self.seeds)} models) vs "
                                              f"{STABILITY_RANDOM} random splits", None))
        return out

    def _row_text(self, row: str) -> str:
        label, _, st1, st2 = ROWS[row]
        ep = lambda s: f"{self.nets.epochs[s]} epochs"  # noqa: E731
        stages = f"{st1} ({ep(st1)})" + (f" + {st2} ({ep(st2)})" if st2 else "")
        return f"{label}: {stages}, width {self.settings['width']}, {len(self.seeds)} seeds"

    def plan(self) -> list[dict]:
        return [{"cell": c.name, "hash": c.hash, "preset": preset, "what": what,
                 "state": self.table.state(c, partial)} for c, preset, what, partial in self.cells()]

    def expected_nets(self, groups) -> list[tuple[str, str, int, int]]:
        """Every network of the table once the groups are known (name, source, outputs, seed)."""
        g = gsig(groups)
        nets = [self.flat_net(src, s) for src in ("real", "gm", "mtt") for s in self.seeds]
        for src in sorted({ROWS[r][2] for r in TWO_STAGE_ORDER}):
            nets += [(f"group-{src}-{g}-s{s}", src, len(groups), s) for s in self.seeds]
        for src in sorted({ROWS[r][3] for r in TWO_STAGE_ORDER}):
            nets += [(f"intra-{src}-{g}-g{gi + 1}-s{s}", src, len(grp), s + 1 + gi)
                     for s in self.seeds for gi, grp in enumerate(groups)]
        return nets

    # ---- run ----------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Compute every cell (reusing finished ones); writes the report after every row. Returns the report stem."""
        from ..data import prepare_data
        from ..evaluate import summarise
        from ..grouping import groups_to_labels, grouping_of, partition_stability
        from ..train import resolve_device
        from .kinds import fill_experts, flat_row_metrics, hard_label_set, two_stage_row_metrics

        o, table, nets = self.opts, self.table, self.nets
        t_start = time.time()
        table.device = nets.device = device = resolve_device(o.device)
        threads = o.threads if o.threads is not None else (1 if device.type == "cpu" else None)
        if threads:  # on 2 shared cores one thread per process is faster than two (measured)
            torch.set_num_threads(int(threads))
        timings: dict = {}
        self.trained_experts = None
        tpath = table.work / "timings.json"  # earlier calls' timings: this call's are added to them
        before = json.loads(tpath.read_text()) if tpath.is_file() else {}
        t0 = time.time()
        data = nets.data = prepare_data(self.dcfg)
        timings["data"] = time.time() - t0
        if self.expect_train is not None and len(data.train_y) != self.expect_train:
            raise LtddError(f"expected the paper's 2,478-image split, got {len(data.train_y)} images")
        log(f"data: {data.train_counts} ({len(data.train_y)} images), probe {tuple(data.probe_x.shape)}")
        table.require(self.data_cell, lambda: {"train_counts": list(data.train_counts),
                                               "class_names": list(data.class_names), "class_groups": data.groups,
                                               "num_train": int(len(data.train_y))})
        sources: dict = {"real": (data.train_x, data.train_y)}

        def write():
            return self.write_report(timings={**timings, "total_wall": time.time() - t_start}, before=before)

        # 2. Original flat, run 0 first: it defines the groups
        t0 = time.time()
        nets.get(*self._flat_args("real", self.seeds[0], sources))
        timings["original_flat_run0"] = time.time() - t0

        # 3. the groups
        flat0 = nets.model(*self.flat_net("real", self.seeds[0]))
        grouping = table.require(self.grouping_cell, lambda: grouping_of(
            flat0, data, k=2, M=o.M, method="exhaustive", top=5, seed=o.seed, references=self.references))
        groups = grouping["groups"]
        gof = torch.from_numpy(groups_to_labels(groups, data.num_classes))
        fig2 = grouping["references"]["paper_fig2_inferred"]
        log(f"groups: {grouping['group_names']} (cut {grouping['cut']:.1f}); paper's Fig. 2 split ranks "
            f"{fig2['rank']}/{fig2['of']}")

        def flat_row(row: str):
            src = ROWS[row][2]
            return [flat_row_metrics(data, nets.get(*self._flat_args(src, s, sources))["test_logits"], groups,
                                     len(sources[src][0])) for s in self.seeds]

        def stage_nets(src: str, s: int):
            x, y = sources[src]
            gcounts = torch.bincount(gof[y], minlength=len(groups))
            grec = nets.get(f"group-{src}-{gsig(groups)}-s{s}", src, x, gof[y], len(groups), s,
                            class_counts=gcounts.tolist())
            return grec, (gcounts.double() / gcounts.sum()).tolist(), int(len(x))

        def intra_nets(src: str, s: int):
            x, y = sources[src]
            recs, n = [], 0
            for gi, g in enumerate(groups):
                sel = torch.nonzero(gof[y] == gi).flatten()
                local = torch.full((data.num_classes,), -1, dtype=torch.long)
                local[g] = torch.arange(len(g))
                yl = local[y[sel]]
                recs.append(nets.get(f"intra-{src}-{gsig(groups)}-g{gi + 1}-s{s}", src, x[sel], yl, len(g),
                                     s + 1 + gi, class_counts=torch.bincount(yl, minlength=len(g)).tolist()))
                n += len(sel)
            return recs, n

        def two_stage_row(row: str):
            st1, st2 = ROWS[row][2], ROWS[row][3]
            per_run = []
            for s in self.seeds:
                grec, priors, n1 = stage_nets(st1, s)
                recs, n2 = intra_nets(st2, s)
                per_run.append(two_stage_row_metrics(data, groups, priors, grec["test_logits"],
                                                     [r["test_logits"] for r in recs], n1 + n2))
            return per_run

        def row_cell(row: str, fn):
            t0 = time.time()
            table.require(self.row_cell(row), lambda: {"summary": summarise(fn()), "row": row})
            timings[f"row_{row}"] = time.time() - t0
            write()

        def distilled(cell: Cell, cfg, experts_dir=None):
            out = table.artifact(cell)
            res = table.require(cell, lambda: hard_label_set(cfg, data, out, experts_dir=experts_dir, device=device))
            from ..synset import SyntheticSet

            syn = SyntheticSet.load(out)
            return syn.images, syn.labels.long(), res

        row_cell("original_flat", lambda: flat_row("original_flat"))

        # 4. distilled sets: GM (DC preset), MTT (own expert store on this split)
        t0 = time.time()
        sources["gm"] = distilled(self.gm_cell, self.dc_cfg)[:2]
        timings["distill_gm"] = time.time() - t0
        row_cell("gm_flat", lambda: flat_row("gm_flat"))

        t0 = time.time()
        ex = self.mtt_cfg.experts
        store = store_folder(table.work, self.experts_cell)
        log(f"MTT experts: {ex.num_experts} x {ex.train.epochs} epochs, width {ex.model.args.get('width', 128)}")
        self.trained_experts = fill_experts(ex, data, store, table, self.experts_cell)
        timings["mtt_experts"] = time.time() - t0
        t0 = time.time()
        sources["mtt"] = distilled(self.mtt_cell, self.mtt_cfg, experts_dir=store)[:2]
        timings["distill_mtt"] = time.time() - t0
        row_cell("mtt_flat", lambda: flat_row("mtt_flat"))

        # 5. two-stage rows
        for row in TWO_STAGE_ORDER:
            row_cell(row, lambda row=row: two_stage_row(row))

        # 6. stability of the grouping across the flat models (seeds, LT / GM / MTT training sets)
        def stability():
            parts, per_model = {}, {}
            for src in ("real", "gm", "mtt"):
                for s in self.seeds:
                    g = grouping_of(nets.model(*self.flat_net(src, s)), data, k=2, M=o.M, method="exhaustive",
                                    top=5, seed=o.seed, references=self.references)
                    parts[f"{src}-s{s}"] = g["groups"]
                    per_model[f"{src}-s{s}"] = {"groups": g["groups"], "group_names": g["group_names"],
                                                "cut": g["cut"],
                                                "paper_fig2_rank": g["references"]["paper_fig2_inferred"]["rank"],
                                                "vehicles_rank": g["references"]["vehicles_vs_animals"]["rank"]}
            return {"models": per_model, "stability": partition_stability(parts, data.num_classes,
                                                                          n_random=STABILITY_RANDOM, seed=o.seed)}

        t0 = time.time()
        table.require(self.stability_cell, stability)
        timings["grouping_stability"] = time.time() - t0
        stem = write()
        log(f"wrote {stem}.md and .json ({time.time() - t_start:.0f} s this call)")
        return stem

    def _flat_args(self, src: str, seed: int, sources: dict):
        x, y = sources[src]
        name, _, n_out, _ = self.flat_net(src, seed)
        return name, src, x, y, n_out, seed

    # ---- results ------------------------------------------------------------------------------------------------
    def collect(self) -> dict:
        """The finished cells (recorded under their current keys) as the report's results."""
        fresh = self.table.fresh
        out: dict = {"rows": {}}
        for row in ROWS:
            r = fresh(self.row_cell(row))
            if r is not None:
                out["rows"][row] = {**r, "label": ROWS[row][0]}
        grouping = fresh(self.grouping_cell)
        if grouping is not None:
            out["grouping"] = grouping
        distilled = {}
        if fresh(self.gm_cell) is not None:
            distilled["gm"] = fresh(self.gm_cell)
        if fresh(self.mtt_cell) is not None:
            ex = self.mtt_cfg.experts
            experts = {"num": ex.num_experts, "epochs": ex.train.epochs}
            if getattr(self, "trained_experts", None) is not None:
                experts["trained_this_call"] = self.trained_experts
            distilled["mtt"] = {**fresh(self.mtt_cell), "experts": experts}
        if distilled:
            out["distilled"] = distilled
        stability = fresh(self.stability_cell)
        if stability is not None:
            out["grouping_stability"] = stability
        if grouping is not None:
            out["net_seconds"] = self.nets.seconds(self.expected_nets(grouping["groups"]))
        return out

    def write_report(self, timings: dict | None = None, before: dict | None = None) -> Path:
        """Write ``<results>/two-stage-<profile>.{md,json}`` from the finished cells. ``timings``: this call's,
        added to ``before`` (the earlier calls') and kept in ``<work>/timings.json``; without them the recorded
        timings are reported."""
        from .two_stage_report import write_report

        data = self.table.fresh(self.data_cell)
        if data is None:
            raise LtddError(f"nothing to report: no cell of the {TABLE} table is finished under these options in "
                            f"{self.table.cells_dir}")
        results = self.collect()
        tpath = self.table.work / "timings.json"
        if timings is not None:
            before = before or {}
            results["timings_this_call"] = timings
            results["timings"] = {k: before.get(k, 0.0) + timings.get(k, 0.0) for k in {*before, *timings}}
            save_json(tpath, results["timings"])
        elif tpath.is_file():
            results["timings"] = json.loads(tpath.read_text())
        complete = all(r in results["rows"] for r in ROWS) and "grouping_stability" in results
        return write_report(self, data, results, complete)
