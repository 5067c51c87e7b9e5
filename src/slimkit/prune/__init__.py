"""Pruning: unstructured masks and schedules (Deep Compression) and structured channel removal.

Every verb is spelled ``verb_(model, example_inputs, config, **data) -> Report``
(:mod:`slimkit.prune.common`), ``scope`` is ``local | global`` everywhere.

- :func:`magnitude_prune_` masks the smallest weights (``weight_mask`` buffers) and returns a
  :class:`MaskReport`; :func:`iterative_prune_` prunes in rounds with fine-tuning between
  them; the other schedules (AGP, dynamic network surgery) live in :mod:`slimkit.prune.schedules`.
- :func:`structured_` removes whole channels through the channel dependency graph and
  returns a plain, smaller dense model: :func:`plan_structured` chooses the channels (the
  model is left as it was), :func:`apply_structured_` cuts them.
- :func:`register_channel_rule` tells the channel graph how channels flow through a layer
  or op it does not know, :func:`register_surgery_handler` how to cut a layer's parameters.
"""

from slimkit.prune.graph import ChannelOp, register_channel_rule
from slimkit.prune.magnitude import MagnitudeConfig, magnitude_prune_
from slimkit.prune.masks import L1Penalty, MaskReport, mask_hooks
from slimkit.prune.schedules import iterative_prune_
from slimkit.prune.structured import (
    StructuredConfig,
    StructuredPlan,
    StructuredReport,
    apply_structured_,
    plan_structured,
    structured_,
)
from slimkit.prune.surgery import register_surgery_handler

__all__ = ["ChannelOp", "L1Penalty", "MagnitudeConfig", "MaskReport", "StructuredConfig", "StructuredPlan",
           "StructuredReport", "apply_structured_", "iterative_prune_", "magnitude_prune_", "mask_hooks",
           "plan_structured", "register_channel_rule", "register_surgery_handler", "structured_"]
