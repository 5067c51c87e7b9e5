"""How slimkit's numba kernels use threads: serial ``nogil`` kernels split over a small Python thread pool.

Why not numba's ``parallel=True``: its threading layers either spin-wait after every
parallel region and fight torch's own OpenMP threads (``omp``: measured 1.06x over fp32
conv at 2 threads on a busy 2-core machine, vs 13.8x at 1 thread) or pay a scheduling cost
on every call (``workqueue``: 2.4x / 1.5x at 1 / 2 threads on an idle one,
docs/quantization.md). A kernel here is compiled serial with ``nogil=True`` and takes a
``[start, stop)`` range of its outer loop; :func:`parallel_for` runs it on the caller's
thread alone (1 thread: no pool, no threading layer at all) or on ``threads`` pool threads,
which block on a queue when idle instead of spinning. ``threads`` defaults to
``torch.get_num_threads()``: a kernel runs on the threads the user gave the model.
Nothing here starts numba's threading layer or changes its configuration (numba's process-wide
settings are the caller's; :func:`slimkit.global_state.numba_threads` sets and restores them).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="slimkit-kernel"), workers
        return _pool


def threads_for(threads: int | None = None) -> int:
    """The thread count a kernel runs on: ``threads`` or torch's intra-op count, at least 1."""
    return max(1, int(threads if threads is not None else torch.get_num_threads()))


def parallel_for(kernel, jobs: int, *args, threads: int | None = None, min_jobs_per_thread: int = 1) -> None:
    """Run ``kernel(*args, start, stop)`` over ``range(jobs)`` split into equal chunks, one per thread.

    ``kernel`` must be a numba ``nogil`` function that writes its results into arrays passed
    in ``args`` (chunks never overlap). Small jobs run on the calling thread only.
    """
    count = min(threads_for(threads), max(1, jobs // max(min_jobs_per_thread, 1)))
    if count <= 1 or jobs <= 1:
        kernel(*args, 0, jobs)
        return
    bounds = [jobs * i // count for i in range(count + 1)]
    pool = _executor(count - 1)
    futures = [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, count)]
    kernel(*args, bounds[0], bounds[1])  # the caller's thread takes the first chunk
    for future in futures:
        future.result()
