"""Process-wide runtime settings that every ``ltdd`` command applies once at start (CPU malloc tuning).

On CPU with glibc, every tensor above 32 MiB is by default a fresh ``mmap`` whose pages are faulted in and zeroed on
first touch, and freed heap memory is trimmed back to the operating system; a training loop that allocates and
frees large activations every step then spends much of its time in page faults (``benchmarks/malloc_tuning.py``
measures plain training and prediction; ``benchmarks/step_cost.py`` the distillation engine). The CLI applies
:func:`tune_cpu_malloc` before any command runs; library users call it themselves (or set
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1`` in the environment). ``LTDD_MALLOC_TUNING=0`` turns it off for the
CLI.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_MALLOC_TUNED = False


def tune_cpu_malloc() -> bool:
    """glibc: allocate large blocks from the heap instead of fresh ``mmap``s and never give freed heap memory back
    to the operating system (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, -1)``), so that the large
    tensors of every step reuse pages that are already mapped instead of faulting in and zeroing new ones.

    Process-wide and permanent for this process, like a caching allocator: the peak is unchanged, but the
    process's resident memory stays at its peak. Returns whether it was applied (False on non-glibc platforms).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _MALLOC_TUNED = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))
    return _MALLOC_TUNED


def configure_process() -> dict:
    """Everything the CLI applies once per process; returns what was applied (for logs)."""
    tuned = False
    if os.environ.get("LTDD_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off"):
        tuned = tune_cpu_malloc()
    return {"malloc_tuning": tuned}
