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
   paper, plus soft routing and the group-prior correction from the same networks (:mod:`ltdd.two_stage`); the
   same rows again under a fixed split given with ``groups`` (cells ``<row>-fixed``, keyed by that split).
   Beside them, controls the paper does not have: the flat row, Original + Random real and Random + Random on a
   random real subset of the distilled sets' size (IPC real images per class from the LT training set), so that
   every distilled-set row stands beside the same row without distillation.
   Steps 4 and 5 interleave: each row is computed as soon as its sources exist (the real-image rows first, then
   the random-real controls, the GM set and its rows, then the MTT set and its rows;
   :meth:`TwoStageGrid.run_stages`);
6. the partition each flat model gives (stability across seeds and training sets, against a random control).

Profiles (:func:`profile_settings`): ``cpu`` (a small scale for shared CPU cores), ``gpu`` (the paper's scale) and
``paper-real``: every network at the paper's scale (width 128, 300 epochs, raw [0, 1] pixels), GM and MTT
distillation cut to what fits about 4 hours on 2 CPU cores for the whole table (the arithmetic is below, at
``PAPER_REAL_GM_ITERATIONS``; :func:`estimate_seconds` gives it per cell), one run per row as the paper, and the
vehicles/animals split computed beside the max-cut split.
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
from .lad_table import CIFAR10_CLASSES, DEFAULT_ROOT
from .netstore import NetStore
from .paper import two_stage_paper

__all__ = ["TABLE", "ROWS", "CONTROL_ROWS", "PROFILES", "SOURCE_LABEL", "VEHICLES_ANIMALS", "TwoStageOptions",
           "TwoStageGrid", "profile_settings", "estimate_seconds", "default_runs"]

TABLE = "two-stage"
NUM_TRAIN = 2478  # the paper's split: [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
NUM_CLASSES = 10
# row name -> (label, table, stage-1 source, stage-2 source); flat rows have stage 2 = None. The random-real rows
# are ours, not the paper's (CONTROL_ROWS): each distilled-set row beside the same row on a random real subset of
# the same size (IPC real images per class drawn from the LT training set), trained the same way.
ROWS = {
    "original_flat": ("Original (flat)", 1, "real", None),
    "gm_flat": ("GM (flat)", 1, "gm", None),
    "mtt_flat": ("MTT (flat)", 1, "mtt", None),
    "random_flat": ("Random real (flat)", 1, "random", None),
    "original+gm": ("Original + GM", 2, "real", "gm"),
    "original+mtt": ("Original + MTT", 2, "real", "mtt"),
    "original+random": ("Original + Random real", 2, "real", "random"),
    "original+original": ("Original + Original", 3, "real", "real"),
    "gm+gm": ("GM + GM", 3, "gm", "gm"),
    "random+random": ("Random real + Random real", 3, "random", "random"),
}
CONTROL_ROWS = ("random_flat", "original+random", "random+random")  # not in the paper: the random-real controls
# the order two-stage rows are shown in
TWO_STAGE_ORDER = ("original+gm", "original+mtt", "original+random", "gm+gm", "random+random", "original+original")
# The run's order: the sources in SOURCE_ORDER (real first, then the random real subset (seconds), then GM, whose
# rows are the paper's headline, then MTT), each followed by the rows it completes (under each split, in
# COMPUTE_ORDER), so that rows appear as soon as their sources exist and the real-image networks, shared by several
# rows, are trained by the first row that needs them.
SOURCE_ORDER = ("real", "random", "gm", "mtt")
COMPUTE_ORDER = ("original+original", "original+random", "random+random", "original+gm", "gm+gm", "original+mtt")
SOURCE_LABEL = {"real": "Original (2,478 real LT images)", "random": "random real subset (IPC 10)",
                "gm": "GM / DC distilled (IPC 10)", "mtt": "MTT distilled (IPC 10)"}
STABILITY_RANDOM = 1000  # random partitions of the stability control
PROFILES = ("cpu", "gpu", "paper-real")
VEHICLES_ANIMALS = "0,1,8,9;2,3,4,5,6,7"  # {airplane, automobile, ship, truck} vs the six animals
PAPER_WIDTH, PAPER_EPOCHS = 128, 300  # every network of the paper: ConvNet-3 width 128, 300 epochs (DC protocol)

# ---- the paper-real profile: every network at the paper's scale, GM and MTT cut to fit the budget ---------------
# Single-thread costs on this project's CPUs at width 128, with the CPU malloc tuning every command applies
# (measured by benchmarks/two_stage_costs.py with the profile's own configurations; benchmarks/results/two_stage_costs.md):
EPOCH_S = 5.3             # one training epoch on the 2,478 real images (measured 5.31 and 5.33 s)
GM_ITERATION_S = 135.0    # one GM (DC) iteration at the paper's settings (outer 10 / inner 50, 256 real per class)
MTT_ITERATION_S = 17.6    # one MTT iteration at the mtt preset's settings (30 student steps on 100 images)
EXPERT_EPOCH_S = 4.8      # one MTT expert epoch (DSA, no momentum) on the 2,478 images
TEST_LOGITS_S = 11.5      # the 10k test images through a trained network (measured 10.5 and 12.2 s)
BUDGET_S = 2 * 4 * 3600   # about 4 hours on 2 cores = 8 core-hours for the whole table
# The arithmetic (one run per row, the computed and the vehicles/animals split; estimate_seconds computes it):
#   a network on the 2,478 real images, 300 epochs: 300 x 5.3 + 11.5 = 1,601.5 s; on the 100 distilled images (one
#   batch per epoch): 300 x 5.3 x 100 / 2,478 + 11.5 = 75.7 s.
#   Networks on real images: Original flat, and per split the group classifier and Original + Original's two
#   intra-group classifiers (2,478 images between them): 1,601.5 + 2 x (1,601.5 + 1,613) = 8,030.5 s.
#   Networks on distilled images: GM flat, MTT flat, and per split the GM group classifier and two intra-group
#   classifiers each on the GM and the MTT set: 2 x 75.7 + 2 x (75.7 + 2 x 87.2) = 651.3 s.
#   Networks: 8,682 s of the 28,800 s budget; the 20,118 s left go to the two distillers in equal shares (the
#   sets the two-stage rows compare cost the same), about 10,059 s each:
#   GM: 74 iterations x 135 s = 9,990 s (the paper's 1000 would take 37.5 core-hours);
#   MTT: 5 experts x 21 epochs (distillation reads only epochs 0..21: start epochs [0, 20) + 2) at 4.8 s, plus
#   a test pass each: 5 x 112.3 = 561.5 s; 539 iterations x 17.6 s = 9,486.4 s; 10,047.9 s in all.
#   Total 28,720 s = 7.98 core-hours: about 4 h on 2 cores with --threads 2 (if two threads run twice as fast as
#   one), about 8 h on one thread. One more GM or MTT iteration would break the equal shares or the budget.
#   MTT runs 50 of its 539 iterations (below): 20,114 s = 5.59 core-hours are spent.
#   The random-real control rows (not the paper's; added after this sizing) come on top: their networks are those
#   of GM's rows on another 100 images, 238.5 s under one split (401.3 s while the fixed split may differ).
PAPER_REAL_GM_ITERATIONS = 74
PAPER_REAL_MTT_EXPERTS = 5
PAPER_REAL_EXPERT_EPOCHS = 21
# MTT's equal share would buy 539 iterations, but it runs 50: on this long-tailed data MTT's learned step size falls
# to its floor (1e-6) by iteration 14 and stays there (measured: the first paper-real run, lr 0.0097 at iteration 0,
# 0.0016 at 12, 1e-6 from 14 to 44), and an image update is proportional to the step size, so the set no longer
# changes. At the set's real init, any step size above 1e-4 makes the matching loss worse than not moving for
# start epochs 6-19: the balanced student moves away from the biased experts' trajectories
# (benchmarks/mtt_step_size.py). 50 iterations show the collapse; 489 more would cost 2.4 core-hours for nothing.
PAPER_REAL_MTT_SHARE_ITERATIONS = 539
PAPER_REAL_MTT_ITERATIONS = 50
MTT_LR_LR = 1e-7  # cpu and paper-real (see profile_settings)


@dataclass
class TwoStageOptions(TableOptions):
    """What the two-stage table computes and where; ``None`` fields take the profile's defaults."""

    TABLE_NAME = TABLE

    profile: str = "cpu"
    root: str = DEFAULT_ROOT
    runs: int | None = None
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
    groups: str | None = None  # a fixed split computed beside the max-cut one; "none": no fixed split
    seed: int = 0

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise LtddError(f"unknown profile '{self.profile}' (known: {', '.join(PROFILES)})")
        self.runs = default_runs(self.profile) if self.runs is None else int(self.runs)
        if self.runs < 1:
            raise LtddError(f"--runs must be >= 1, got {self.runs}")
        if self.profile == "gpu":
            self.runs = max(self.runs, 5)
        self.M = int(self.M or 5)
        if self.M < 1:
            raise LtddError(f"--M must be >= 1, got {self.M}")
        # the paper feeds raw [0, 1] pixels (ToTensor only, no normalisation, no ZCA)
        self.raw_pixels = (self.profile == "paper-real") if self.raw_pixels is None else bool(self.raw_pixels)
        if self.groups is None and self.profile == "paper-real":
            self.groups = VEHICLES_ANIMALS
        for name in ("width", "real_epochs", "syn_epochs", "gm_iterations", "mtt_iterations", "mtt_experts",
                     "expert_epochs"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise LtddError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def run_stages(splits) -> list[tuple[str, list[tuple[str, str]]]]:
    """The run's order: each source in ``SOURCE_ORDER`` with the two-stage (row, split) pairs it completes (their
    sources all exist once it does), under each of ``splits`` in ``COMPUTE_ORDER``."""
    out, have = [], set()
    for src in SOURCE_ORDER:
        have.add(src)
        out.append((src, [(row, split) for split in splits for row in COMPUTE_ORDER
                          if src in ROWS[row][2:] and set(ROWS[row][2:]) <= have]))
    return out


def is_control(cell_name: str) -> bool:
    """Whether a row cell (``<row>`` or ``<row>-fixed``) is one of the random-real controls."""
    return cell_name.removesuffix("-fixed") in CONTROL_ROWS


def flat_row_of(src: str) -> str:
    """The flat row of a source: ``original_flat``, ``gm_flat``, ``mtt_flat``."""
    return f"{'original' if src == 'real' else src}_flat"


def default_runs(profile: str) -> int:
    """Runs per row when not given: one for paper-real (the paper's single runs), three otherwise (gpu: at least
    five)."""
    return 1 if profile == "paper-real" else 3


def profile_settings(o: TwoStageOptions) -> dict:
    """The scale of a profile. ``cpu``: sized for ~45 min on 2 shared CPU cores; ``gpu``: the paper's scale (every
    network 300 epochs at width 128, the presets' full distillation); ``paper-real``: every network at the paper's
    scale, GM and MTT at the paper's per-iteration settings but with fewer iterations (and experts) so that the
    whole table fits about 4 hours on 2 CPU cores. The options (width, epochs, iterations, experts) override any
    profile's values."""
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
                              f"distill.lr_lr={float(o.mtt_lr_lr or MTT_LR_LR):g}"],
            "probe_per_class": 200,
            "preset_profile": "cpu",
        }
    if o.profile == "paper-real":
        return {
            "width": int(o.width or PAPER_WIDTH),
            "real_epochs": int(o.real_epochs or PAPER_EPOCHS),
            "syn_epochs": int(o.syn_epochs or PAPER_EPOCHS),
            # the dc preset at its paper settings, fewer iterations; a checkpoint after every (2-minute) iteration
            "dc_overrides": [f"distill.iterations={int(o.gm_iterations or PAPER_REAL_GM_ITERATIONS)}",
                             "distill.checkpoint_every=1"],
            "mtt_overrides": [f"experts.num_experts={int(o.mtt_experts or PAPER_REAL_MTT_EXPERTS)}",
                              f"experts.train.epochs={int(o.expert_epochs or PAPER_REAL_EXPERT_EPOCHS)}",
                              f"distill.iterations={int(o.mtt_iterations or PAPER_REAL_MTT_ITERATIONS)}",
                              "distill.checkpoint_every=10",
                              # no evaluation inside the distillation (the preset evaluates every 500 iterations: a
                              # 1000-epoch network the budget does not hold); the mtt_flat row evaluates the set
                              "distill.eval_every=0",
                              # as the cpu profile: the preset's 1e-5 drove the learned step size to its floor at
                              # iteration 0 on un-whitened pixels (measured at the cpu scale, not at this one)
                              f"distill.lr_lr={float(o.mtt_lr_lr or MTT_LR_LR):g}"],
            "probe_per_class": 200,
            "preset_profile": None,
        }
    mtt = ([f"experts.num_experts={int(o.mtt_experts)}"] if o.mtt_experts else []) + \
          ([f"experts.train.epochs={int(o.expert_epochs)}"] if o.expert_epochs else []) + \
          ([f"distill.iterations={int(o.mtt_iterations)}"] if o.mtt_iterations else []) + \
          ([f"distill.lr_lr={float(o.mtt_lr_lr):g}"] if o.mtt_lr_lr else [])
    return {"width": int(o.width or PAPER_WIDTH), "real_epochs": int(o.real_epochs or PAPER_EPOCHS),
            "syn_epochs": int(o.syn_epochs or PAPER_EPOCHS),
            "dc_overrides": [f"distill.iterations={int(o.gm_iterations)}"] if o.gm_iterations else [],
            "mtt_overrides": mtt, "probe_per_class": 200, "preset_profile": None}


def default_threads(profile: str) -> int:
    """Torch CPU threads when not given: paper-real has 2 cores to itself (its budget); the other profiles share
    2 cores with other jobs, where one thread per process is faster than two (measured)."""
    return 2 if profile == "paper-real" else 1


def gsig(groups) -> str:
    return "-".join("".join(str(c) for c in g) for g in groups)


def _model_width(model) -> int:
    args = (model.get("args") if isinstance(model, dict) else getattr(model, "args", None)) or {}
    return int(args.get("width", PAPER_WIDTH))


# (name, value of a resolved configuration, is it a size: smaller than the paper's means "reduced")
GM_FIELDS = [
    ("iterations", lambda c: c.distill.iterations, True),
    ("outer loop", lambda c: c.distill.options.get("outer_loop"), True),
    ("inner loop", lambda c: c.distill.options.get("inner_loop"), True),
    ("real images per class", lambda c: c.distill.options.get("batch_real"), True),
    ("distiller width", lambda c: _model_width(c.distill.options.get("model")), True),
    ("init", lambda c: c.distill.image_init, False),
    ("lr_img", lambda c: c.distill.lr_img, False),
    ("lr_net", lambda c: c.distill.options.get("lr_net"), False),
]
MTT_FIELDS = [
    ("experts", lambda c: c.experts.num_experts, True),
    ("expert epochs", lambda c: c.experts.train.epochs, True),
    ("expert width", lambda c: _model_width(c.experts.model), True),
    ("iterations", lambda c: c.distill.iterations, True),
    ("student steps", lambda c: c.distill.phases[0].syn_steps, True),
    ("expert_epochs", lambda c: c.distill.phases[0].expert_epochs, False),
    ("start epochs below", lambda c: c.distill.phases[0].max_start_epoch, False),
    ("lr_img", lambda c: c.distill.lr_img, False),
    ("lr_lr", lambda c: c.distill.lr_lr, False),
]


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _config_diffs(cfg, ref, fields) -> tuple[list[str], list[str], bool]:
    """(the fields as the paper has them, the fields that differ as "name X instead of Y", any size smaller)."""
    same, diff, less = [], [], False
    for name, get, size in fields:
        v, r = get(cfg), get(ref)
        if v == r:
            same.append(f"{name} {_fmt(v)}")
        else:
            diff.append(f"{name} {_fmt(v)} instead of {_fmt(r)}")
            less |= size and isinstance(v, (int, float)) and isinstance(r, (int, float)) and v < r
    return same, diff, less


def _verdict(same: list[str], diff: list[str], less: bool) -> str:
    if not diff:
        return f"paper scale ({', '.join(same)})"
    return f"{'reduced' if less else 'differs'} ({', '.join(diff)})"


def estimate_seconds(grid: "TwoStageGrid") -> dict[str, float]:
    """Estimated single-thread seconds of each cell that trains or distils, from the costs measured at width 128
    (``EPOCH_S``, ``EXPERT_EPOCH_S``, ``GM_ITERATION_S``, ``MTT_ITERATION_S``; networks of another width scaled by
    (width/128)^2, a rough guide): a network costs its epochs x ``EPOCH_S`` x its images / 2,478 plus one test
    pass; a network two rows share is charged to the first row that trains it (rows of a fixed split equal to the
    computed one share all their networks with the computed rows, once the grouping is known). Data, grouping and
    stability cells (seconds) are left out. Meant for the paper-real profile (the distillers at the paper's
    per-iteration settings)."""
    st = grid.settings
    f = (st["width"] / PAPER_WIDTH) ** 2
    runs = len(grid.seeds)
    n_syn = int(grid.dc_cfg.distill.ipc) * NUM_CLASSES
    images = {"real": NUM_TRAIN, "random": n_syn, "gm": n_syn, "mtt": n_syn}
    epochs = grid.nets.epochs

    def nets(src: str, n_nets: int) -> float:  # n_nets networks sharing the images of one source (intra-group)
        return runs * f * (epochs[src] * EPOCH_S * images[src] / NUM_TRAIN + n_nets * TEST_LOGITS_S)

    ex = grid.mtt_cfg.experts
    out = {"original_flat": nets("real", 1),
           "random_flat": nets("random", 1),
           grid.gm_cell.name: grid.dc_cfg.distill.iterations * GM_ITERATION_S,
           "gm_flat": nets("gm", 1),
           grid.experts_cell.name: ex.num_experts * (ex.train.epochs * EXPERT_EPOCH_S + TEST_LOGITS_S),
           grid.mtt_cell.name: grid.mtt_cfg.distill.iterations * MTT_ITERATION_S,
           "mtt_flat": nets("mtt", 1)}
    # networks are keyed by their split: once the grouping is computed, a fixed split equal to it trains nothing new
    computed = grid.table.fresh(grid.grouping_cell)
    split_key = {"computed": gsig(computed["groups"]) if computed else "computed",
                 "fixed": gsig(grid.fixed_groups) if grid.fixed_groups else "fixed"}
    trained: set = set()
    for split in grid.splits():
        for row in COMPUTE_ORDER:
            _, _, st1, st2 = ROWS[row]
            sec = 0.0
            if ("group", st1, split_key[split]) not in trained:
                sec += nets(st1, 1)
                trained.add(("group", st1, split_key[split]))
            if ("intra", st2, split_key[split]) not in trained:
                sec += nets(st2, 2)
                trained.add(("intra", st2, split_key[split]))
            out[grid.row_cell(row, split).name] = sec
    return out


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
        # the random real subset: identified by its size and its draw (the data's fingerprint is in every key)
        self.random_ipc = int(self.dc_cfg.distill.ipc)
        sources = {"real": "real", "random": f"random-real-ipc{self.random_ipc}-draw{o.seed}",
                   "gm": self.gm_cell.hash, "mtt": self.mtt_cell.hash}
        epochs = {"real": st["real_epochs"], "random": st["syn_epochs"], "gm": st["syn_epochs"],
                  "mtt": st["syn_epochs"]}
        self.nets = NetStore(self.table.work / "nets", self.model_cfg, self.train_cfg, dk, sources, epochs, device)
        self.grouping_cell = Cell("grouping", {
            "kind": "grouping", "net": self.nets.key(*self.flat_net("real", self.seeds[0])), "features": "probe",
            "k": 2, "M": o.M, "method": "exhaustive", "top": 5, "seed": o.seed, "references": self.references})
        self.stability_cell = Cell("grouping-stability", {
            "kind": "grouping-stability", "grouping": self.grouping_cell.hash, "M": o.M, "seed": o.seed,
            "n_random": STABILITY_RANDOM,
            "nets": [self.nets.key(*self.flat_net(src, s)) for src in ("real", "gm", "mtt") for s in self.seeds]})
        self.class_names = list(CIFAR10_CLASSES) if self.dcfg.dataset == "cifar10" else None
        self.fixed_groups = self._fixed_groups(o.groups)

    def _fixed_groups(self, text: str | None) -> list[list[int]] | None:
        """The fixed split of ``--groups`` (class indices or CIFAR-10 names, groups separated by ';'), two groups,
        members sorted and the groups ordered by their smallest class; None for none."""
        from ..grouping.groups import _canonical
        from ..two_stage import parse_groups

        if text is None or str(text).strip().lower() == "none":
            return None
        groups = _canonical(parse_groups(text, NUM_CLASSES, self.class_names))
        if len(groups) != 2:
            raise LtddError(f"--groups: the table's two-stage rows route to two groups; '{text}' has {len(groups)}")
        return groups

    # ---- cells --------------------------------------------------------------------------------------------------
    def flat_net(self, src: str, seed: int) -> tuple[str, str, int, int]:
        return f"flat-{src}-s{seed}", src, NUM_CLASSES, seed

    def splits(self) -> list[str]:
        """``computed`` (the max-cut split), then ``fixed`` when a fixed split is given."""
        return ["computed"] + (["fixed"] if self.fixed_groups else [])

    def row_cell(self, row: str, split: str = "computed") -> Cell:
        """A row's cell. Under the computed split it is keyed by the grouping cell (which the max-cut came from);
        a two-stage row under the fixed split is the cell ``<row>-fixed``, keyed by the split itself."""
        _, _, st1, st2 = ROWS[row]
        key = {"kind": "flat-row" if st2 is None else "two-stage-row", "row": row,
               "stage1": self.nets.sources[st1], "stage2": self.nets.sources[st2] if st2 else None,
               "epochs": {s: self.nets.epochs[s] for s in {st1, st2} - {None}},
               "grouping": self.grouping_cell.hash, "seeds": self.seeds, "model": material(self.model_cfg),
               "train": material(self.train_cfg), "data": self.data_key}
        if split == "computed":
            return Cell(row, key)
        if split != "fixed" or st2 is None or not self.fixed_groups:
            raise LtddError(f"no cell for row {row} under the {split} split")
        key.pop("grouping")
        key["groups"] = self.fixed_groups
        return Cell(f"{row}-fixed", key)

    def cells(self) -> list[tuple[Cell, str, str, Path | None]]:
        """Every cell in the order of the run: (cell, preset, what it runs, file whose presence means partial)."""
        st, o = self.settings, self.opts
        gm, mtt, ex = self.dc_cfg.distill, self.mtt_cfg.distill, self.mtt_cfg.experts
        pixels = "raw [0, 1] pixels" if o.raw_pixels else "per-channel standardised pixels"
        d = self.dcfg
        split = (f"CIFAR-10-LT n_max 1000, IF 100 ({NUM_TRAIN} images)" if self.expect_train else
                 f"{d.dataset}, IF {d.resolved_imbalance_factor():g}")
        sc = self.scale_parts()
        out = [(self.data_cell, "-", f"{split}, probe {d.probe_per_class} per class, {pixels}", None),
               (self.grouping_cell, "-", f"run-0 Original-flat model (width {st['width']}, {st['real_epochs']} "
                                         f"epochs), probe features, M = {o.M}, exhaustive max-cut", None)]
        rows = {r: (self.row_cell(r), "-", self._row_text(r), None) for r in ROWS}
        source_cells = {
            "real": [],
            "random": [],  # drawn in the run (seconds); its networks are keyed by the draw
            "gm": [(self.gm_cell, "dc", f"ipc {gm.ipc}, {gm.iterations} iterations; {sc['gm']}",
                    self.table.artifact(self.gm_cell) / "checkpoint.safetensors")],
            "mtt": [(self.experts_cell, "mtt", f"{ex.num_experts} x {ex.train.epochs} epochs, width "
                                               f"{ex.model.args.get('width', PAPER_WIDTH)}",
                     store_folder(self.table.work, self.experts_cell) / "store.json"),
                    (self.mtt_cell, "mtt", f"ipc {mtt.ipc}, {mtt.iterations} iterations, lr_lr {mtt.lr_lr:g}; "
                                           f"{sc['mtt']}",
                     self.table.artifact(self.mtt_cell) / "checkpoint.safetensors")]}
        for src, ready in self.run_stages():
            out += source_cells[src] + [rows[flat_row_of(src)]]
            out += [(self.row_cell(r, split), "-", self._row_text(r, split), None) for r, split in ready]
        out.append((self.stability_cell, "-", f"the partition of each flat model ({3 * len(self.seeds)} models) vs "
                                              f"{STABILITY_RANDOM} random splits", None))
        if o.profile == "paper-real":
            est = estimate_seconds(self)
            out = [(c, p, f"{w} [est. {est[c.name]:,.0f} s]" if c.name in est else w, f)
                   for c, p, w, f in out]
        return out

    def run_stages(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """The run's order: each source in ``SOURCE_ORDER`` with the (row, split) pairs it completes."""
        return run_stages(self.splits())

    def split_text(self, split: str) -> str:
        if split == "computed":
            return "computed max-cut split"
        names = self.class_names or [str(c) for c in range(NUM_CLASSES)]
        return "fixed split " + " vs ".join("{" + ", ".join(names[c] for c in g) + "}" for g in self.fixed_groups)

    def _row_text(self, row: str, split: str = "computed") -> str:
        label, _, st1, st2 = ROWS[row]
        ep = lambda s: f"{self.nets.epochs[s]} epochs"  # noqa: E731
        stages = f"{st1} ({ep(st1)})" + (f" + {st2} ({ep(st2)})" if st2 else "")
        where = f", {self.split_text(split)}" if split != "computed" else ""
        n = len(self.seeds)
        return (f"{label}{where}: {stages}, width {self.settings['width']}, {n} seed{'s' if n != 1 else ''}; "
                f"scale: {self.row_scale(row)}")

    # ---- scale: what is at the paper's scale and what is reduced --------------------------------------------------
    def paper_configs(self):
        """The dc and mtt presets at their own (the paper's) scale: what a distilled set is compared against."""
        if getattr(self, "_paper_cfgs", None) is None:
            self._paper_cfgs = (load_preset("dc", None, []), load_preset("mtt", None, []))
        return self._paper_cfgs

    def scale_parts(self) -> dict[str, str]:
        """One clause per ingredient of a row: ``real`` (networks on real images), ``syn`` (networks on a
        distilled set), ``gm`` and ``mtt`` (the distilled sets), each "paper scale (...)", "reduced (X instead of
        Y, ...)" or "differs (...)"; ``random`` (the random-real control, which the paper does not have) and
        ``random_nets`` (networks on it: trained as those on a distilled set)."""
        st = self.settings
        raw = not self.dcfg.normalize and not self.dcfg.zca

        def nets(epochs: int) -> tuple[str, list, list]:
            same = [f"width {st['width']}", f"{epochs} epochs", "raw [0, 1] pixels"]
            diff, less = [], False
            if st["width"] != PAPER_WIDTH:
                diff.append(f"width {st['width']} instead of {PAPER_WIDTH}")
                less |= st["width"] < PAPER_WIDTH
            if epochs != PAPER_EPOCHS:
                diff.append(f"{epochs} epochs instead of {PAPER_EPOCHS}")
                less |= epochs < PAPER_EPOCHS
            if not raw:
                diff.append("per-channel standardised pixels instead of raw [0, 1]")
            return _verdict(same, diff, less)

        gm_ref, mtt_ref = self.paper_configs()
        return {"real": "real nets: " + nets(st["real_epochs"]),
                "syn": "nets on distilled images: " + nets(st["syn_epochs"]),
                "random": f"random real subset: {self.random_ipc} real images per class drawn from the LT training "
                          f"set (draw seed {self.opts.seed}; a control the paper does not have)",
                "random_nets": "nets on the random subset: trained as those on distilled images",
                "gm": "GM set: " + _verdict(*_config_diffs(self.dc_cfg, gm_ref, GM_FIELDS)),
                "mtt": "MTT set: " + _verdict(*_config_diffs(self.mtt_cfg, mtt_ref, MTT_FIELDS))}

    def row_scale(self, row: str) -> str:
        """What of a row is at the paper's scale and what is reduced, e.g. "real nets: paper scale (width 128, 300
        epochs, raw [0, 1] pixels); GM set: reduced (5 iterations instead of 1000); nets on distilled images: ..."."""
        sc = self.scale_parts()
        _, _, st1, st2 = ROWS[row]
        srcs = [st1] + ([st2] if st2 and st2 != st1 else [])
        parts = [sc["real"]] if "real" in srcs else []
        parts += [sc[s] for s in ("random", "gm", "mtt") if s in srcs]
        if any(s in ("gm", "mtt") for s in srcs):
            parts.append(sc["syn"])
        elif "random" in srcs:
            parts.append(f"{sc['random_nets']} ({sc['syn'].split(': ', 1)[1]})")
        return "; ".join(parts)

    def plan(self) -> list[dict]:
        return [{"cell": c.name, "hash": c.hash, "preset": preset, "what": what,
                 "state": self.table.state(c, partial)} for c, preset, what, partial in self.cells()]

    def estimate_lines(self) -> list[str]:
        """The estimated compute of the table (paper-real's budget), for ``--plan`` and the report."""
        est = estimate_seconds(self)
        controls = sum(v for k, v in est.items() if is_control(k))
        nets = sum(v for k, v in est.items() if k not in (self.gm_cell.name, self.experts_cell.name,
                                                          self.mtt_cell.name) and not is_control(k))
        total = sum(est.values()) - controls
        return [f"Estimated single-thread compute (width-128 costs measured on this project's CPUs: {EPOCH_S:g} s "
                f"per epoch on the 2,478 images, {GM_ITERATION_S:g} s per GM iteration, {MTT_ITERATION_S:g} s per "
                f"MTT iteration): networks {nets:,.0f} s, GM {est[self.gm_cell.name]:,.0f} s, MTT experts "
                f"{est[self.experts_cell.name]:,.0f} s, MTT {est[self.mtt_cell.name]:,.0f} s; total "
                f"{total / 3600:.2f} core-hours = about {total / 7200:.1f} h on 2 cores with --threads 2 (budget "
                f"{BUDGET_S / 3600:g} core-hours); the random-real control rows add {controls:,.0f} s"]

    def expected_nets(self, groups) -> list[tuple[str, str, int, int]]:
        """Every network of the table once the groups are known (name, source, outputs, seed), under the computed
        ``groups`` and the fixed split."""
        nets = [self.flat_net(src, s) for src in ("real", "random", "gm", "mtt") for s in self.seeds]
        for grp in [groups] + ([self.fixed_groups] if self.fixed_groups else []):
            nets += [n for n in self._split_nets(grp) if n not in nets]
        return nets

    def _split_nets(self, groups) -> list[tuple[str, str, int, int]]:
        g = gsig(groups)
        nets = []
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
        threads = o.threads if o.threads is not None else (default_threads(o.profile) if device.type == "cpu"
                                                           else None)
        if threads:
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
        drawn: dict = {}

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
        fig2 = grouping["references"].get("paper_fig2_inferred")
        log(f"groups: {grouping['group_names']} (cut {grouping['cut']:.1f})"
            + (f"; paper's Fig. 2 split ranks {fig2['rank']}/{fig2['of']}" if fig2 else ""))
        if self.fixed_groups:
            from ..grouping import cut_value

            log(f"fixed split: {self.split_text('fixed')} (cut "
                f"{cut_value(grouping['distance_matrix'], self.fixed_groups):.1f})")

        def flat_row(row: str):
            src = ROWS[row][2]
            return [flat_row_metrics(data, nets.get(*self._flat_args(src, s, sources))["test_logits"], groups,
                                     len(sources[src][0])) for s in self.seeds]

        def stage_nets(src: str, s: int, grp):
            x, y = sources[src]
            gof = torch.from_numpy(groups_to_labels(grp, data.num_classes))
            gcounts = torch.bincount(gof[y], minlength=len(grp))
            grec = nets.get(f"group-{src}-{gsig(grp)}-s{s}", src, x, gof[y], len(grp), s,
                            class_counts=gcounts.tolist())
            return grec, (gcounts.double() / gcounts.sum()).tolist(), int(len(x))

        def intra_nets(src: str, s: int, grp):
            x, y = sources[src]
            gof = torch.from_numpy(groups_to_labels(grp, data.num_classes))
            recs, n = [], 0
            for gi, g in enumerate(grp):
                sel = torch.nonzero(gof[y] == gi).flatten()
                local = torch.full((data.num_classes,), -1, dtype=torch.long)
                local[g] = torch.arange(len(g))
                yl = local[y[sel]]
                recs.append(nets.get(f"intra-{src}-{gsig(grp)}-g{gi + 1}-s{s}", src, x[sel], yl, len(g),
                                     s + 1 + gi, class_counts=torch.bincount(yl, minlength=len(g)).tolist()))
                n += len(sel)
            return recs, n

        def two_stage_row(row: str, grp):
            st1, st2 = ROWS[row][2], ROWS[row][3]
            per_run = []
            for s in self.seeds:
                grec, priors, n1 = stage_nets(st1, s, grp)
                recs, n2 = intra_nets(st2, s, grp)
                per_run.append(two_stage_row_metrics(data, grp, priors, grec["test_logits"],
                                                     [r["test_logits"] for r in recs], n1 + n2))
            return per_run

        def row_cell(row: str, fn, split: str = "computed"):
            t0 = time.time()
            cell = self.row_cell(row, split)
            extra = {"groups": self.fixed_groups} if split == "fixed" else {}
            if "random" in ROWS[row][2:]:  # the control's images, as indices into the LT training set
                extra["random_subset"] = drawn["random"]
            table.require(cell, lambda: {"summary": summarise(fn()), "row": row, **extra})
            timings[f"row_{cell.name}"] = time.time() - t0
            write()

        def distilled(cell: Cell, cfg, experts_dir=None):
            out = table.artifact(cell)
            res = table.require(cell, lambda: hard_label_set(cfg, data, out, experts_dir=experts_dir, device=device))
            from ..synset import SyntheticSet

            syn = SyntheticSet.load(out)
            return syn.images, syn.labels.long(), res

        def gm_source():
            t0 = time.time()
            sources["gm"] = distilled(self.gm_cell, self.dc_cfg)[:2]
            timings["distill_gm"] = time.time() - t0

        def mtt_source():
            t0 = time.time()
            ex = self.mtt_cfg.experts
            store = store_folder(table.work, self.experts_cell)
            log(f"MTT experts: {ex.num_experts} x {ex.train.epochs} epochs, width {ex.model.args.get('width', 128)}")
            self.trained_experts = fill_experts(ex, data, store, table, self.experts_cell)
            timings["mtt_experts"] = time.time() - t0
            t0 = time.time()
            sources["mtt"] = distilled(self.mtt_cell, self.mtt_cfg, experts_dir=store)[:2]
            timings["distill_mtt"] = time.time() - t0

        # 4-5. each source (real; the random real subset; the GM set with the dc preset; the MTT set on its own
        # expert store), its flat row,
        # then the two-stage rows it completes, under the computed split and the fixed one
        def random_source():  # the same draw as the fair tables' random baseline
            from ..evaluate import draw_random_real

            x, y, idx = draw_random_real(data, self.random_ipc, o.seed)
            sources["random"] = (x, y.long())
            drawn["random"] = {"ipc": self.random_ipc, "draw_seed": int(o.seed), "train_indices": list(idx)}

        make = {"real": lambda: None, "random": random_source, "mtt": mtt_source, "gm": gm_source}
        for src, ready in self.run_stages():
            make[src]()
            flat = flat_row_of(src)
            row_cell(flat, lambda flat=flat: flat_row(flat))
            for row, split in ready:
                grp = groups if split == "computed" else self.fixed_groups
                row_cell(row, lambda row=row, grp=grp: two_stage_row(row, grp), split)

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
        if self.fixed_groups:
            out["rows_fixed"] = {}
            for row in TWO_STAGE_ORDER:
                r = fresh(self.row_cell(row, "fixed"))
                if r is not None:
                    out["rows_fixed"][row] = {**r, "label": ROWS[row][0]}
            out["fixed_split"] = self.fixed_split_info(grouping)
        out["row_scale"] = {row: self.row_scale(row) for row in ROWS}
        out["scale_parts"] = self.scale_parts()
        if self.opts.profile == "paper-real":
            out["estimate"] = {"seconds": estimate_seconds(self), "text": self.estimate_lines()[0]}
        return out

    def fixed_split_info(self, grouping: dict | None) -> dict:
        """The fixed split, its group names and priors, and - once the grouping is computed - its max-cut objective
        on the grouping's class distances (the sum of D over class pairs in different groups), its rank among all
        two-way splits and its gap to the max-cut."""
        from ..grouping import bipartition_rank, group_summary

        names = self.class_names or [str(c) for c in range(NUM_CLASSES)]
        info: dict = {"groups": self.fixed_groups, "group_names": [[names[c] for c in g] for g in self.fixed_groups],
                      "text": self.split_text("fixed")}
        data = self.table.fresh(self.data_cell)
        if data is not None:
            info["group_summary"] = group_summary(self.fixed_groups, data["train_counts"], data["class_names"])
        if grouping is not None:
            info.update(bipartition_rank(grouping["distance_matrix"], self.fixed_groups))
            info["same_as_computed"] = [sorted(g) for g in grouping["groups"]] == self.fixed_groups
        return info

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
        complete = (all(r in results["rows"] for r in ROWS) and "grouping_stability" in results
                    and all(r in results.get("rows_fixed", {}) for r in (TWO_STAGE_ORDER if self.fixed_groups else ())))
        return write_report(self, data, results, complete)
