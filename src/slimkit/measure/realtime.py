"""The real-time view: latency percentiles, jitter and deadline misses over many batch-1 runs.

A camera pipeline at F frames per second gives every frame a deadline of ``1000 / F`` ms;
what matters is not the median but how often a frame is late. :func:`realtime_stats`
times ``runs`` calls of one inference (after ``warmup`` untimed ones) with
``time.perf_counter`` and reports p50, p99 and max latency, the jitter (standard deviation,
and p99 - p50), the share of runs over the deadline and the margin of the p99 to it.
:func:`realtime_profile` does it for a model on an engine (``eager``: PyTorch,
``onnxruntime``: the fp32 ONNX export, ``onnxruntime-int8``: the int8 QDQ export of a
quantized model), with a fixed thread count.

>>> stats = realtime_stats(lambda: sum(range(100)), runs=200, deadline_ms=50.0)
>>> stats.p50_ms <= stats.p99_ms <= stats.max_ms, stats.miss_rate, stats.meets
(True, 0.0, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from slimkit.exceptions import ConfigError
from slimkit.measure.inputs import num_threads
from slimkit.measure.latency import call_times_ms


@dataclass(frozen=True)
class RealtimeStats:
    """Timings of ``runs`` batch-1 inferences, milliseconds; deadline figures when one was given.

    ``miss_rate``: fraction of runs slower than ``deadline_ms``; ``margin_ms``: deadline minus
    p99 (negative: the p99 misses it); ``meets``: p99 within the deadline.
    """

    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    jitter_ms: float
    p99_minus_p50_ms: float
    runs: int
    deadline_ms: float | None = None
    miss_rate: float | None = None
    margin_ms: float | None = None
    meets: bool | None = None
    engine: str = ""
    threads: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Two lines for the terminal."""
        line = (f"real-time    p50 {self.p50_ms:.3f} ms, p99 {self.p99_ms:.3f} ms, max {self.max_ms:.3f} ms, "
                f"jitter {self.jitter_ms:.3f} ms (std), {self.runs} batch-1 runs"
                + (f" on {self.engine}, {self.threads} thread(s)" if self.engine else ""))
        if self.deadline_ms is None:
            return line
        verdict = "meets" if self.meets else "MISSES"
        return line + (f"\ndeadline     {self.deadline_ms:.3f} ms: {verdict} it at p99 "
                       f"(margin {self.margin_ms:+.3f} ms, {100 * self.miss_rate:.2f}% of runs late)")


def deadline_from(deadline_ms: float | None = None, fps: float | None = None) -> float | None:
    """The deadline in ms from ``--deadline-ms`` or ``--fps`` (at most one); None when neither is given."""
    if deadline_ms is not None and fps is not None:
        raise ConfigError("give --deadline-ms or --fps, not both (a frame rate F means a deadline of 1000/F ms)")
    if fps is not None:
        if not fps > 0:
            raise ConfigError(f"--fps must be > 0 frames per second, got {fps!r}")
        return 1000.0 / fps
    if deadline_ms is not None and not deadline_ms > 0:
        raise ConfigError(f"--deadline-ms must be > 0 milliseconds, got {deadline_ms!r}")
    return deadline_ms


def realtime_stats(fn: Callable[[], Any], runs: int = 500, warmup: int = 10, deadline_ms: float | None = None,
                   engine: str = "", threads: int | None = None) -> RealtimeStats:
    """Time ``runs`` calls of ``fn`` (one batch-1 inference each) after ``warmup`` untimed calls.

    Timed by :func:`slimkit.measure.latency.call_times_ms` with ``threads`` torch intra-op
    threads (None: as set; restored afterwards); ``threads`` in the result is the count used.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise ConfigError(f"runs must be an integer >= 2 (p99 needs many runs; 500 is a good default), got {runs!r}")
    with num_threads(threads) as used:
        ms = call_times_ms(fn, warmup=max(warmup, 0), runs=runs)
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    extra: dict[str, Any] = {}
    if deadline_ms is not None:
        extra = {"deadline_ms": float(deadline_ms), "miss_rate": float((ms > deadline_ms).mean()),
                 "margin_ms": float(deadline_ms - p99), "meets": bool(p99 <= deadline_ms)}
    return RealtimeStats(p50_ms=p50, p99_ms=p99, max_ms=float(ms.max()), mean_ms=float(ms.mean()),
                         jitter_ms=float(ms.std()), p99_minus_p50_ms=p99 - p50, runs=runs, engine=engine,
                         threads=used, **extra)


ENGINES = ("eager", "onnxruntime", "onnxruntime-int8")


def engine_callable(model, example, engine: str, workdir, threads: int = 1) -> Callable[[], Any]:
    """A no-argument function running one inference of ``model`` on ``example`` with ``engine``.

    ``eager``: PyTorch under ``inference_mode`` with ``threads`` intra-op threads (set for the
    process); ``onnxruntime``: the ONNX export run by ONNX Runtime (``threads`` intra-op);
    ``onnxruntime-int8``: the same for a model quantized by :func:`slimkit.quantize.quantize_`
    (exported as int8 QDQ). ``workdir``: where the ONNX file is written.
    """
    from pathlib import Path

    import torch

    if engine not in ENGINES:
        import difflib

        close = difflib.get_close_matches(engine, ENGINES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown engine {engine!r}{hint} (known: {', '.join(ENGINES)})")
    model.eval()
    if engine == "eager":
        torch.set_num_threads(threads)

        def run() -> Any:
            with torch.inference_mode():
                return model(example)

        return run
    from slimkit.export.onnx import OnnxRunner, export_onnx
    from slimkit.quantize.fake import quant_layers

    if engine == "onnxruntime-int8" and not quant_layers(model):
        raise ConfigError("engine onnxruntime-int8 runs a quantized model; quantize it first (int8 stage) or use "
                          "--engine onnxruntime")
    path = export_onnx(model, example, Path(workdir) / f"realtime.{engine}.onnx")
    runner = OnnxRunner(path, threads=threads)
    feed = {runner.input_name: example.detach().cpu().numpy().astype(np.float32)}
    return lambda: runner.session.run(None, feed)


def realtime_profile(model, example, engine: str = "eager", runs: int = 500, deadline_ms: float | None = None,
                     threads: int = 1, workdir=None) -> RealtimeStats:
    """:func:`realtime_stats` of ``model`` on a batch-1 ``example`` run by ``engine`` (see :func:`engine_callable`)."""
    import tempfile

    import torch

    example = example[:1]
    old = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fn = engine_callable(model, example, engine, workdir or tmp, threads)
            return realtime_stats(fn, runs=runs, deadline_ms=deadline_ms, engine=engine, threads=threads)
        finally:
            torch.set_num_threads(old)


def robust_p99_ms(fn: Callable[[], Any], blocks: int = 5, runs: int = 200, warmup: int = 10) -> float:
    """The median over ``blocks`` blocks of ``runs`` calls of each block's p99, milliseconds.

    On a shared machine one burst of foreign load sets the p99 of a single series; the
    median of block p99s keeps the tail of the model itself and drops a burst that hit
    one block (every block is still a plain p99 over ``runs`` runs).
    """
    return float(np.median([realtime_stats(fn, runs=runs, warmup=warmup if b == 0 else 0).p99_ms
                            for b in range(blocks)]))
