"""Recipe stage ``dct``: frequency-domain compression (CNNpack, Wang 2016); its fine-tune trains the codebooks.

    stages:
      - dct: {conv_bits: 4, linear_bits: 4, zero_fraction: 0.5}
        finetune: {epochs: 2}
      - encode: {}

``stored_bytes`` counts dense ``bits``-bit coefficient indices plus fp32 codebooks; the
``encode`` stage then writes the Huffman-coded ``DCT`` records and reports the file size.
"""

from __future__ import annotations

from torch import nn

from slimkit.encode.dct import DCTConfig, dct_compress_, dct_hooks, dct_modules, dense_dct_bytes
from slimkit.stages import StageContext, StageOutput, register_stage


def _resume_hooks(model: nn.Module):
    """Codebook fine-tuning for later fine-tunes when a resumed run loads this stage's model."""
    return dct_hooks() if dct_modules(model) else None


@register_stage("dct", DCTConfig, resume_hooks=_resume_hooks)
def dct_stage(model: nn.Module, config: DCTConfig, ctx: StageContext) -> StageOutput:
    """DCT of the kernels + k-means on the coefficients (CNNpack); the fine-tune moves frequency-domain centroids."""
    details = dct_compress_(model, ctx.example_inputs, config).to_dict()
    details["bytes_counted"] = "dense b-bit coefficient indices + fp32 codebooks (before Huffman encoding)"
    return StageOutput(model=model, details=details, hooks=dct_hooks(), persistent_hooks=True, phase="simulated",
                       stored_bytes=dense_dct_bytes(model))
