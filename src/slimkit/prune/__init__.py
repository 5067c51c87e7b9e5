"""Pruning: unstructured masks and schedules (Deep Compression) and structured channel removal.

- :func:`magnitude_prune_` masks the smallest weights (``weight_mask`` buffers); the
  schedules (one-shot, iterative, AGP, dynamic network surgery) live in
  :mod:`slimkit.prune.schedules`.
- :func:`structured_` removes whole channels through the channel dependency graph and
  returns a plain, smaller dense model.
- :func:`register_channel_rule` tells the channel graph how channels flow through a layer
  or op it does not know, :func:`register_surgery_handler` how to cut a layer's parameters.
"""

from slimkit.prune.graph import ChannelOp, register_channel_rule
from slimkit.prune.magnitude import MagnitudeConfig, magnitude_prune_
from slimkit.prune.masks import L1Penalty, mask_hooks
from slimkit.prune.structured import StructuredConfig, structured_
from slimkit.prune.surgery import register_surgery_handler

__all__ = ["ChannelOp", "L1Penalty", "MagnitudeConfig", "StructuredConfig", "magnitude_prune_", "mask_hooks",
           "register_channel_rule", "register_surgery_handler", "structured_"]
