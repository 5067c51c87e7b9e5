"""Recipe stage ``hash``: HashedNets (Chen 2015); its fine-tune trains the hashed vectors in place.

    stages:
      - hash: {linear_ratio: 0.125, conv_ratio: 0.25}
        finetune: {epochs: 2}

``stored_bytes`` is the state dict at fp32 (each hashed layer's ``K`` values and bias,
every other tensor) plus one 4-byte seed per hashed layer; the hash index is not stored.
"""

from __future__ import annotations

from torch import nn

from slimkit.measure.storage import stored_bytes
from slimkit.quantize.hashed import HashConfig, hash_weights_
from slimkit.stages import StageContext, StageOutput, register_stage


@register_stage("hash", HashConfig)
def hash_stage(model: nn.Module, config: HashConfig, ctx: StageContext) -> StageOutput:
    """HashedNets weight sharing by the hashing trick; the hashed vectors train like any parameter."""
    details = hash_weights_(model, ctx.example_inputs, config).to_dict()
    details["bytes_counted"] = "fp32 hashed vectors + biases + other state + one uint32 seed per hashed layer"
    return StageOutput(model=model, details=details, phase="materialized", stored_bytes=stored_bytes(model))
