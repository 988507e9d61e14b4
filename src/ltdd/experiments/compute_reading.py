"""The automatic reading of an accuracy-vs-compute table: the best method per budget decade and where two curves cross.

Inputs are plain numbers - ``{method: [{"name", "compute", "mean", "std"}, ...]}`` with compute in single-core
seconds and accuracies as fractions - so the logic is tested on hand-made curves. A curve is its points sorted by
compute, joined by straight segments in log10(compute).
"""

from __future__ import annotations

import math

__all__ = ["curve", "best_per_decade", "crossing", "beyond", "crossing_text", "decade_lines", "coverage", "coverage_line"]

MIN_POINTS, MIN_SPAN, LARGEST_S = 3, 10.0, 5400.0  # the table's aim per method (trajectory methods: the largest too)


def curve(points: list[dict]) -> list[dict]:
    """The points with a measured compute > 0, sorted by compute."""
    return sorted((p for p in points if p.get("compute") and p["compute"] > 0 and p.get("mean") is not None),
                  key=lambda p: p["compute"])


def _interp(c: list[dict], lx: float, key: str) -> float:
    xs = [math.log10(p["compute"]) for p in c]
    for i in range(len(c) - 1):
        if xs[i] <= lx <= xs[i + 1]:
            t = 0.0 if xs[i + 1] == xs[i] else (lx - xs[i]) / (xs[i + 1] - xs[i])
            return c[i][key] + t * (c[i + 1][key] - c[i][key])
    raise ValueError("outside the curve")


def best_per_decade(curves: dict[str, list[dict]]) -> list[dict]:
    """For every decade [10^k, 10^(k+1)) of single-core seconds that holds a point: the best point inside it and the
    best point affordable within its upper edge (any compute below 10^(k+1))."""
    pts = [dict(p, method=m) for m, c in curves.items() for p in curve(c)]
    if not pts:
        return []
    lo = math.floor(math.log10(min(p["compute"] for p in pts)))
    hi = math.floor(math.log10(max(p["compute"] for p in pts)))
    out = []
    for k in range(lo, hi + 1):
        inside = [p for p in pts if 10 ** k <= p["compute"] < 10 ** (k + 1)]
        if not inside:
            continue
        afford = [p for p in pts if p["compute"] < 10 ** (k + 1)]
        out.append({"decade": k, "best": max(inside, key=lambda p: p["mean"]),
                    "within": max(afford, key=lambda p: p["mean"])})
    return out


def crossing(a: list[dict], b: list[dict]) -> dict:
    """Where curve ``a`` crosses curve ``b`` over the compute range both cover.

    ``status``: ``few`` (a curve has fewer than 2 points), ``disjoint`` (no common compute range), ``crosses``
    (the difference a - b changes sign: ``at`` lists each crossing as ``(seconds, "up" | "down")``, up = a rises
    above b) or ``above`` / ``below`` (a stays on one side). ``clear``: the gap exceeds the two curves' combined
    standard deviation on both sides of every crossing (or, without one, somewhere in the range).
    """
    a, b = curve(a), curve(b)
    if len(a) < 2 or len(b) < 2:
        return {"status": "few", "points": (len(a), len(b))}
    lo = max(math.log10(a[0]["compute"]), math.log10(b[0]["compute"]))
    hi = min(math.log10(a[-1]["compute"]), math.log10(b[-1]["compute"]))
    if lo >= hi:
        return {"status": "disjoint", "range": None}
    knots = sorted({lo, hi, *(math.log10(p["compute"]) for p in a + b if lo < math.log10(p["compute"]) < hi)})
    d = [_interp(a, x, "mean") - _interp(b, x, "mean") for x in knots]
    s = [math.hypot(_interp(a, x, "std"), _interp(b, x, "std")) for x in knots]
    signed = [(x, v, sd) for x, v, sd in zip(knots, d, s) if v != 0]
    at, clear = [], True
    for (x0, v0, _), (x1, v1, _) in zip(signed, signed[1:]):
        if (v0 > 0) != (v1 > 0):
            lx = x0 + (x1 - x0) * v0 / (v0 - v1)
            at.append((10 ** lx, "up" if v1 > 0 else "down"))
            before = [abs(v) > sd for x, v, sd in signed if x < lx and (v > 0) == (v0 > 0)]
            after = [abs(v) > sd for x, v, sd in signed if x > lx and (v > 0) == (v1 > 0)]
            clear = clear and any(before) and any(after)
    out = {"range": (10 ** lo, 10 ** hi), "gaps": [(10 ** x, v, sd) for x, v, sd in zip(knots, d, s)],
           "beyond": beyond(a, b)}
    if at:
        return {**out, "status": "crosses", "at": at, "clear": clear}
    side = "above" if all(v >= 0 for v in d) else "below"
    return {**out, "status": side, "clear": any(abs(v) > sd for v, sd in zip(d, s))}


def beyond(a: list[dict], b: list[dict]) -> dict | None:
    """Curve ``a``'s best point at a compute beyond ``b``'s largest, against ``b``'s best point anywhere (the
    curves cannot be compared there, but a set better than every one of ``b``'s is an answer); None when ``a`` has
    no point beyond ``b``'s range."""
    a, b = curve(a), curve(b)
    if not a or not b:
        return None
    far = [p for p in a if p["compute"] > b[-1]["compute"]]
    if not far:
        return None
    best_a, best_b = max(far, key=lambda p: p["mean"]), max(b, key=lambda p: p["mean"])
    return {"b_largest": b[-1]["compute"], "a": best_a, "b_best": best_b,
            "above": best_a["mean"] > best_b["mean"],
            "clear": abs(best_a["mean"] - best_b["mean"]) > math.hypot(best_a.get("std", 0), best_b.get("std", 0))}


def _beyond_text(a_name: str, b_name: str, r: dict | None) -> str:
    if not r:
        return ""
    a, b = r["a"], r["b_best"]
    return (f"; beyond {b_name}'s largest point ({_sec(r['b_largest'])} s), {a_name} reaches {100 * a['mean']:.1f} % "
            f"at {_sec(a['compute'])} s, {'above' if r['above'] else 'below'} every {b_name} point ({b_name}'s best: "
            f"{100 * b['mean']:.1f} % at {_sec(b['compute'])} s)"
            + ("" if r["clear"] else ", within the runs' spread"))


def crossing_text(a_name: str, b_name: str, res: dict, done: tuple[int, int] | None = None,
                  planned: tuple[int, int] | None = None) -> str:
    """One sentence from :func:`crossing`; 'not enough points yet' while planned points of either curve are
    missing (with the provisional reading when there is one)."""
    def pct(v: float) -> str:
        return f"{100 * v:+.1f}"

    missing = done is not None and planned is not None and (done[0] < planned[0] or done[1] < planned[1])
    head = (f"not enough points yet ({a_name} {done[0]}/{planned[0]}, {b_name} {done[1]}/{planned[1]} points done)"
            if missing else "")
    st = res["status"]
    if st == "few":
        return head or "not enough points yet (fewer than two finished points on a curve)"
    if st == "disjoint":
        body = f"{a_name}'s and {b_name}'s points cover no common compute range, so the curves cannot be compared"
    else:
        lo, hi = res["range"]
        gaps = ", ".join(f"{pct(v)} pts at {_sec(x)} s" for x, v, _ in (res["gaps"][0], res["gaps"][-1]))
        if st == "crosses":
            where = "; ".join(f"{'rises above' if direction == 'up' else 'falls below'} {b_name} at about {_sec(x)} "
                              f"single-core s" for x, direction in res["at"])
            body = (f"{a_name}'s curve crosses {b_name}'s: it {where} (common range {_sec(lo)}-{_sec(hi)} s; gap "
                    f"{a_name} - {b_name}: {gaps}); "
                    + ("the gaps on both sides exceed the runs' spread" if res["clear"] else
                       "but the gaps are within the runs' spread (std), so the crossing is not resolved"))
        else:
            body = (f"{a_name}'s curve does not cross {b_name}'s: it stays {st} it over {_sec(lo)}-{_sec(hi)} "
                    f"single-core s (gap {a_name} - {b_name}: {gaps})"
                    + ("" if res["clear"] else "; the gap is within the runs' spread (std) throughout"))
    body += _beyond_text(a_name, b_name, res.get("beyond"))
    return f"{head}; so far: {body}" if head else body


def _sec(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def decade_lines(rows: list[dict], random: dict | None = None) -> list[str]:
    """Markdown bullets of :func:`best_per_decade`, each beside the random baseline when there is one."""
    out = []
    for r in rows:
        k, b, w = r["decade"], r["best"], r["within"]
        line = (f"10^{k}-10^{k + 1} s: best in this decade **{b['method']}** ({b['name']}, "
                f"{100 * b['mean']:.1f}±{100 * b['std']:.1f} % at {_sec(b['compute'])} s)")
        if w["name"] != b["name"]:
            line += (f"; best within {10 ** (k + 1)} s: {w['method']} ({w['name']}, {100 * w['mean']:.1f} % at "
                     f"{_sec(w['compute'])} s)")
        if random is not None:
            margin = b["mean"] - random["mean"]
            line += (f"; {100 * margin:+.1f} pts vs random"
                     + (" (within random's std)" if abs(margin) <= random["std"] else ""))
        out.append(line)
    return out


def coverage(method: str, points: list[dict], planned: int, *, trajectory: bool) -> dict:
    """How far a method's finished points cover the budget axis: their number (of ``planned``), the measured compute
    range and its span (largest / smallest), and whether the table's aim holds - at least 3 points spanning at least
    10x in compute, and for a trajectory method (experts included) a largest point of at least 1.5 single-core
    hours."""
    c = curve(points)
    lo, hi = (c[0]["compute"], c[-1]["compute"]) if c else (None, None)
    span = hi / lo if c else None
    missing = []
    if len(c) < MIN_POINTS:
        missing.append(f"{MIN_POINTS} points")
    if span is None or span < MIN_SPAN:
        missing.append(f"a {MIN_SPAN:.0f}x span")
    if trajectory and (hi is None or hi < LARGEST_S):
        missing.append(f"a point of {LARGEST_S / 3600:.1f} h")
    return {"method": method, "done": len(c), "planned": int(planned), "lo": lo, "hi": hi, "span": span,
            "trajectory": bool(trajectory), "met": not missing, "missing": missing}


def coverage_line(cov: dict) -> str:
    """One markdown bullet of :func:`coverage`."""
    head = f"{cov['method']}: {cov['done']} of {cov['planned']} points"
    if cov["done"]:
        head += (f", {_sec(cov['lo'])}-{_sec(cov['hi'])} single-core s ({cov['span']:.1f}x), largest "
                 f"{cov['hi'] / 3600:.2f} h")
    aim = "at least 3 points over at least 10x" + (", the largest at least 1.5 h" if cov["trajectory"] else "")
    return head + f"; aim ({aim}): " + ("met" if cov["met"] else "not met (lacks " + ", ".join(cov["missing"]) + ")")
