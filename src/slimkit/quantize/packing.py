"""Bit-packing of low-bit integer codes: 1, 2, 4 or 8 bits per value, little-endian within a byte.

A 4-bit layer costs half a byte per weight: ``pack_bits(codes, 4)`` stores two codes per
byte, the first code in the low nibble. Codes are unsigned (``0 .. 2**bits - 1``); signed
weights are stored with an offset (``q + 2**(bits-1)``, see :func:`to_unsigned`).

>>> import numpy as np
>>> codes = np.array([1, 0, 3, 2, 1], dtype=np.uint8)
>>> blob = pack_bits(codes, 2)
>>> len(blob), unpack_bits(blob, 2, 5).tolist()
(2, [1, 0, 3, 2, 1])
"""

from __future__ import annotations

import numpy as np

from slimkit.exceptions import ConfigError, CorruptFileError

PACK_BITS = (1, 2, 4, 8)


def storage_bits(bits: int) -> int:
    """The packing width that holds ``bits``-bit codes: 1, 2, 4 or 8 (3 -> 4, 5..8 -> 8)."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"bits must be an integer in [1, 8] to be packed, got {bits!r}")
    return next(width for width in PACK_BITS if width >= bits)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` codes of ``bits`` bits after packing (rounded up to a byte)."""
    return (count * storage_bits(bits) + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned codes (any shape, flattened in C order) at ``bits`` in {1, 2, 4, 8} per value."""
    if bits not in PACK_BITS:
        raise ConfigError(f"pack_bits: bits must be one of {PACK_BITS}, got {bits!r}; use storage_bits(b) first")
    codes = np.ascontiguousarray(values).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ConfigError(
            f"pack_bits: codes must lie in [0, {2**bits - 1}] for {bits} bits, got [{codes.min()}, {codes.max()}]"
        )
    codes = codes.astype(np.uint8)
    per_byte = 8 // bits
    pad = (-codes.size) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros(pad, np.uint8)])
    groups = codes.reshape(-1, per_byte).astype(np.uint16)
    shifts = (np.arange(per_byte, dtype=np.uint16) * bits)[None, :]
    return (groups << shifts).sum(axis=1).astype(np.uint8).tobytes()


def unpack_bits(blob: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` uint8 codes of ``bits`` bits."""
    if bits not in PACK_BITS:
        raise ConfigError(f"unpack_bits: bits must be one of {PACK_BITS}, got {bits!r}")
    if len(blob) != packed_nbytes(count, bits):
        raise CorruptFileError(
            f"packed block holds {len(blob)} bytes but {count} codes of {bits} bits need {packed_nbytes(count, bits)}"
        )
    raw = np.frombuffer(blob, dtype=np.uint8)
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)[None, :]
    codes = (raw[:, None] >> shifts) & np.uint8(2**bits - 1)
    return codes.reshape(-1)[:count].astype(np.uint8)


def to_unsigned(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes in ``[-2**(bits-1), 2**(bits-1) - 1]`` -> unsigned codes for packing."""
    return (np.asarray(q, dtype=np.int16) + 2 ** (bits - 1)).astype(np.uint8)


def from_unsigned(codes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`to_unsigned` (int8 result)."""
    return (codes.astype(np.int16) - 2 ** (bits - 1)).astype(np.int8)
