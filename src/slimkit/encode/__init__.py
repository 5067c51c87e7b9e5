"""slimkit.encode: Huffman coding, sparse layouts and the ``.slim`` container (Deep Compression).

``save(model, path)`` / ``load(path, model=None)`` write and read the container;
``load(path, runtime="compressed")`` returns a model whose pruned, shared layers compute
from the stored indices and codebooks (:mod:`slimkit.encode.runtime`);
``decode(path, out)`` turns a ``.slim`` file into a ``model.pt`` (slimkit.manifest format).
"""

from slimkit.encode.container import decode, dense_bytes, save  # noqa: F401

RUNTIMES = ("decoded", "compressed")


def load(path, model=None, runtime: str = "decoded"):
    """Rebuild the model stored in a ``.slim`` file, in eval mode.

    ``runtime="decoded"`` (default): every tensor decoded to its dense form
    (:func:`slimkit.encode.container.load`). ``runtime="compressed"``: pruned, weight-shared
    Linear/Conv2d layers stay as b-bit indices + codebook and run sparse kernels
    (:func:`slimkit.encode.runtime.load_compressed`).
    """
    from slimkit.encode import container
    from slimkit.exceptions import ConfigError

    if runtime == "decoded":
        return container.load(path, model)
    if runtime == "compressed":
        from slimkit.encode.runtime import load_compressed

        return load_compressed(path, model)
    raise ConfigError(f"load: runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
