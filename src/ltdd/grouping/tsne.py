"""t-SNE plot (PNG) of features with the k-means centres embedded jointly, coloured by class, marked by group."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import atomic_write_bytes
from ..errors import LtddError
from .groups import groups_to_labels
from .threads import _threads_for

__all__ = ["tsne_plot"]

_GROUP_MARKERS = ("o", "s", "D", "P", "X", "v", "<", ">", "h", "*")
_GROUP_EDGES = ("black", "red", "blue", "darkgreen", "purple", "orange", "brown", "magenta", "gray", "olive")


def tsne_plot(features: np.ndarray, labels: np.ndarray, centroids: Sequence[np.ndarray] | None, groups,
              class_names: Sequence[str], path: str | Path, perplexity: float = 50.0, seed: int = 0,
              title: str | None = None, max_points: int | None = 3000, pca_dims: int = 50) -> dict:
    """t-SNE of ``features`` (PCA to ``pca_dims`` first when wider) with the k-means ``centroids`` embedded jointly
    with the points; points coloured by class and marked by group, centres drawn as large triangles outlined in
    their group's colour. Writes a PNG atomically; returns ``{"path", "points", "perplexity"}``.

    ``perplexity`` is lowered to ``(n - 1) / 3`` when there are too few points; ``max_points`` subsamples the points
    (stratified by class, deterministic in ``seed``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = len(class_names)
    glab = groups_to_labels(groups, num_classes)
    rng = np.random.default_rng(seed)
    idx = np.arange(len(labels))
    if max_points is not None and len(idx) > max_points:
        keep = []
        for c in range(num_classes):
            ic = np.flatnonzero(labels == c)
            take = max(1, int(round(max_points * len(ic) / len(labels)))) if len(ic) else 0
            keep.append(rng.choice(ic, size=min(take, len(ic)), replace=False))
        idx = np.sort(np.concatenate(keep))
    pts = features[idx]
    plab = labels[idx]
    cen = [np.asarray(c, dtype=np.float64) for c in centroids] if centroids is not None else []
    clab = np.concatenate([np.full(len(c), i) for i, c in enumerate(cen)]).astype(np.int64) if cen else \
        np.zeros(0, dtype=np.int64)
    allx = np.concatenate([pts] + cen) if cen else pts
    n = len(allx)
    if n < 4:
        raise LtddError(f"t-SNE needs at least 4 points, got {n}")
    perp = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    with _threads_for(n):
        if allx.shape[1] > pca_dims and n > pca_dims:
            allx = PCA(n_components=pca_dims, random_state=seed).fit_transform(allx)
        emb = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto",
                   random_state=seed).fit_transform(allx)
    ep, ec = emb[:len(pts)], emb[len(pts):]

    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    colour = [cmap(c % cmap.N) for c in range(num_classes)]
    fig = Figure(figsize=(8.5, 7.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for c in range(num_classes):
        sel = plab == c
        if sel.any():
            ax.scatter(ep[sel, 0], ep[sel, 1], s=9, alpha=0.55, color=colour[c],
                       marker=_GROUP_MARKERS[glab[c] % len(_GROUP_MARKERS)], linewidths=0)
    for c in range(num_classes):
        sel = clab == c
        if sel.any():
            ax.scatter(ec[sel, 0], ec[sel, 1], s=140, marker="^", color=colour[c],
                       edgecolors=_GROUP_EDGES[glab[c] % len(_GROUP_EDGES)], linewidths=2.0, zorder=5)
    handles = [Line2D([], [], marker="o", linestyle="", color=colour[c],
                      label=f"{class_names[c]} (G{glab[c] + 1})") for c in range(num_classes)] if num_classes <= 20 \
        else []
    handles += [Line2D([], [], marker=_GROUP_MARKERS[g % len(_GROUP_MARKERS)], linestyle="", color="gray",
                       markeredgecolor=_GROUP_EDGES[g % len(_GROUP_EDGES)], markeredgewidth=1.5,
                       label=f"group {g + 1}") for g in range(int(glab.max()) + 1)]
    if cen:
        handles.append(Line2D([], [], marker="^", linestyle="", color="lightgray", markeredgecolor="black",
                              markersize=10, label="k-means centre"))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "t-SNE of penultimate features", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return {"path": str(path), "points": int(len(pts)), "centres": int(len(ec)), "perplexity": perp}
