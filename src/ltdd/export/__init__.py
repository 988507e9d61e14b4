"""Export a distilled set so that others can use it, and read such an export back (this package's public names).

Two layouts, each a folder with ``manifest.json``, ``SHA256SUMS`` and ``preprocessing.safetensors`` beside the data:

* ``imagefolder`` (:func:`export_imagefolder`): ``<class>/<i>.png``, un-whitened and un-normalised back to pixels
  with the preprocessing the set was distilled with (``Preprocessor.to_pixels``, clamped to [0, 1], rounded to
  uint8); grayscale sets give mode "L" PNGs, colour sets "RGB". Every class gets a folder (an empty one when the set
  has no image of it), so that sorted folder names give the same class indices as the set. ``<i>`` counts within
  the class, zero-padded to a common width so that name order is set order. Soft-label logits, when the set has
  them, are in ``soft_labels.safetensors`` (set order = the manifest's ``imagefolder.order``); the learned lr is in
  the manifest. Reading back re-applies the recorded preprocessing to the PNG pixels: the model-space images come
  back within PNG quantisation (half a grey level per pixel value) wherever the pixels were inside [0, 1]; the
  manifest records how many values were clamped and the round-trip error measured at export.
* ``ddranking`` (:func:`export_ddranking`): DD-Ranking's interop tensors, each written with ``torch.save`` as one
  plain tensor (they load with ``torch.load(path, weights_only=True)``): ``images.pt`` (float32 N x C x H x W,
  exactly as stored: the model's input space, i.e. normalised and, when the set was distilled with ZCA, whitened),
  ``labels.pt`` (float32 N x num_classes soft-label logits when the set has them, else int64 hard labels) and
  ``lr.pt`` (float32 scalar; only when the set has a learned step size). DD-Ranking needs class-major order with
  exactly IPC images per class: anything else is refused with a one-line error.

Both layouts also carry the set's teacher when it has one (``teacher.safetensors`` + ``teacher.json`` beside the
set, or the file its metadata names, in the :mod:`ltdd.labels` teacher format): copied as is with its description
as ``teacher.json``, and for ``ddranking`` also as ``teacher_model.pt``, ``torch.save`` of a plain state_dict of
tensors (DD-Ranking loads a .pt checkpoint), with ``teacher_model.json`` beside it.

``manifest.json`` (:data:`FORMAT`, version :data:`FORMAT_VERSION`) says everything needed to use the set without
ltdd: the dataset and its long-tailed split (imbalance factor, split seed, real count per class, fingerprint), the
n_c < IPC policy, IPC, class order and names, the preprocessing (mean/std values; the ZCA matrix is in
``preprocessing.safetensors``; fitted on the long-tailed train split, not a balanced set), the label type and
temperature, the learned lr, the evaluation protocol, the method and its resolved configuration, the ltdd version,
the set's own metadata, and the sha256 of every file written. ``SHA256SUMS`` (``sha256sum -c`` format) also covers
``manifest.json``.

Export writes into a temporary folder beside ``out_dir`` and renames it into place, so a failure leaves no partial
output. An existing non-empty ``out_dir`` is an error unless ``overwrite=True``. :func:`load_export` (and
``SyntheticSet.load`` on such a folder) verifies every checksum before reading and never unpickles.

Modules: :mod:`.manifest` (constants, class folders, provenance, manifest contents), :mod:`.staging` (atomic
staging folder, checksummed writes, ``SHA256SUMS``), :mod:`.teacher`, :mod:`.imagefolder`, :mod:`.ddranking`,
:mod:`.readback` (verification and loading).
"""

from __future__ import annotations

from .ddranking import export_ddranking
from .imagefolder import export_imagefolder
from .manifest import (CHECKSUMS, FORMAT, FORMAT_VERSION, MANIFEST, PREPROCESSING, class_folder_names,
                       find_run_config)
from .readback import is_export, load_export, verify_export
from .teacher import find_teacher

__all__ = ["export_imagefolder", "export_ddranking", "class_folder_names", "load_export", "verify_export",
           "find_run_config", "find_teacher", "is_export", "MANIFEST", "CHECKSUMS", "PREPROCESSING", "FORMAT",
           "FORMAT_VERSION"]
