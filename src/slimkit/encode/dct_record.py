"""The ``DCT`` record (kind 4) of the ``.slim`` container: a weight shared in the frequency domain.

A layer compressed by :func:`slimkit.encode.dct.dct_compress_` (Wang et al. 2016, *CNNpack:
Packing Convolutional Neural Networks in the Frequency Domain*, NeurIPS) carries
``dct_codebook`` and ``dct_index``; the record stores them like a ``SHARED`` record
(:func:`slimkit.encode.dct.dct_payload`), and the weight is synthesised from them again,
bit for bit (:func:`slimkit.encode.dct.decode_dct_record`).
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.encode.dct import CODEBOOK, INDEX, dct_payload, decode_dct_record
from slimkit.slim_codecs import RecordCodec, RecordFigures, register_record_codec

KIND_DCT = 4


def _claims(module: nn.Module) -> bool:
    return CODEBOOK in module._buffers


def _derived(module: nn.Module) -> tuple[str, ...]:
    return (CODEBOOK, INDEX) if CODEBOOK in module._buffers else ()


def _encode(module: nn.Module, formats: tuple[str, ...]) -> tuple[bytes, RecordFigures]:
    payload, layout, kept = dct_payload(module, formats)
    entries = max(layout.value_count, 1)
    index_bytes = len(layout.gaps) if layout.format in ("csr", "csc") else len(layout.bitmask)
    index_bits = 8 * index_bytes / (entries if layout.format in ("csr", "csc") else max(kept, 1))
    return payload, RecordFigures(layout.format, kept, round(8 * len(layout.values) / entries, 3),
                                  round(index_bits, 3), layout.gap_bits)


def _decode(payload: bytes, what: str, prefix: str) -> dict[str, torch.Tensor]:
    return decode_dct_record(payload, what, prefix)


DCT_CODEC = register_record_codec(RecordCodec(
    name="dct", kind=KIND_DCT, precedence=20, claims=_claims, derived=_derived, encode=_encode, decode=_decode))
