"""Resuming the distillation loop (ltdd.distill.run.distill) after a kill that falls between two checkpoints.

A kill between checkpoints leaves: the checkpoint of iteration k, and log.jsonl with the lines of iterations
k .. j-1 (possibly with a last line cut in the middle of writing). Resume must restart at k, drop those stale lines
(they are re-done) and end with exactly the files of an uninterrupted run - with periodic evaluation on as well.

The kill is simulated without signals: run to a checkpoint (stop_after), keep a copy of that checkpoint, run on
past it (the log grows), then put the copy back (and optionally cut a line in half at the end of the log).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ltdd.config import DistillConfig, PhaseConfig, RunConfig
from ltdd.distill.run import CHECKPOINT, distill
from ltdd.synset import SyntheticSet

TINY_PROTOCOL = {"model": {"name": "convnet", "args": {"width": 4, "depth": 1}},
                 "train": {"epochs": 3, "batch_size": 8, "dsa": False}, "runs": 1}


def _run_cfg(iterations=7, checkpoint_every=3, eval_every=0, dsa=True) -> RunConfig:
    ph1 = PhaseConfig(name="rep", store="representation", max_start_epoch=2, syn_steps=2, match="backbone",
                      inner_loss="dam", weight=0.5)
    ph2 = PhaseConfig(name="cls", store="classifier", max_start_epoch=1, syn_steps=2, student_update="classifier")
    d = DistillConfig(ipc=2, iterations=iterations, phases=[ph1, ph2], image_init="real", label_init="experts_correct",
                      dsa=dsa, checkpoint_every=checkpoint_every, eval_every=eval_every, lr_img=10.0)
    return RunConfig(distill=d, protocol="cpu", protocol_overrides=TINY_PROTOCOL)


def _records(path):
    """log.jsonl without the wall-clock fields."""
    out = []
    for line in (path / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in ("seconds", "peak_memory_mb")})
    return out


def _iteration_of(path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / CHECKPOINT), framework="pt") as f:
        return int(f.metadata()["iteration"])


def _kill_between_checkpoints(cfg, data, out, store_root, *, checkpoint_at, killed_after, evaluate, cut_line):
    """Leave ``out`` as a run killed after iteration ``killed_after - 1`` whose last checkpoint is
    ``checkpoint_at`` (< killed_after, and not a multiple of checkpoint_every past it)."""
    kw = dict(experts_dir=store_root, progress=False, evaluate=evaluate)
    assert distill(cfg, data, out, stop_after=checkpoint_at, **kw) == {"stopped_at": checkpoint_at}
    assert checkpoint_at % cfg.distill.checkpoint_every == 0  # a real periodic checkpoint
    saved = out.parent / f"{out.name}-ckpt.safetensors"
    shutil.copy(out / CHECKPOINT, saved)
    assert distill(cfg, data, out, resume=True, stop_after=killed_after - checkpoint_at, **kw) == \
        {"stopped_at": killed_after}
    shutil.copy(saved, out / CHECKPOINT)  # the checkpoint written at killed_after never happened
    assert _iteration_of(out) == checkpoint_at
    lines = _records(out)
    stale = [r for r in lines if r["iteration"] >= checkpoint_at]
    assert stale and max(r["iteration"] for r in stale) == killed_after - 1  # log lines past the checkpoint
    if cut_line:  # the writer died in the middle of a line
        with open(out / "log.jsonl", "a") as f:
            f.write('{"iteration": %d, "loss": 0.12' % killed_after)
    return stale


@pytest.mark.parametrize("cut_line", [False, True])
def test_resume_after_kill_between_checkpoints(tmp_path, tiny_store, tiny_data, one_thread, cut_line):
    cfg = _run_cfg(iterations=7, checkpoint_every=3)
    kw = dict(experts_dir=tiny_store.root, progress=False, evaluate=False)
    distill(cfg, tiny_data, tmp_path / "a", **kw)
    b = tmp_path / "b"
    _kill_between_checkpoints(cfg, tiny_data, b, tiny_store.root, checkpoint_at=3, killed_after=5, evaluate=False,
                              cut_line=cut_line)
    distill(cfg, tiny_data, b, resume=True, **kw)
    ra, rb = _records(tmp_path / "a"), _records(b)
    assert [r["iteration"] for r in rb] == list(range(7))  # stale lines 3, 4 dropped, then re-done once
    assert ra == rb
    sa, sb = SyntheticSet.load(tmp_path / "a"), SyntheticSet.load(b)
    assert torch.equal(sa.images, sb.images) and torch.equal(sa.soft_labels, sb.soft_labels)
    assert torch.equal(sa.labels, sb.labels) and sa.lr == sb.lr
    assert _iteration_of(b) == _iteration_of(tmp_path / "a") == 7


def test_resume_with_periodic_evaluation(tmp_path, tiny_store, tiny_data, one_thread):
    """eval_every = 2: evaluation records after iterations 1, 3, 5 (0-based) and the final eval.json must equal
    the uninterrupted run's although the kill (after iteration 4, checkpoint at 3) cuts between them."""
    cfg = _run_cfg(iterations=7, checkpoint_every=3, eval_every=2)
    kw = dict(experts_dir=tiny_store.root, progress=False, evaluate=True)
    distill(cfg, tiny_data, tmp_path / "a", **kw)
    b = tmp_path / "b"
    stale = _kill_between_checkpoints(cfg, tiny_data, b, tiny_store.root, checkpoint_at=3, killed_after=5,
                                      evaluate=True, cut_line=False)
    assert any("eval_accuracy" in r for r in stale)  # the evaluation of iteration 3 is among the dropped lines
    distill(cfg, tiny_data, b, resume=True, **kw)
    ra, rb = _records(tmp_path / "a"), _records(b)
    evals = [r for r in ra if "eval_accuracy" in r]
    assert [r["iteration"] for r in evals] == [1, 3, 5]
    assert ra == rb
    sa, sb = SyntheticSet.load(tmp_path / "a"), SyntheticSet.load(b)
    assert torch.equal(sa.images, sb.images) and torch.equal(sa.soft_labels, sb.soft_labels) and sa.lr == sb.lr
    ea, eb = (json.loads((p / "eval.json").read_text()) for p in (tmp_path / "a", b))
    ea.pop("seconds"), eb.pop("seconds")
    assert ea == eb and ea["summary"]["accuracy"]["mean"] >= 0
