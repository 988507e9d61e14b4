"""Plots and Markdown/HTML reports for a run folder.

``write_report(run_dir)`` collects every ``eval.json`` (distilled sets) and ``full_data.json`` / ``metrics.json``
(full-data training) below ``run_dir`` and writes ``report.md`` and ``report.html`` (plots embedded) with: a table
of overall, class-std, worst-class, head/medium/tail and many/medium/few accuracy; ``per_class.png``; the
distillation curves of every ``log.jsonl`` (matching loss per phase and learned step size against the iteration,
``curves.png``); and the synthetic image grids. Class names come from ``data.json`` or a distilled set's metadata.

When the folder holds ``comparison.json`` (written by ``ltdd run``: the distilled set beside its own initial set,
random real images and the full training set, all under one protocol), the table lists those rows first, by name
and with their label mode and set size, followed by the comparison's reading and a per-class table.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from .config import atomic_write_bytes, atomic_write_text, read_jsonl
from .errors import LtddError


def _pct(ms) -> str:
    if not ms or ms.get("mean") is None:
        return "–"
    return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"


def collect(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(run_dir.rglob("*.json")):
        if path.name not in ("eval.json", "full_data.json", "metrics.json"):
            continue
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        summary = obj.get("summary")
        if not summary or "accuracy" not in summary:
            continue
        rel = path.parent.relative_to(run_dir).as_posix()
        name = obj.get("method") or (rel if rel != "." else run_dir.name)
        if path.name == "full_data.json":
            name = f"full data ({obj.get('method', 'erm')})"
        rows.append({"name": name, "path": str(path.relative_to(run_dir)), "summary": summary,
                     "seconds": obj.get("seconds")})
    return rows


def _save_png(fig, path: Path, dpi: int) -> None:
    """Write a matplotlib figure as a PNG atomically and close it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def per_class_plot(rows: list[dict], class_names: list[str] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(rows[0]["summary"]["per_class"])
    names = class_names or [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * n + 2), 3.5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        pc = np.asarray(row["summary"]["per_class"], dtype=float) * 100
        ax.bar(np.arange(n) + (i - (len(rows) - 1) / 2) * width, pc, width, label=row["name"])
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels(names[:n], rotation=45 if n > 10 else 0, ha="right" if n > 10 else "center", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlabel("class (head → tail)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    _save_png(fig, path, dpi=110)


def _class_names_from_sets(run_dir: Path) -> list[str] | None:
    """Class names from the metadata of the first distilled set below ``run_dir`` that records them."""
    from .synset import read_meta

    for path in sorted(run_dir.rglob("distilled.safetensors")):
        try:
            names = read_meta(path).get("class_names")
        except LtddError:
            continue
        if names:
            return [str(n) for n in names]
    return None


def _expert_lines(run_dir: Path) -> list[str]:
    """One line per expert store and kind below ``run_dir``: count, mean and range of test accuracy, seconds."""
    import statistics

    lines = []
    for path in sorted(run_dir.rglob("train_log.jsonl")):
        recs = read_jsonl(path)
        rel = path.parent.relative_to(run_dir).as_posix()
        for kind in ("representation", "classifier"):
            acc = [r["test_acc"] for r in recs if r.get("kind") == kind and isinstance(r.get("test_acc"), float)]
            if acc:
                secs = sum(r.get("seconds", 0.0) for r in recs if r.get("kind") == kind)
                lines.append(f"- `{rel}` {kind}: {len(acc)} experts, test accuracy {100 * statistics.mean(acc):.1f} % "
                             f"(min {100 * min(acc):.1f}, max {100 * max(acc):.1f}), {secs:.0f} s of training")
    return lines


def _read_logs(run_dir: Path) -> dict[str, list[dict]]:
    """{run name: the iteration records of its log.jsonl} for every distillation log below ``run_dir``."""
    logs = {}
    for path in sorted(run_dir.rglob("log.jsonl")):
        recs = [r for r in read_jsonl(path) if "iteration" in r and "loss" in r]
        if recs:
            rel = path.parent.relative_to(run_dir).as_posix()
            logs[rel if rel != "." else run_dir.name] = recs
    return logs


def curves_plot(logs: dict[str, list[dict]], path: Path) -> None:
    """Two panels: the matching loss (solid: total; dashed: each phase) and the learned step size, per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.5))
    for i, (name, recs) in enumerate(logs.items()):
        color = f"C{i % 10}"
        its = [r["iteration"] for r in recs]
        ax_l.plot(its, [r["loss"] for r in recs], color=color, label=name)
        phases = sorted({k for r in recs for k in r if k.startswith("loss/")})
        if len(phases) > 1:
            for j, k in enumerate(phases):
                pts = [(r["iteration"], r[k]) for r in recs if k in r]
                ax_l.plot(*zip(*pts), color=color, linestyle=("--", ":", "-.")[j % 3], linewidth=0.8,
                          label=f"{name}: {k[5:]}")
        lr = [(r["iteration"], r["lr"]) for r in recs if isinstance(r.get("lr"), (int, float))]
        if lr:
            ax_a.plot(*zip(*lr), color=color, label=name)
    ax_l.set_xlabel("iteration")
    ax_l.set_ylabel("matching loss")
    ax_l.legend(fontsize=7)
    ax_a.set_xlabel("iteration")
    ax_a.set_ylabel("learned step size")
    ax_a.legend(fontsize=7)
    _save_png(fig, path, dpi=100)


def read_comparison(run_dir: Path) -> dict | None:
    """``comparison.json`` of a run folder (None when absent or unreadable)."""
    path = Path(run_dir) / "comparison.json"
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("rows"), list) else None


def _with_comparison(rows: list[dict], comp: dict | None) -> list[dict]:
    """The comparison's rows first (its names, label modes and sizes), then every other result row."""
    if not comp:
        return rows
    by_path = {r["path"]: r for r in rows}
    out = []
    for c in comp["rows"]:
        r = by_path.pop(c.get("path"), None)
        if r is None and not c.get("summary"):
            continue
        out.append({**(r or {}), "name": c["name"], "labels": c.get("labels"), "images": c.get("images"),
                    "summary": (r or c)["summary"], "seconds": c.get("seconds", (r or {}).get("seconds"))})
    return out + [r for r in rows if r["path"] in by_path]


def _metric_cells(r: dict) -> str:
    s = r["summary"]
    g = s.get("groups", {})
    sec = f"{r['seconds']:.0f}" if isinstance(r.get("seconds"), (int, float)) else "–"
    return (f"{_pct(s['accuracy'])} | {_pct(s['class_std'])} | {_pct(s['worst_accuracy'])} "
            f"| {_pct(g.get('head'))} | {_pct(g.get('medium'))} | {_pct(g.get('tail'))} "
            f"| {_pct(g.get('many'))} | {_pct(g.get('medium_shot'))} | {_pct(g.get('few'))} | {s['runs']} | {sec} |")


def _per_class_table(rows: list[dict], class_names: list[str] | None, counts: list[int] | None) -> list[str]:
    n = len(rows[0]["summary"]["per_class"])
    names = class_names or [str(i) for i in range(n)]
    head = [f"{names[c]} ({counts[c]})" if counts and c < len(counts) else names[c] for c in range(n)]
    lines = ["| set | " + " | ".join(head) + " |", "| --- " * (n + 1) + "|"]
    for r in rows:
        pc = r["summary"]["per_class"]
        lines.append(f"| {r['name']} | " + " | ".join("–" if v is None or v != v else f"{100 * v:.1f}" for v in pc)
                     + " |")
    return lines


def _model_text(model: dict) -> str:
    args = model.get("args") or {}
    inner = ", ".join(f"{k} {v}" for k, v in args.items())
    return f"{model.get('name', '?')}" + (f" ({inner})" if inner else "")


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LtddError(f"run folder not found: {run_dir}")
    comp = read_comparison(run_dir)
    rows = _with_comparison(collect(run_dir), comp)
    if not rows:
        raise LtddError(f"no eval.json / full_data.json / metrics.json found under {run_dir}")
    class_names = counts = None
    data_json = run_dir / "data.json"
    if data_json.is_file():
        info = json.loads(data_json.read_text())
        class_names, counts = info.get("class_names"), info.get("train_counts")
    per_class_plot(rows, class_names, run_dir / "per_class.png")
    if class_names is None:
        class_names = _class_names_from_sets(run_dir)
    lines = [f"# ltdd report: {run_dir.name}", ""]
    if comp:
        proto = comp.get("protocol") or {}
        model = proto.get("model") or {}
        train = proto.get("train") or {}
        lines += ["Every row is evaluated with the same protocol: "
                  f"{_model_text(model)} trained {train.get('epochs', '?')} epochs "
                  f"from scratch, {proto.get('runs', '?')} runs (the same seeds for every row), tested on the "
                  "balanced test set. Accuracies in % (mean ± std over runs). Seconds: the distillation for the "
                  "distilled set, the protocol's training for the other rows.", "",
                  "| set | labels | images | accuracy % | class std % | worst class % | head | medium | tail | many "
                  "| med-shot | few | runs | seconds |",
                  "| --- " * 14 + "|"]
        for r in rows:
            img = r.get("images")
            lines.append(f"| {r['name']} | {r.get('labels') or '–'} | {img if img is not None else '–'} | "
                         + _metric_cells(r))
        lines.append("")
        lines += [f"**{ln}**" if i == 0 else ln for i, ln in enumerate(comp.get("reading") or [])]
    else:
        lines += ["| method | accuracy % | class std % | worst class % | head | medium | tail | many | med-shot | few "
                  "| runs | seconds |",
                  "| --- " * 12 + "|"]
        for r in rows:
            lines.append(f"| {r['name']} | " + _metric_cells(r))
    lines += ["", "## Per-class accuracy", "", "Mean over runs, classes from head to tail:", "",
              "![per-class accuracy](per_class.png)", ""]
    if comp:
        lines += ["Per class (training images in brackets):", ""] + _per_class_table(rows, class_names, counts) + [""]
    experts = _expert_lines(run_dir)
    if experts:
        lines += ["## Experts", "", "Test accuracy of the experts the run trained (from each store's "
                  "train_log.jsonl):", ""] + experts + [""]
    logs = _read_logs(run_dir)
    if logs:
        curves_plot(logs, run_dir / "curves.png")
        lines += ["## Distillation curves", "", "Matching loss (total and per phase) and the learned step size per "
                  "iteration, from each run's log.jsonl:", "", "![distillation curves](curves.png)", ""]
    grids = sorted(run_dir.rglob("grid.png"))
    if grids:
        lines += ["## Synthetic images", ""]
    for g in grids:
        lines += [f"Synthetic images ({g.parent.relative_to(run_dir).as_posix()}):", "",
                  f"![grid]({g.relative_to(run_dir).as_posix()})", ""]
    md = "\n".join(lines) + "\n"
    atomic_write_text(run_dir / "report.md", md)
    html = _to_html(md, run_dir)
    atomic_write_text(run_dir / "report.html", html)
    return run_dir / "report.md"


def _to_html(md: str, base: Path) -> str:
    import html as H
    import re

    out = ["<!doctype html><meta charset='utf-8'><title>ltdd report</title>",
           "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style>"]
    table: list[str] = []
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("- ") for c in cells):
                continue
            tag = "th" if not table else "td"
            table.append("<tr>" + "".join(f"<{tag}>{H.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            out.append("<table>" + "".join(table) + "</table>")
            table = []
        m = re.match(r"!\[(.*)\]\((.*)\)", line)
        if m:
            data = base64.b64encode((base / m.group(2)).read_bytes()).decode()
            out.append(f"<p><img alt='{H.escape(m.group(1))}' src='data:image/png;base64,{data}'></p>")
        elif line.startswith("# "):
            out.append(f"<h1>{H.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{H.escape(line[3:])}</h2>")
        elif line.startswith("**") and line.endswith("**") and len(line) > 4:
            out.append(f"<p><strong>{H.escape(line[2:-2])}</strong></p>")
        elif line.strip():
            out.append(f"<p>{H.escape(line)}</p>")
    if table:
        out.append("<table>" + "".join(table) + "</table>")
    return "\n".join(out) + "\n"
