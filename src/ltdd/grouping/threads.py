"""One thread for small scikit-learn problems (k-means, spectral clustering, t-SNE) when the cores are shared.

sklearn's OpenMP/BLAS pools spin badly on small problems when the cores are shared (a 51-point t-SNE took 2.5 s
with 2 threads vs 0.34 s with 1 on a loaded 2-core machine), so problems below :data:`SMALL_PROBLEM` rows run
single-threaded.
"""

from __future__ import annotations

SMALL_PROBLEM = 5000  # rows below which k-means and t-SNE use one thread


def _threads_for(n_rows: int):
    from contextlib import nullcontext

    if n_rows >= SMALL_PROBLEM:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)
