"""Process-wide settings slimkit changes, each behind a context manager that puts it back.

- torch's intra-op thread count: :func:`num_threads` (the one in :mod:`slimkit.measure.inputs`);
- torch's quantized engine (``torch.backends.quantized.engine``, the kernels int8 ops pack
  their weights for): :func:`quantized_engine`;
- numba's thread count and threading layer: :func:`numba_threads`.

Each restores the value it found on leaving the block, also when the block raises, so that
running a recipe, deploying or timing a kernel leaves a caller's process as it was.
:func:`snapshot` reads all three (what tests compare before and after).

>>> import torch
>>> before = torch.get_num_threads()
>>> with num_threads(1):
...     torch.get_num_threads()
1
>>> torch.get_num_threads() == before
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from slimkit.exceptions import ConfigError
from slimkit.measure.inputs import num_threads

__all__ = ["num_threads", "numba_threads", "quantized_engine", "snapshot"]

#: the numba threading layer slimkit starts when the user chose none: ``omp`` spin-waits after
#: every parallel region against torch's own threads (measured in slimkit.kernels._threads)
NUMBA_LAYER = "workqueue"


@contextmanager
def quantized_engine(engine: str) -> Iterator[str]:
    """Run with ``torch.backends.quantized.engine = engine`` (e.g. ``x86``, ``qnnpack``) and restore it afterwards.

    An engine this torch build lacks is a ConfigError naming the ones it has.
    """
    supported = list(torch.backends.quantized.supported_engines)
    if engine not in supported:
        raise ConfigError(f"quantized engine {engine!r} is not available in this torch build "
                          f"(available: {', '.join(e for e in supported if e != 'none')})")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield engine
    finally:
        if torch.backends.quantized.engine != before:
            torch.backends.quantized.engine = before


@contextmanager
def numba_threads(count: int, layer: str | None = NUMBA_LAYER) -> Iterator[int]:
    """Run numba's parallel code on ``count`` threads (capped at its pool size) and restore the count afterwards.

    Setting a count starts numba's threading layer, which then stays for the process (numba
    cannot stop it). ``layer`` is the one started when the user chose none
    (``numba.config.THREADING_LAYER`` is ``"default"`` and ``NUMBA_THREADING_LAYER`` unset); the
    configured choice is put back on leaving. Yields the count set.
    """
    import numba

    chosen = numba.config.THREADING_LAYER
    if layer is not None and chosen == "default":
        numba.config.THREADING_LAYER = layer
    try:
        before = numba.get_num_threads()  # starts the layer (with the choice above)
        count = max(1, min(int(count), numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(count)
        try:
            yield count
        finally:
            numba.set_num_threads(before)
    finally:
        numba.config.THREADING_LAYER = chosen


def snapshot() -> dict[str, Any]:
    """torch's thread count and quantized engine, numba's configured layer and (once started) its thread count.

    Reading numba's count would start its threading layer, so before it runs ``numba_threads`` is None.
    """
    state: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                             "quantized_engine": torch.backends.quantized.engine}
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return state
    state["numba_layer"] = numba.config.THREADING_LAYER
    try:
        numba.threading_layer()  # raises ValueError until a layer runs
    except ValueError:
        state["numba_threads"] = None
    else:
        state["numba_threads"] = numba.get_num_threads()
    return state
