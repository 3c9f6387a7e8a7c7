"""How many threads the BLAS library may use for the engine's matrix products.

Measured on the 2-core development machine (OpenBLAS 0.3.31, SmolLM2-135M): decode is a
chain of matrix-vector products too small to split well, and OpenBLAS worker threads
busy-wait between calls. With 2 threads on a machine where another process keeps one
core busy, decode fell to 2-7 tok/s, against 15-26 tok/s with 1 thread under the same
load; that is what made a 1024-token RLM root turn take 175 s. One thread is therefore
the default. `0` means one thread per core (the library's own choice), `None` leaves the
count alone.

The setting is process-wide (a BLAS library has one thread pool), so it is applied once
when a model loads, not around each call: changing it while another thread is inside a
BLAS call is not safe in every library.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

DEFAULT_BLAS_THREADS = 1

_lock = threading.Lock()
_applied: int | None = None


def blas_thread_info() -> list[dict[str, object]]:
    """The BLAS libraries numpy loaded, with their current thread counts (for benches)."""
    import numpy  # noqa: F401  (the BLAS library is loaded with numpy)
    from threadpoolctl import threadpool_info

    return [
        {k: info.get(k) for k in ("internal_api", "num_threads", "version")}
        for info in threadpool_info()
        if info.get("user_api") == "blas"
    ]


def apply_blas_threads(threads: int | None) -> int | None:
    """Set the BLAS thread count for this process (0: one per core; None: leave it).

    Returns the count now in force (None when left alone). Safe to call repeatedly: the
    library is only touched when the wanted count changes.
    """
    global _applied
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"blas_threads must be an integer >= 0, got {threads!r}")
    if threads == 0:
        threads = os.cpu_count() or 1
    with _lock:
        if _applied == threads:
            return threads
        import numpy  # noqa: F401  (load the BLAS library before limiting it)
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")
        _applied = threads
        log.debug("BLAS limited to %d thread(s)", threads)
        return threads
