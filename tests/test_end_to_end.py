"""A tiny end-to-end run on the embedded digits data: data -> experts -> LAD -> evaluation -> report."""

from __future__ import annotations

import json

from ltdd.config import load_preset
from ltdd.synset import SyntheticSet
from ltdd.workflow import run_pipeline


def test_quickstart_pipeline_learns(tmp_path):
    cfg = load_preset("quickstart", overrides=[
        "experts.num_experts=2", "experts.train.epochs=8", "distill.iterations=6", "distill.phases.0.max_start_epoch=4",
        "distill.ipc=5", "data.imbalance_factor=10",  # the setting this test was written for (the quick start moved)
        "protocol_overrides.train.epochs=60", "protocol_overrides.runs=1"])
    out = tmp_path / "run"
    summary = run_pipeline(cfg, out, echo=lambda *_: None)
    assert (out / "report.md").is_file() and (out / "report.html").is_file() and (out / "per_class.png").is_file()
    syn = SyntheticSet.load(out / "distilled")
    assert syn.images.shape == (50, 1, 16, 16) and syn.soft_labels.shape == (50, 10) and syn.lr > 0
    assert syn.labels.tolist() == [c for c in range(10) for _ in range(5)]  # balanced, class by class
    ev = json.loads((out / "distilled" / "eval.json").read_text())
    assert ev["summary"]["accuracy"]["mean"] > 0.5  # chance is 0.1
    log = [json.loads(line) for line in (out / "distilled" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and {"loss/representation", "loss/classifier", "lr", "seconds"} <= log[0].keys()
    assert summary["seconds"] > 0
