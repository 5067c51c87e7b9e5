"""Pruning: unstructured masks and schedules (Deep Compression) and structured channel removal.

- :func:`magnitude_prune_` masks the smallest weights (``weight_mask`` buffers); the
  schedules (one-shot, iterative, AGP, dynamic network surgery) live in
  :mod:`slimkit.prune.schedules`.
- :func:`structured_` removes whole channels through the channel dependency graph and
  returns a plain, smaller dense model.
"""

from slimkit.prune.magnitude import MagnitudeConfig, magnitude_prune_
from slimkit.prune.masks import L1Penalty, mask_hooks
from slimkit.prune.structured import StructuredConfig, structured_

__all__ = ["L1Penalty", "MagnitudeConfig", "StructuredConfig", "magnitude_prune_", "mask_hooks", "structured_"]
