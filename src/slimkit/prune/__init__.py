"""slimkit.prune."""

# structured
from slimkit.prune.structured import StructuredConfig, structured_  # noqa: F401

# unstructured (Deep Compression)
from slimkit.prune.magnitude import MagnitudeConfig, magnitude_prune_  # noqa: F401, E402
from slimkit.prune.masks import L1Penalty, mask_hooks  # noqa: F401, E402
