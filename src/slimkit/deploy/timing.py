"""Sizes of deployed files. Timing lives in one place, :mod:`slimkit.measure.latency`
(:func:`~slimkit.measure.latency.measure_latency` for a model,
:func:`~slimkit.measure.latency.time_callable` for an engine's callable).

>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = pathlib.Path(tmp) / "m.bin"
...     _ = path.write_bytes(b"1234")
...     file_bytes(path)
4
"""

from __future__ import annotations

import os
from pathlib import Path


def file_bytes(path: str | os.PathLike) -> int:
    """Size of the file at ``path`` in bytes."""
    return Path(path).stat().st_size
