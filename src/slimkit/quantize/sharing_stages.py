"""Recipe stage ``share``: k-means weight sharing; its fine-tune trains only the centroids."""

from __future__ import annotations

from torch import nn

from slimkit.prune.masks import mask_hooks
from slimkit.quantize.sharing import ShareConfig, dense_shared_bytes, share_weights_, sharing_hooks
from slimkit.stages import StageContext, StageOutput, register_stage


def _resume_hooks(model: nn.Module):
    """Centroid sharing for later fine-tunes when a resumed run loads this stage's model."""
    from slimkit.quantize.sharing import shared_modules

    return mask_hooks().merge(sharing_hooks()) if shared_modules(model) else None


@register_stage("share", ShareConfig, resume_hooks=_resume_hooks)
def share_stage(model: nn.Module, config: ShareConfig, ctx: StageContext) -> StageOutput:
    """k-means weight sharing (Deep Compression); the fine-tune moves centroids by their summed gradients."""
    details = share_weights_(model, ctx.example_inputs, config).to_dict()
    details["bytes_counted"] = "dense b-bit cluster indices + fp32 codebooks (before sparse/Huffman encoding)"
    return StageOutput(model=model, details=details, hooks=mask_hooks().merge(sharing_hooks()),
                       persistent_hooks=True, phase="simulated", stored_bytes=dense_shared_bytes(model))
