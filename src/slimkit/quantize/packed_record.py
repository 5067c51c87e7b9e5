"""The ``PACKED`` record (kind 3) of the ``.slim`` container: a quantized or binary weight, bit-packed.

A uniformly quantized layer (``QuantConv2d``/``QuantLinear``, :mod:`slimkit.quantize.fake`) is
stored as its integer codes at 1, 2, 4 or 8 bits each plus its scales and zero points (Jacob
et al. 2018, *Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference*, CVPR); a binary layer (:mod:`slimkit.quantize.binary`, Rastegari et al. 2016,
*XNOR-Net*, ECCV) as one sign bit per weight plus alpha per output channel. Payload::

    u8 sub-kind (0 uniform, 1 binary) | u8 width | u8 flags | u8 ndim | u32 dims
    u32 n | scale[n] (f16 if flag 4, else f32) | u32 m | zero[m] (u8 if flag 8, else i32) | u32 nbytes | codes

flags: 1 signed grid, 2 per-tensor grid, 4 fp16 scales, 8 u8 zero points (docs/slim-format.md).
The decoded weight is the dequantized one the layer computes with; ``w_scale``/``w_zero``
are rebuilt from the record.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from slimkit.exceptions import CorruptFileError
from slimkit.quantize.binary import BINARY_LAYERS
from slimkit.quantize.fake import QUANT_LAYERS
from slimkit.quantize.observers import is_fp16_exact
from slimkit.quantize.packing import from_unsigned, pack_bits, storage_bits, to_unsigned, unpack_bits
from slimkit.slim_codecs import Reader, RecordCodec, RecordFigures, Writer, register_record_codec

KIND_PACKED = 3
PACKED_UNIFORM, PACKED_BINARY = 0, 1  # sub-kinds
PACKED_SIGNED, PACKED_SCALAR, PACKED_FP16_SCALES, PACKED_U8_ZEROS = 1, 2, 4, 8  # flags
GRID_BUFFERS = ("w_scale", "w_zero")  # rebuilt from a uniform record


def packed_kind(module: nn.Module) -> int | None:
    """PACKED_UNIFORM / PACKED_BINARY for quantized / binary layers (their weight is stored packed), else None."""
    if isinstance(module, QUANT_LAYERS):
        return PACKED_UNIFORM
    if isinstance(module, BINARY_LAYERS):
        return PACKED_BINARY
    return None


def packed_payload(module: nn.Module, sub: int) -> tuple[bytes, int]:
    """(payload, bits) of a bit-packed weight: integer codes of a uniform grid, or 1-bit signs + alpha."""
    w = Writer()
    if sub == PACKED_UNIFORM:
        q, scale, zero = module.quantized_weight()
        bits, signed = storage_bits(module.bits), bool(module.symmetric)
        codes = q.numpy()
        codes = to_unsigned(codes, bits) if signed else codes.astype(np.uint8)
        scale = scale.detach().float().reshape(-1).numpy()
        # symmetric grids have zero points 0 (not stored); asymmetric ones fit a byte
        zero = zero.detach().to(torch.int32).reshape(-1).numpy() if not signed else np.zeros(0, np.int32)
        scalar = module.w_scale.dim() == 0
    else:
        weight = module.weight.detach()
        codes = (weight >= 0).to(torch.uint8).numpy()  # 1 = +1 (sign(0) = +1), 0 = -1
        bits, signed, scalar = 1, False, False
        scale = module.alpha().detach().float().numpy()
        zero = np.zeros(0, np.int32)
    half = is_fp16_exact(torch.from_numpy(scale))  # the same test stored_bytes counts 2 bytes by
    small_zeros = bool(zero.size) and int(zero.min()) >= 0 and int(zero.max()) <= 255
    flags = ((PACKED_SIGNED if signed else 0) | (PACKED_SCALAR if scalar else 0)
             | (PACKED_FP16_SCALES if half else 0) | (PACKED_U8_ZEROS if small_zeros else 0))
    w.u8(sub)
    w.u8(bits)
    w.u8(flags)
    w.u8(codes.ndim)
    for d in codes.shape:
        w.u32(d)
    w.u32(scale.size)
    w.raw(scale.astype("<f2" if half else "<f4").tobytes())
    w.u32(zero.size)
    w.raw(zero.astype("u1" if small_zeros else "<i4").tobytes())
    w.blob(pack_bits(codes, bits))
    return w.getvalue(), bits


def decode_packed(payload: bytes, what: str, prefix: str) -> dict[str, torch.Tensor]:
    """The state-dict entries of a PACKED record: the weight (+ ``w_scale``/``w_zero`` for a uniform grid)."""
    r = Reader(payload, what)
    sub, bits, flags = r.u8(), r.u8(), r.u8()
    if sub not in (PACKED_UNIFORM, PACKED_BINARY) or bits not in (1, 2, 4, 8):
        raise CorruptFileError(f"{what}: unknown packed sub-kind {sub} or width {bits}")
    shape = tuple(r.u32() for _ in range(r.u8()))
    scale_type = "<f2" if flags & PACKED_FP16_SCALES else "<f4"
    scale = torch.from_numpy(np.frombuffer(r.take(np.dtype(scale_type).itemsize * r.u32()), dtype=scale_type)
                             .astype(np.float32))
    zero_type = "u1" if flags & PACKED_U8_ZEROS else "<i4"
    zero = torch.from_numpy(np.frombuffer(r.take(np.dtype(zero_type).itemsize * r.u32()), dtype=zero_type)
                            .astype(np.int32))
    count = int(np.prod(shape)) if shape else 1
    try:
        codes = unpack_bits(r.blob(), bits, count).reshape(shape)
    except CorruptFileError as err:
        raise CorruptFileError(f"{what}: {err}") from None
    per_channel = (-1,) + (1,) * (len(shape) - 1)
    if sub == PACKED_BINARY:
        signs = torch.from_numpy(codes.astype(np.float32) * 2 - 1)
        return {prefix + "weight": signs * scale.reshape(per_channel)}
    q = torch.from_numpy((from_unsigned(codes, bits) if flags & PACKED_SIGNED else codes).astype(np.int32))
    if zero.numel() == 0:  # symmetric grid: zero points are 0
        zero = torch.zeros(scale.shape, dtype=torch.int32)
    if zero.shape != scale.shape:
        raise CorruptFileError(f"{what}: {zero.numel()} zero points for {scale.numel()} scales")
    if flags & PACKED_SCALAR:  # per-tensor grid: scalar buffers
        scale, zero = scale.reshape(()), zero.reshape(())
        weight = ((q - zero) * scale).float()
    else:
        weight = ((q - zero.reshape(per_channel)) * scale.reshape(per_channel)).float()
    return {prefix + "weight": weight, prefix + "w_scale": scale, prefix + "w_zero": zero}


def _claims(module: nn.Module) -> bool:
    return packed_kind(module) is not None


def _derived(module: nn.Module) -> tuple[str, ...]:
    return GRID_BUFFERS if packed_kind(module) == PACKED_UNIFORM else ()


def _encode(module: nn.Module, formats: tuple[str, ...]) -> tuple[bytes, RecordFigures]:
    sub = packed_kind(module)
    payload, bits = packed_payload(module, sub)
    nonzeros = int((module.weight.detach() != 0).sum())
    return payload, RecordFigures("binary" if sub == PACKED_BINARY else f"int{bits}", nonzeros, float(bits))


PACKED_CODEC = register_record_codec(RecordCodec(
    name="packed", kind=KIND_PACKED, precedence=10, claims=_claims, derived=_derived, encode=_encode,
    decode=decode_packed))
