"""slimkit.quantize."""

# k-means weight sharing (Deep Compression)
from slimkit.quantize.sharing import ShareConfig, share_weights_, sharing_hooks  # noqa: F401, E402

# isort: split
# uniform / binary
from slimkit.quantize.binary import BinarizeConfig, binarize_  # noqa: F401, E402
from slimkit.quantize.uniform import QuantConfig, quantize_  # noqa: F401, E402
