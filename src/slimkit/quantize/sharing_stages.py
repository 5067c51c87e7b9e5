"""Recipe stage ``share``: k-means weight sharing; its fine-tune trains only the centroids."""

from __future__ import annotations

from torch import nn

from slimkit.prune.masks import mask_hooks
from slimkit.quantize.sharing import ShareConfig, share_weights_, sharing_hooks
from slimkit.stages import StageContext, StageOutput, register_stage


@register_stage("share", ShareConfig)
def share_stage(model: nn.Module, config: ShareConfig, ctx: StageContext) -> StageOutput:
    """k-means weight sharing (Deep Compression); the fine-tune moves centroids by their summed gradients."""
    report = share_weights_(model, config)
    return StageOutput(model=model, details=report, hooks=mask_hooks().merge(sharing_hooks()),
                       persistent_hooks=True, phase="simulated")
