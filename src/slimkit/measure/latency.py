"""Wall-clock latency of a forward pass: median and p99 over repeated runs (the real-time view).

The model runs in eval mode under ``torch.inference_mode``: ``warmup`` untimed runs (at
least one, which also checks the input; they absorb lazy initialisation and cache warm-up),
then ``runs`` timed runs, each measured with ``time.perf_counter`` around one full forward
(on CUDA the device is synchronised before the clock is read). The p99 is the 99th
percentile with linear interpolation, so with fewer than 100 runs it lies between the two
slowest runs. Modes and the torch thread count are restored afterwards.

>>> import torch
>>> from torch import nn
>>> stats = measure_latency(nn.Linear(8, 8), torch.zeros(1, 8), warmup=1, runs=5)
>>> 0 < stats.median_ms <= stats.p99_ms <= stats.max_ms
True
"""

from __future__ import annotations

import time
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


def measure_latency(
    model: nn.Module, example_inputs: Any, *, warmup: int = 5, runs: int = 30, threads: int | None = None
) -> LatencyStats:
    """Time ``runs`` forwards of ``example_inputs`` after ``warmup`` untimed ones; see the module docstring."""
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"runs must be an integer >= 1, got {runs!r}")
    args = as_args(example_inputs)
    times = np.empty(runs, dtype=np.float64)
    with num_threads(threads) as used, eval_mode(model), torch.inference_mode():
        run_forward(model, args)  # fails fast with a clear message on a bad input
        for _ in range(max(warmup - 1, 0)):
            model(*args)
        _sync(args)
        for i in range(runs):
            start = time.perf_counter()
            model(*args)
            _sync(args)
            times[i] = time.perf_counter() - start
    ms = times * 1e3
    return LatencyStats(
        median_ms=float(np.median(ms)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        runs=runs,
        threads=used,
    )
