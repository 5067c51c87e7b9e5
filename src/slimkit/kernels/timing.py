"""Timing candidates fairly on a noisy machine: round-robin medians.

:func:`interleaved_ms` lives in :mod:`slimkit.measure.latency`, the one timer (re-exported
here for the kernels, the encode stage and the benchmarks that import it from this module).

>>> sorted(interleaved_ms({"a": lambda: None, "b": lambda: None}, repeats=3, warmup=0))
['a', 'b']
"""

from slimkit.measure.latency import interleaved_ms

__all__ = ["interleaved_ms"]
