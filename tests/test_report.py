"""ltdd.report: the run-folder report (tables, per-class plot, distillation curves, grids, HTML)."""

from __future__ import annotations

import json

import pytest
import torch

from ltdd.errors import LtddError
from ltdd.report import _class_names_from_sets, _read_logs, write_report
from ltdd.synset import SyntheticSet


def _summary(acc: float) -> dict:
    ms = lambda v: {"mean": v, "std": 0.01}  # noqa: E731
    return {"runs": 3, "accuracy": ms(acc), "class_std": ms(0.1), "worst_accuracy": ms(0.2),
            "per_class": [acc + 0.1, acc - 0.1],
            "groups": {"head": ms(0.6), "medium": {"mean": None, "std": None}, "tail": ms(0.4),
                       "many": ms(0.7), "medium_shot": ms(0.5), "few": ms(0.3)}}


def _log_lines(n: int) -> list[str]:
    return [json.dumps({"iteration": i, "loss/representation": 1.0 - 0.01 * i, "loss/classifier": 0.8 - 0.02 * i,
                        "loss": 1.3 - 0.02 * i, "lr": 0.01 + 1e-4 * i, "seconds": 1.0}) for i in range(n)]


def test_report_has_groups_curves_and_grids(tmp_path):
    run = tmp_path / "lad"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"summary": _summary(0.5), "seconds": 7}))
    # a log cut by a kill in its last line, plus a record without a loss (skipped)
    (run / "log.jsonl").write_text("\n".join(_log_lines(5) + ['{"iteration": 5, "eval/acc": 0.3}', '{"itera']))
    SyntheticSet(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]),
                 meta={"class_names": ["head-cls", "tail-cls"]}).save(run / "distilled.safetensors")
    from ltdd.synset import save_grid

    save_grid(run / "grid.png", torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), 2)
    (tmp_path / "experts").mkdir()
    (tmp_path / "experts" / "train_log.jsonl").write_text(
        "\n".join(json.dumps({"expert": i, "kind": "representation", "test_acc": a, "seconds": 10.0})
                  for i, a in enumerate([0.25, 0.35])) + "\n")
    md = write_report(tmp_path).read_text()
    assert "| lad | 50.0 ± 1.0 | 10.0 ± 1.0 | 20.0 ± 1.0 | 60.0 ± 1.0 | – | 40.0 ± 1.0 | 70.0 ± 1.0 | 50.0 ± 1.0 | " \
           "30.0 ± 1.0 | 3 | 7 |" in md
    assert "`experts` representation: 2 experts, test accuracy 30.0 % (min 25.0, max 35.0), 20 s of training" in md
    assert "## Distillation curves" in md and (tmp_path / "curves.png").stat().st_size > 1000
    assert "![grid](lad/grid.png)" in md
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # per-class, curves, grid
    assert "<h2>Distillation curves</h2>" in html
    assert _class_names_from_sets(tmp_path) == ["head-cls", "tail-cls"]
    logs = _read_logs(tmp_path)
    assert list(logs) == ["lad"] and [r["iteration"] for r in logs["lad"]] == [0, 1, 2, 3, 4]


def test_report_without_logs_has_no_curves_and_empty_folder_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "eval.json").write_text(json.dumps({"summary": _summary(0.4)}))
    md = write_report(tmp_path).read_text()
    assert "curves" not in md and not (tmp_path / "curves.png").exists()
    with pytest.raises(LtddError, match="no eval.json"):
        (tmp_path / "empty").mkdir()
        write_report(tmp_path / "empty")


def test_report_with_comparison_lists_its_rows_first_with_labels(tmp_path):
    """comparison.json (written by ltdd run) names the rows, gives their label modes and sizes, orders them, and
    adds the reading and a per-class table; result files it does not list still appear after its rows."""
    for sub, acc in (("distilled", 0.8), ("random_real", 0.6), ("other", 0.3)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "eval.json").write_text(json.dumps({"summary": _summary(acc), "seconds": 2}))
    (tmp_path / "full_data.json").write_text(json.dumps({"summary": _summary(0.9), "method": "erm",
                                                         "seconds": 5}))
    (tmp_path / "data.json").write_text(json.dumps({"class_names": ["a", "b"], "train_counts": [50, 1]}))
    rows = [{"key": "distilled", "name": "distilled (LAD)", "labels": "learned soft labels", "images": 2,
             "path": "distilled/eval.json", "summary": _summary(0.8), "seconds": 11},
            {"key": "random", "name": "random real images", "labels": "hard labels", "images": 2,
             "path": "random_real/eval.json", "summary": _summary(0.6), "seconds": 2},
            {"key": "full", "name": "full data (ERM)", "labels": "hard labels (every training image)", "images": 51,
             "path": "full_data.json", "summary": _summary(0.9), "seconds": 5}]
    reading = ["distilled 1 image/class: 80.0 % vs random real 60.0 % vs full data 90.0 % (test accuracy, mean of 3 "
               "runs)", "distilled set: +20.0 points over random real images"]
    (tmp_path / "comparison.json").write_text(json.dumps({
        "rows": rows, "reading": reading,
        "protocol": {"model": {"name": "convnet", "args": {"width": 32}}, "train": {"epochs": 200}, "runs": 3}}))
    md = write_report(tmp_path).read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "%" not in ln and "---" not in ln]
    assert [ln.split(" | ")[0][2:] for ln in table[:4]] == ["distilled (LAD)", "random real images",
                                                            "full data (ERM)", "other"]
    assert "| distilled (LAD) | learned soft labels | 2 | 80.0 ± 1.0 |" in md
    assert "| full data (ERM) | hard labels (every training image) | 51 | 90.0 ± 1.0 |" in md
    assert "| other | – | – | 30.0 ± 1.0 |" in md
    assert "convnet (width 32) trained 200 epochs" in md
    assert f"**{reading[0]}**" in md and reading[1] in md
    assert "| set | a (50) | b (1) |" in md and "| distilled (LAD) | 90.0 | 70.0 |" in md
    html = (tmp_path / "report.html").read_text()
    assert f"<strong>{reading[0]}</strong>" in html
