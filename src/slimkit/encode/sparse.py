"""Sparse layouts of a weight-shared tensor, each Huffman-coded; the smallest is chosen per tensor.

A shared tensor is a stream of *symbols*: ``0`` for an exact zero, ``1 + i`` for centroid
``i``. The tensor is viewed as a matrix ``[shape[0], prod(shape[1:])]`` (rows = output
channels) and stored in one of four layouts:

- ``csr`` / ``csc``: the non-zeros in row-major / column-major order with *relative*
  indices, as in Deep Compression (Han 2016, Fig. 2): each entry stores the number of zeros
  skipped since the previous entry in ``gap_bits`` bits; when more than ``2**gap_bits - 1``
  zeros separate two non-zeros, a *filler* entry (symbol 0, a stored zero) is inserted after
  ``2**gap_bits - 1`` zeros. The value symbols and the gaps are two Huffman streams;
  ``gap_bits`` (1..12) is chosen to minimise the total size.
- ``bitmask``: one bit per weight (1 = non-zero), then the Huffman stream of the non-zero
  symbols.
- ``dense``: the Huffman stream of all symbols, zeros included (best for dense layers).

>>> import numpy as np
>>> gaps, fill = gap_encode(np.array([0, 3, 20]), 2)
>>> gaps.tolist(), fill.tolist()
([0, 2, 3, 3, 3, 3, 0], [False, False, True, True, True, True, False])
>>> gap_decode(gaps).tolist()
[0, 3, 7, 11, 15, 19, 20]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from slimkit.encode import huffman
from slimkit.exceptions import ConfigError

FORMATS = ("dense", "csr", "csc", "bitmask")
MAX_GAP_BITS = 12


def gap_encode(positions: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(stored gaps, is_filler) for ascending ``positions`` with ``bits``-bit relative indices."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    span = 1 << bits  # positions one entry can advance at most (max gap + the entry itself)
    skipped = np.diff(positions, prepend=-1) - 1  # zeros between consecutive non-zeros
    fillers = skipped // span
    remainder = skipped - fillers * span
    total = positions.size + int(fillers.sum())
    gaps = np.full(total, span - 1, dtype=np.int64)
    is_filler = np.ones(total, dtype=bool)
    real_at = np.cumsum(fillers + 1) - 1  # index of each real entry after its fillers
    gaps[real_at] = remainder
    is_filler[real_at] = False
    return gaps, is_filler


def gap_decode(gaps: np.ndarray) -> np.ndarray:
    """Absolute positions of the entries (fillers included) from stored gaps."""
    return np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1


@dataclass
class Layout:
    """One tensor's chosen layout and streams (what the container writes)."""

    format: str
    gap_bits: int = 0
    value_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    value_count: int = 0
    values: bytes = b""
    gap_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    gaps: bytes = b""
    bitmask: bytes = b""

    def nbytes(self) -> int:
        """Payload bytes: streams, bitmask and code-length tables (2 + n bytes each)."""
        tables = (2 + _trim(self.value_lengths).size) + (2 + _trim(self.gap_lengths).size if self.format in
                                                        ("csr", "csc") else 0)
        return len(self.values) + len(self.gaps) + len(self.bitmask) + tables + 4


def _trim(lengths: np.ndarray) -> np.ndarray:
    nz = np.flatnonzero(lengths)
    return lengths[: nz[-1] + 1] if nz.size else lengths[:0]


def _stream(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, bytes]:
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet)) if symbols.size else np.zeros(
        alphabet, np.uint8)
    return lengths, huffman.encode(symbols, lengths)


def _stream_bytes(symbols: np.ndarray, alphabet: int) -> int:
    if symbols.size == 0:
        return 2
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet))
    return (huffman.encoded_bits(symbols, lengths) + 7) // 8 + 2 + _trim(lengths).size


def _matrix(symbols: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    rows = shape[0] if len(shape) else 1
    return symbols.reshape(rows, -1)


def _gapped(order_symbols: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    positions = np.flatnonzero(order_symbols)
    gaps, is_filler = gap_encode(positions, bits)
    values = np.zeros(gaps.size, dtype=np.int64)
    values[~is_filler] = order_symbols[positions]
    return values, gaps


def choose_layout(symbols: np.ndarray, shape: tuple[int, ...], alphabet: int,
                  formats: tuple[str, ...] = FORMATS) -> Layout:
    """The smallest layout of ``symbols`` (flat, row-major, 0 = zero) among ``formats``."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    matrix = _matrix(symbols, shape)
    best: tuple[int, str, int] | None = None
    for fmt in formats:
        if fmt == "dense":
            candidates = [(_stream_bytes(symbols, alphabet), 0)]
        elif fmt == "bitmask":
            candidates = [((symbols.size + 7) // 8 + _stream_bytes(symbols[symbols > 0], alphabet), 0)]
        else:
            ordered = matrix.ravel() if fmt == "csr" else matrix.T.ravel()
            candidates = []
            for bits in range(1, MAX_GAP_BITS + 1):
                values, gaps = _gapped(ordered, bits)
                candidates.append((_stream_bytes(values, alphabet) + _stream_bytes(gaps, 1 << bits), bits))
        for size, bits in candidates:
            if best is None or size < best[0]:
                best = (size, fmt, bits)
    assert best is not None
    return build_layout(symbols, shape, alphabet, best[1], best[2])


def build_layout(symbols: np.ndarray, shape: tuple[int, ...], alphabet: int, fmt: str, gap_bits: int = 0) -> Layout:
    """Encode ``symbols`` in layout ``fmt`` (``gap_bits`` for csr/csc)."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    if fmt == "dense":
        lengths, data = _stream(symbols, alphabet)
        return Layout("dense", 0, lengths, symbols.size, data)
    if fmt == "bitmask":
        nonzero = symbols[symbols > 0]
        lengths, data = _stream(nonzero, alphabet)
        return Layout("bitmask", 0, lengths, nonzero.size, data, bitmask=np.packbits(symbols > 0).tobytes())
    if fmt not in ("csr", "csc"):
        raise ConfigError(f"unknown sparse format {fmt!r}; allowed: {', '.join(FORMATS)}")
    matrix = _matrix(symbols, shape)
    ordered = matrix.ravel() if fmt == "csr" else matrix.T.ravel()
    values, gaps = _gapped(ordered, gap_bits)
    v_lengths, v_data = _stream(values, alphabet)
    g_lengths, g_data = _stream(gaps, 1 << gap_bits)
    return Layout(fmt, gap_bits, v_lengths, values.size, v_data, g_lengths, g_data)


def decode_layout(layout: Layout, shape: tuple[int, ...]) -> np.ndarray:
    """Flat row-major symbols (int64) of a layout; CorruptFileError on inconsistent streams."""
    from slimkit.exceptions import CorruptFileError

    numel = int(np.prod(shape)) if len(shape) else 1
    values = huffman.decode(layout.values, layout.value_lengths, layout.value_count)
    if layout.format == "dense":
        if values.size != numel:
            raise CorruptFileError(f"dense stream holds {values.size} symbols, expected {numel}")
        return values
    if layout.format == "bitmask":
        bits = np.unpackbits(np.frombuffer(layout.bitmask, dtype=np.uint8))[:numel].astype(bool)
        if bits.size != numel or int(bits.sum()) != values.size:
            raise CorruptFileError("bitmask and value stream disagree on the number of non-zeros")
        out = np.zeros(numel, dtype=np.int64)
        out[bits] = values
        return out
    gaps = huffman.decode(layout.gaps, layout.gap_lengths, layout.value_count)
    positions = gap_decode(gaps)
    if positions.size and positions[-1] >= numel:
        raise CorruptFileError(f"sparse index {int(positions[-1])} is outside the tensor of {numel} weights")
    ordered = np.zeros(numel, dtype=np.int64)
    ordered[positions] = values
    rows = shape[0] if len(shape) else 1
    if layout.format == "csr":
        return ordered
    return ordered.reshape(-1, rows).T.ravel()
