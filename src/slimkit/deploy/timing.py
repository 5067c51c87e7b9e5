"""Wall-clock timing shared by every engine: the median of repeated batch-1 runs.

>>> median_ms(lambda: sum(range(100)), warmup=1, repeats=5) > 0
True
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def median_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 30) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def file_bytes(path: str | os.PathLike) -> int:
    """Size of the file at ``path`` in bytes."""
    return Path(path).stat().st_size
