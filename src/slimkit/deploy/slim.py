"""Writing the ``.slim`` container (:mod:`slimkit.encode.container`) as a deployable file.

Weight-shared layers are stored as Huffman-coded sparse indices, quantized and binary
layers bit-packed, everything else raw; the file is written atomically and decodes
exactly (Han, Mao & Dally 2016, "Deep Compression").
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from slimkit.deploy.results import SlimFile


def write_slim(model: nn.Module, path: str | os.PathLike, formats: tuple[str, ...] | None = None) -> SlimFile:
    """Store ``model`` in a ``.slim`` container at ``path`` (atomically); its path and size in bytes.

    ``formats``: the sparse layouts to try (default: all of :data:`slimkit.encode.sparse.FORMATS`).
    """
    from slimkit.encode.container import save

    path = Path(path)
    if formats is None:
        save(model, path)
    else:
        save(model, path, formats=tuple(formats))
    return SlimFile(str(path), path.stat().st_size)
