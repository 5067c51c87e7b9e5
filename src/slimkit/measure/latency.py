"""Wall-clock latency: the one timer every latency figure in slimkit goes through.

- :func:`call_times_ms`: the primitive. ``warmup`` untimed calls of a no-argument function
  (they absorb lazy initialisation and cache warm-up), then ``runs`` calls each timed with
  ``time.perf_counter`` around the whole call, with ``threads`` torch intra-op threads
  (None: as set) and the thread count restored afterwards.
- :func:`time_callable`: :class:`LatencyStats` of those times, for what is not an
  ``nn.Module`` (an ONNX Runtime session, an ExecuTorch program, a numba kernel).
- :func:`measure_latency`: a model's forward on ``example_inputs``, in eval mode under
  ``torch.inference_mode`` (the first warmup run also checks the input; on CUDA the device
  is synchronised before the clock is read); every module's mode is restored afterwards.

The p99 is the 99th percentile with linear interpolation, so with fewer than 100 runs it
lies between the two slowest runs.

>>> import torch
>>> from torch import nn
>>> stats = measure_latency(nn.Linear(8, 8), torch.zeros(1, 8), warmup=1, runs=5)
>>> 0 < stats.median_ms <= stats.p99_ms <= stats.max_ms
True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.measure.inputs import as_args, eval_mode, num_threads, run_forward

#: torch intra-op threads a run (``slimkit compress``, recipe ``latency_threads``) and ``slimkit profile``
#: time with unless told otherwise. One thread: batch-1 latency of a small CNN then depends neither on
#: the machine's core count nor on what else runs on it (torch's own default, one thread per core, gave
#: 0.33 ms and 64 ms for the same LeNet-5 in one run on a loaded machine), it matches the ONNX Runtime
#: sessions (one intra-op thread) and a single-core embedded target.
DEFAULT_LATENCY_THREADS = 1


@dataclass(frozen=True)
class LatencyStats:
    """Timings of one forward of the example batch, in milliseconds, and the thread count used."""

    median_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    runs: int
    threads: int


def _sync(args: tuple[torch.Tensor, ...]) -> None:
    for t in args:
        if t.is_cuda:
            torch.cuda.synchronize(t.device)
            return


def _check_counts(warmup: Any, runs: Any, min_runs: int = 1) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < min_runs:
        raise ConfigError(f"runs must be an integer >= {min_runs}, got {runs!r}")


def call_times_ms(fn: Callable[[], Any], *, warmup: int = 5, runs: int = 30, threads: int | None = None,
                  sync: Callable[[], None] | None = None) -> np.ndarray:
    """Wall times of ``runs`` calls of ``fn()``, milliseconds (float64 ``[runs]``), after ``warmup`` untimed calls.

    ``threads``: torch intra-op threads while timing (None: as set); restored afterwards.
    ``sync``: called after the warmup and inside each timed window, after ``fn()`` (a CUDA
    synchronise, so that the clock sees the kernels finish).
    """
    _check_counts(warmup, runs)
    times = np.empty(runs, dtype=np.float64)
    with num_threads(threads):
        for _ in range(warmup):
            fn()
        if sync is not None:
            sync()
        for i in range(runs):
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[i] = time.perf_counter() - start
    return times * 1e3


def latency_stats(times_ms: np.ndarray, threads: int) -> LatencyStats:
    """:class:`LatencyStats` of per-run times in milliseconds (``threads``: the thread count they ran with)."""
    ms = np.asarray(times_ms, dtype=np.float64)
    return LatencyStats(
        median_ms=float(np.median(ms)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        runs=int(ms.size),
        threads=threads,
    )


def time_callable(fn: Callable[[], Any], *, warmup: int = 5, runs: int = 30,
                  threads: int | None = None) -> LatencyStats:
    """Timings of ``fn()`` (one inference of an engine that is not an ``nn.Module``); see :func:`call_times_ms`."""
    with num_threads(threads) as used:
        return latency_stats(call_times_ms(fn, warmup=warmup, runs=runs), used)


def measure_latency(
    model: nn.Module, example_inputs: Any, *, warmup: int = 5, runs: int = 30, threads: int | None = None
) -> LatencyStats:
    """Time ``runs`` forwards of ``example_inputs`` after ``warmup`` untimed ones; see the module docstring."""
    _check_counts(warmup, runs)
    args = as_args(example_inputs)
    with num_threads(threads) as used, eval_mode(model), torch.inference_mode():
        run_forward(model, args)  # fails fast with a clear message on a bad input
        times = call_times_ms(lambda: model(*args), warmup=max(warmup - 1, 0), runs=runs,
                              sync=lambda: _sync(args))
    return latency_stats(times, used)


def interleaved_ms(candidates: dict[str, Callable[[], Any]], repeats: int = 20, warmup: int = 2,
                   min_seconds: float = 0.0, max_repeats: int = 500, threads: int | None = None) -> dict[str, float]:
    """Median milliseconds per call of each candidate, called round-robin after ``warmup`` rounds.

    Timing ``a`` 50 times and then ``b`` 50 times lets a burst of other load land on one of
    them; called in turn, once each per round, every candidate sees the same machine. At least
    ``repeats`` rounds; more (up to ``max_repeats``) until ``min_seconds`` have passed, so that
    fast candidates get enough samples for a median that a scheduler time slice (several ms on
    a loaded machine) cannot move. ``threads``: torch intra-op threads (None: as set; restored).
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with num_threads(threads):
        for _ in range(warmup):
            for fn in candidates.values():
                fn()
        began = time.perf_counter()
        rounds = 0
        while rounds < repeats or (rounds < max_repeats and time.perf_counter() - began < min_seconds):
            rounds += 1
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}
