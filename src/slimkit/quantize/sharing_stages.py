"""Recipe stage ``share``: k-means weight sharing; its fine-tune trains only the centroids."""

from __future__ import annotations

import math

import torch
from torch import nn

from slimkit.measure.size import state_dict_bytes
from slimkit.prune.masks import mask_hooks
from slimkit.quantize.sharing import ShareConfig, share_weights_, sharing_hooks
from slimkit.stages import StageContext, StageOutput, register_stage


def dense_shared_bytes(model: nn.Module, config: ShareConfig) -> int:
    """Bytes with every shared weight stored as a dense ``bits``-bit index plus its fp32 codebook.

    The rest of the state dict counts as fp32; the simulation buffers (index as int16,
    masks) are not counted. Sparse storage and Huffman coding come in the ``encode`` stage.
    """
    total = state_dict_bytes(model)
    for name, module in model.named_modules():
        index = getattr(module, "weight_index", None)
        codebook = getattr(module, "weight_codebook", None)
        if not (isinstance(index, torch.Tensor) and isinstance(codebook, torch.Tensor)):
            continue
        numel = module.weight.numel()
        total -= 4 * numel + index.numel() * index.element_size()
        total += math.ceil(numel * config.bits_for(name, module) / 8)
    return total


def _resume_hooks(model: nn.Module):
    """Centroid sharing for later fine-tunes when a resumed run loads this stage's model."""
    from slimkit.quantize.sharing import shared_modules

    return mask_hooks().merge(sharing_hooks()) if shared_modules(model) else None


@register_stage("share", ShareConfig, resume_hooks=_resume_hooks)
def share_stage(model: nn.Module, config: ShareConfig, ctx: StageContext) -> StageOutput:
    """k-means weight sharing (Deep Compression); the fine-tune moves centroids by their summed gradients."""
    report = share_weights_(model, config)
    report["bytes_counted"] = "dense b-bit cluster indices + fp32 codebooks (before sparse/Huffman encoding)"
    return StageOutput(model=model, details=report, hooks=mask_hooks().merge(sharing_hooks()),
                       persistent_hooks=True, phase="simulated", stored_bytes=dense_shared_bytes(model, config))
