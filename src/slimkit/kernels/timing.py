"""Timing candidates fairly on a noisy machine: round-robin medians.

Timing ``a`` 50 times and then ``b`` 50 times lets a burst of other load land on one of
them; :func:`interleaved_ms` calls the candidates in turn, once each per round, so every
candidate sees the same machine, and returns each one's median wall time in milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def interleaved_ms(candidates: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 2,
                   min_seconds: float = 0.0, max_repeats: int = 500) -> dict[str, float]:
    """Median milliseconds per call of each candidate, called round-robin after ``warmup`` rounds.

    At least ``repeats`` rounds; more (up to ``max_repeats``) until ``min_seconds`` have passed,
    so that fast candidates get enough samples for a median that a scheduler time slice
    (several ms on a loaded machine) cannot move.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    began = time.perf_counter()
    rounds = 0
    while rounds < repeats or (rounds < max_repeats and time.perf_counter() - began < min_seconds):
        rounds += 1
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}
