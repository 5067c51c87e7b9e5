"""slimkit.quantize."""

# k-means weight sharing (Deep Compression)
from slimkit.quantize.sharing import ShareConfig, share_weights_, sharing_hooks  # noqa: F401, E402
