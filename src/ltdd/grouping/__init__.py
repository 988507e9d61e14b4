"""The grouping hypothesis of the two-stage paper (two-stage.md §5): its pieces, re-exported from one package.

Per-class k-means on penultimate features, a class-to-class distance over all centroid pairs, and a max-cut
partition of the classes into groups. Pieces, each usable alone:

* :mod:`.features`: :func:`embed_features`, :func:`class_centroids` (per-class k-means), :func:`class_distance_matrix`
  and :func:`class_distance_closed_form` (§5.3).
* :mod:`.partitions`: :func:`max_cut_bipartition` (exhaustive, up to 20 classes, ranked alternatives),
  :func:`max_cut_k` (k-way max-cut heuristic, any number of classes), :func:`partition_k` (spectral, recursive or
  k-way max-cut), :func:`partition` (dispatch), :func:`cut_value`, :func:`bipartition_rank`.
* :mod:`.groups`: :func:`check_groups`, :func:`groups_to_labels`, :func:`group_summary`, :func:`error_structure`.
* :mod:`.stability`: :func:`partition_stability`: pairwise adjusted Rand index between partitions from models
  trained on different data, against a random-partition control with the same group sizes (an empirical p-value).
* :mod:`.tsne`: :func:`tsne_plot`: t-SNE of features with the k-means centres embedded jointly.
* :mod:`.analysis`: :func:`grouping_of`, the groups one trained model gives; :func:`analyse_groups`, the whole
  analysis, returning a JSON-able dict (features from the held-out probe split by default;
  ``features_from="test"`` reproduces the paper and is flagged as such).
"""

from .analysis import _feature_split  # noqa: F401  (used by the groups CLI and benchmarks/two_stage_table.py)
from .analysis import TEST_SPLIT_WARNING, analyse_groups, grouping_of
from .features import class_centroids, class_distance_closed_form, class_distance_matrix, embed_features
from .groups import check_groups, error_structure, group_summary, groups_to_labels
from .partitions import (
    EXHAUSTIVE_MAX_CLASSES,
    all_bipartition_cuts,
    bipartition_rank,
    cut_value,
    max_cut_bipartition,
    max_cut_k,
    partition,
    partition_k,
)
from .stability import adjusted_rand_batch, partition_stability
from .tsne import tsne_plot

__all__ = [
    "embed_features",
    "class_centroids",
    "class_distance_matrix",
    "class_distance_closed_form",
    "all_bipartition_cuts",
    "max_cut_bipartition",
    "max_cut_k",
    "partition_k",
    "partition",
    "cut_value",
    "bipartition_rank",
    "check_groups",
    "groups_to_labels",
    "group_summary",
    "partition_stability",
    "adjusted_rand_batch",
    "error_structure",
    "tsne_plot",
    "analyse_groups",
    "grouping_of",
    "EXHAUSTIVE_MAX_CLASSES",
    "TEST_SPLIT_WARNING",
]
