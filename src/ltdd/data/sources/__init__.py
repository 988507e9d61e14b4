"""Raw image sources by name: importing this package registers every loader; :func:`load_source` picks one.

The sources: CIFAR-10/100 python pickles (:mod:`.cifar`), ImageFolder trees or archives (:mod:`.imagefolder`),
Tiny-ImageNet-200 in its official layout (:mod:`.tiny_imagenet`) and scikit-learn's digits (:mod:`.digits`). The
containers and the registry are in :mod:`.base`; the file-based sources share the folder/archive view
(:mod:`.tree`), image decoding (:mod:`.images`) and the ``.npz`` cache of decoded arrays (:mod:`.decoded_cache`).
"""

from . import cifar, digits, imagefolder, tiny_imagenet  # noqa: F401  (each registers its loaders)
from .base import ImageSet, SourceData, list_sources, load_source, register_source
from .cifar import restricted_pickle_load
from .decoded_cache import _resolve_cache_dir, default_cache_dir  # noqa: F401  (_resolve_cache_dir: data.pipeline)

__all__ = [
    "ImageSet",
    "SourceData",
    "load_source",
    "list_sources",
    "register_source",
    "default_cache_dir",
    "restricted_pickle_load",
]
