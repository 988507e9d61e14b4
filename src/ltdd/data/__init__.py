"""Data: raw sources, long-tailed splits, fitted preprocessing, and the pipeline that ties them together."""

from .longtail import LongTailSplit, class_groups, longtail_counts, make_longtail, probe_split
from .pipeline import PreparedData, prepare_data
from .sources import ImageSet, SourceData, list_sources, load_source, register_source
from .transforms import ZCA, Normalizer, Preprocessor

__all__ = [
    "ImageSet",
    "SourceData",
    "load_source",
    "list_sources",
    "register_source",
    "longtail_counts",
    "LongTailSplit",
    "make_longtail",
    "probe_split",
    "class_groups",
    "Normalizer",
    "ZCA",
    "Preprocessor",
    "PreparedData",
    "prepare_data",
]
