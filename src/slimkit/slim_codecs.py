"""The record codecs of the ``.slim`` container: how each record kind stores one layer's weight.

The container (:mod:`slimkit.encode.container`) frames records and writes its own two kinds,
``META`` (0) and ``RAW`` (1); every other kind is a :class:`RecordCodec` in :data:`RECORD_CODECS`,
registered by the package that owns the layer it stores:

====  ========  ===============================================  ===========================================
kind  name      layers                                           registered by
====  ========  ===============================================  ===========================================
2     shared    ``weight_codebook``/``weight_index`` buffers      :mod:`slimkit.encode.shared_record`
3     packed    quantized and binary layers (bit-packed codes)    :mod:`slimkit.quantize.packed_record`
4     dct       ``dct_codebook``/``dct_index`` buffers            :mod:`slimkit.encode.dct_record`
====  ========  ===============================================  ===========================================

This module sits below both :mod:`slimkit.encode` and :mod:`slimkit.quantize` and imports
neither: the techniques describe their layers' records here, the container reads the table,
so the container imports no technique and no technique imports the container. The table
imports its built-in codecs the first time it is read (``lazy_modules``, as the stage
registry does). A codec added elsewhere registers with :func:`register_record_codec` and a
kind not used above (docs/slim-format.md lists the layouts).

When several codecs claim a layer, the one with the lowest ``precedence`` stores its
weight; the buffers every claiming codec lists in ``derived`` are rebuilt from the records
and not stored.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from slimkit.exceptions import ConfigError, CorruptFileError
from slimkit.registry import Registry

KIND_META, KIND_RAW = 0, 1  # the container's own kinds; codecs use 2..255


@dataclass(frozen=True)
class RecordFigures:
    """What one stored weight costs (the container adds the record's size to make a ``TensorInfo``)."""

    format: str  # layout of the stored values ("csr", "bitmask", "int4", "binary", ...)
    nonzeros: int
    bits_per_weight: float  # bits of value symbols per stored non-zero (Huffman mean) or code width
    bits_per_index: float = 0.0  # bits of position information per stored non-zero
    gap_bits: int = 0


@dataclass(frozen=True)
class RecordCodec:
    """How one record kind stores ``module.weight`` (and the buffers derived from it).

    ``claims(module)``: this codec stores the module's weight. ``derived(module)``: names of
    the module's buffers its record rebuilds (left out of the file). ``encode(module,
    formats)``: ``(payload, figures)``, ``formats`` being the sparse layouts the caller allows.
    ``decode(payload, what, prefix)``: the state-dict entries of one record, keys starting
    with ``prefix`` (the module's qualified name and a dot); a payload that does not decode
    raises :class:`~slimkit.exceptions.CorruptFileError` starting with ``what``.
    """

    name: str
    kind: int
    precedence: int
    claims: Callable[[nn.Module], bool]
    derived: Callable[[nn.Module], tuple[str, ...]]
    encode: Callable[[nn.Module, tuple[str, ...]], tuple[bytes, RecordFigures]]
    decode: Callable[[bytes, str, str], dict[str, torch.Tensor]]


RECORD_CODECS: Registry[RecordCodec] = Registry("slim record codec", lazy_modules=(
    "slimkit.encode.shared_record", "slimkit.quantize.packed_record", "slimkit.encode.dct_record"))
_KINDS: dict[int, str] = {}  # kind -> codec name; read without loading the table (registering must not load it)


def register_record_codec(codec: RecordCodec) -> RecordCodec:
    """Add ``codec`` to :data:`RECORD_CODECS`; its ``kind`` must be 2..255 and not taken by another codec."""
    if not 2 <= codec.kind <= 255:
        raise ConfigError(f"slim record codec {codec.name!r}: kind {codec.kind} is outside 2..255 "
                          f"({KIND_META} and {KIND_RAW} are the container's own)")
    owner = _KINDS.get(codec.kind)
    if owner is not None and owner != codec.name.lower():
        raise ConfigError(f"slim record codec {codec.name!r}: kind {codec.kind} is taken by {owner!r}")
    registered = RECORD_CODECS.register(codec.name, codec)
    _KINDS[codec.kind] = codec.name.lower()
    return registered


def record_codecs() -> list[RecordCodec]:
    """Every registered codec, lowest ``precedence`` first (the order in which they claim a layer)."""
    return sorted((RECORD_CODECS.get(n) for n in RECORD_CODECS.names()), key=lambda c: (c.precedence, c.kind))


def codec_of_kind(kind: int) -> RecordCodec | None:
    """The codec that writes record kind ``kind``, or None."""
    return next((c for c in record_codecs() if c.kind == kind), None)


# ---------------------------------------------------------------------------- payload bytes (little-endian)


class Writer:
    """Collects a payload: fixed-width integers, raw bytes, length-prefixed blobs, trimmed code lengths."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> None:
        self.parts.append(struct.pack("<B", v))

    def u16(self, v: int) -> None:
        self.parts.append(struct.pack("<H", v))

    def u32(self, v: int) -> None:
        self.parts.append(struct.pack("<I", v))

    def raw(self, b: bytes) -> None:
        self.parts.append(bytes(b))

    def blob(self, b: bytes) -> None:
        self.u32(len(b))
        self.raw(b)

    def lengths(self, lengths: np.ndarray) -> None:
        """Huffman code lengths without their trailing zeros: ``u16 n | u8 length[n]``."""
        nz = np.flatnonzero(lengths)
        trimmed = np.asarray(lengths[: nz[-1] + 1] if nz.size else lengths[:0], dtype=np.uint8)
        self.u16(trimmed.size)
        self.raw(trimmed.tobytes())

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class Reader:
    """Reads what :class:`Writer` wrote; running out of bytes is a CorruptFileError starting with ``what``."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CorruptFileError(f"{self.what}: payload ends early (needs {n} bytes at offset {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return struct.unpack("<B", self.take(1))[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def blob(self) -> bytes:
        return self.take(self.u32())

    def lengths(self, alphabet: int) -> np.ndarray:
        n = self.u16()
        if n > alphabet:
            raise CorruptFileError(f"{self.what}: {n} code lengths for an alphabet of {alphabet}")
        out = np.zeros(alphabet, dtype=np.uint8)
        out[:n] = np.frombuffer(self.take(n), dtype=np.uint8)
        return out
