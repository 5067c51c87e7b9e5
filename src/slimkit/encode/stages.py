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
    runtime: bool = Field(True, description="also run the file in the compressed-domain runtime (slimkit-compressed) "
                                            "and deploy it there when it is as accurate and faster than eager")


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
    engine = accuracy = latency = None
    if config.runtime:
        details["compressed_runtime"] = compressed_runtime_figures(model, path, ctx)
        figures = details["compressed_runtime"]
        if figures["accuracy"] is not None and figures["accuracy"] >= figures["eager_accuracy"] \
                and figures["latency_ms"] < figures["eager_latency_ms"]:
            engine, accuracy, latency = "slimkit-compressed", figures["accuracy"], figures["latency_ms"]
        details["engine_reason"] = (f"{engine or 'pytorch-eager'}: faster of PyTorch eager (decoded dense) and "
                                    "the compressed runtime at equal accuracy")
    return StageOutput(model=model, details=details, stored_bytes=size, phase="materialized",
                       artifacts={"slim": str(path)}, engine=engine, accuracy=accuracy, latency_ms=latency)


def compressed_runtime_figures(model: nn.Module, path, ctx: StageContext) -> dict:
    """Accuracy, batch-1 latency and resident bytes of the .slim file run compressed vs the model in eager mode.

    Both are timed in turn in the same run on torch's current thread count; resident
    bytes count every tensor each keeps (:func:`slimkit.encode.runtime.resident_bytes`).
    """
    import copy

    import torch

    from slimkit.encode.runtime import load_compressed, resident_bytes
    from slimkit.kernels.timing import interleaved_ms

    compressed = load_compressed(path, copy.deepcopy(model))
    eager = copy.deepcopy(model).eval()
    x = ctx.example_inputs[:1]
    with torch.no_grad():
        ms = interleaved_ms({"eager": lambda: eager(x), "compressed": lambda: compressed(x)}, repeats=50, warmup=5)
    evaluate = ctx.evaluate  # None from a context without test data (stages.no_evaluation)
    return {"engine": "slimkit-compressed", "accuracy": evaluate(compressed), "eager_accuracy": evaluate(eager),
            "latency_ms": round(ms["compressed"], 4), "eager_latency_ms": round(ms["eager"], 4),
            "speedup_vs_eager": round(ms["eager"] / ms["compressed"], 3), "threads": torch.get_num_threads(),
            "resident_bytes": resident_bytes(compressed), "eager_resident_bytes": resident_bytes(eager),
            "resident_vs_file": round(resident_bytes(compressed) / path.stat().st_size, 3),
            "layers": compressed.compressed_report,
            "counted": "resident: bytes of every tensor/array the model keeps (parameters, buffers, sparse matrices)"}
