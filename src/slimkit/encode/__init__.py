"""slimkit.encode: Huffman coding, sparse layouts and the ``.slim`` container (Deep Compression).

``save(model, path)`` / ``load(path, model=None)`` write and read the container;
``decode(path, out)`` turns a ``.slim`` file into a ``model.pt`` (slimkit.manifest format).
"""

from slimkit.encode.container import decode, dense_bytes, load, save  # noqa: F401
