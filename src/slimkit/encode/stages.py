"""Recipe stage ``encode``: write ``model.slim`` and report its real size, layer by layer.

The ratio is the fp32 bytes of the dense baseline's weights and biases divided by the
size of the whole ``.slim`` file (header, metadata, codebooks, code tables, CRCs, biases
and any other buffers included).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from slimkit.config import Config
from slimkit.stages import StageContext, StageOutput, register_stage


class EncodeConfig(Config):
    """Settings of the ``encode`` stage."""

    formats: tuple[Literal["dense", "csr", "csc", "bitmask"], ...] = Field(
        ("dense", "csr", "csc", "bitmask"), min_length=1, description="sparse layouts to try; smallest wins")
    filename: str = "model.slim"
    verify: bool = Field(True, description="decode the file again and check every tensor is identical")


@register_stage("encode", EncodeConfig)
def encode_stage(model: nn.Module, config: EncodeConfig, ctx: StageContext) -> StageOutput:
    """Huffman-coded sparse storage in a .slim container; stored_bytes is the file size."""
    import torch

    from slimkit.encode.container import dense_bytes, load, save

    path = ctx.run_dir / config.filename
    infos = save(model, path, formats=tuple(config.formats))
    size = path.stat().st_size
    dense = dense_bytes(ctx.baseline)
    details = {
        "file": str(path),
        "file_bytes": size,
        "dense_fp32_bytes": dense,
        "ratio": round(dense / size, 3),
        "counted": "whole .slim file vs fp32 weights+biases of the dense baseline",
        "layers": [
            {"tensor": i.name, "format": i.format, "weights": i.weights, "nonzeros": i.nonzeros,
             "nonzeros_pct": round(100 * i.nonzeros / max(i.weights, 1), 3), "bits_per_weight": i.bits_per_weight,
             "bits_per_index": i.bits_per_index, "gap_bits": i.gap_bits, "bytes": i.bytes}
            for i in infos
        ],
    }
    if config.verify:
        import copy

        restored = load(path, model=copy.deepcopy(model))
        want, got = model.state_dict(), restored.state_dict()
        bad = [k for k in want if k not in got or not torch.equal(want[k].cpu(), got[k].cpu())]
        if bad:
            raise RuntimeError(f"encode: decoded tensors differ from the model's: {bad[:5]}")
        details["verified"] = True
    return StageOutput(model=model, details=details, stored_bytes=size, phase="materialized",
                       artifacts={"slim": str(path)})
