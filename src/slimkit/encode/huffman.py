"""Canonical Huffman coding of small-alphabet symbol streams (cluster indices, index gaps).

Only the code lengths are stored (one byte per symbol of the alphabet): the codes are
rebuilt canonically (shorter codes first, then by symbol, consecutive integers), as in
DEFLATE. Bits are written most significant first, padded with zeros to a whole byte.

- ``code_lengths(counts)``: Huffman code lengths from symbol counts (0 for absent
  symbols; a lone symbol gets length 1 so that every symbol costs at least one bit).
- ``encode(symbols, lengths) -> bytes`` and ``decode(data, lengths, count) -> symbols``.

The mean code length is within one bit of the entropy (Huffman's bound, tested).

>>> import numpy as np
>>> x = np.array([0, 0, 0, 1, 2, 0, 1])
>>> lengths = code_lengths(np.bincount(x, minlength=3))
>>> lengths.tolist()
[1, 2, 2]
>>> decode(encode(x, lengths), lengths, len(x)).tolist()
[0, 0, 0, 1, 2, 0, 1]
"""

from __future__ import annotations

import heapq

import numpy as np

from slimkit.exceptions import ConfigError, CorruptFileError


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length (uint8) per symbol from its count; 0 where the count is 0."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, dtype=np.int64)
    present = np.flatnonzero(counts > 0)
    if present.size == 1:
        lengths[present[0]] = 1
    elif present.size > 1:
        # Heap of (weight, tiebreak, symbols in subtree); every merge deepens its symbols by one.
        heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(present)]
        heapq.heapify(heap)
        tiebreak = len(heap)
        while len(heap) > 1:
            w1, _, s1 = heapq.heappop(heap)
            w2, _, s2 = heapq.heappop(heap)
            lengths[s1] += 1
            lengths[s2] += 1
            heapq.heappush(heap, (w1 + w2, tiebreak, s1 + s2))
            tiebreak += 1
    if lengths.max(initial=0) > 255:
        raise ConfigError("Huffman code longer than 255 bits; the alphabet's counts are too skewed to store")
    return lengths.astype(np.uint8)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code (as an integer, ``lengths[s]`` bits) of each symbol; 0 for unused symbols."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=object)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        code += 1
        previous = int(lengths[symbol])
    return codes


def encoded_bits(symbols: np.ndarray, lengths: np.ndarray) -> int:
    """Length in bits of the encoded stream (before byte padding)."""
    symbols = np.asarray(symbols, dtype=np.int64)
    return int(np.asarray(lengths, dtype=np.int64)[symbols].sum()) if symbols.size else 0


def encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Bytes of the canonical Huffman coding of ``symbols`` (ints in ``[0, len(lengths))``)."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    if symbols.size == 0:
        return b""
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths[symbols] == 0).any():
        raise ConfigError("a symbol to encode has no code (its length is 0); build lengths from these symbols")
    codes = canonical_codes(lengths)
    max_len = int(lengths.max())
    # Bit matrix [alphabet, max_len] of each code, left-aligned; then gather and mask.
    table = np.zeros((lengths.size, max_len), dtype=np.uint8)
    for s in np.flatnonzero(lengths):
        n = int(lengths[s])
        table[s, :n] = [(int(codes[s]) >> (n - 1 - b)) & 1 for b in range(n)]
    valid = np.arange(max_len)[None, :] < lengths[symbols][:, None]
    bits = table[symbols][valid]
    return np.packbits(bits).tobytes()


def decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """``count`` symbols (int64) decoded from ``data``; CorruptFileError when the bits run out or are invalid."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.flatnonzero(lengths)
    if used.size == 0:
        raise CorruptFileError("Huffman table is empty but symbols are expected")
    codes = canonical_codes(lengths)
    max_len = int(lengths.max())
    # Table-driven decode: look up the next max_len bits (zero-padded) in a table of 2**w entries
    # when small enough, else walk code lengths (first-code per length, DEFLATE style).
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if max_len <= 16:
        table_sym = np.full(1 << max_len, -1, dtype=np.int64)
        table_len = np.zeros(1 << max_len, dtype=np.int64)
        for s in used:
            n = int(lengths[s])
            start = int(codes[s]) << (max_len - n)
            table_sym[start : start + (1 << (max_len - n))] = s
            table_len[start : start + (1 << (max_len - n))] = n
        padded = np.concatenate((bits, np.zeros(max_len, dtype=np.uint8))).astype(np.int64)
        weights = 1 << np.arange(max_len - 1, -1, -1)
        # Value of the max_len-bit window at every bit position: a sliding dot product.
        windows = np.lib.stride_tricks.sliding_window_view(padded, max_len)[: bits.size + 1] @ weights
        out = np.empty(count, dtype=np.int64)
        pos, total = 0, bits.size
        sym_list, len_list, win = table_sym.tolist(), table_len.tolist(), windows.tolist()
        for i in range(count):
            if pos >= total:
                raise CorruptFileError(f"Huffman stream ends after {i} of {count} symbols")
            w = win[pos]
            s = sym_list[w]
            if s < 0:
                raise CorruptFileError(f"invalid Huffman code at bit {pos}")
            out[i] = s
            pos += len_list[w]
        if pos > total:
            raise CorruptFileError(f"Huffman stream ends inside symbol {count - 1}")
        return out
    lookup = {(int(lengths[s]), int(codes[s])): int(s) for s in used}
    out = np.empty(count, dtype=np.int64)
    pos, bit_list = 0, bits.tolist()
    for i in range(count):
        code, n = 0, 0
        while True:
            if pos >= len(bit_list):
                raise CorruptFileError(f"Huffman stream ends after {i} of {count} symbols")
            code = (code << 1) | bit_list[pos]
            pos += 1
            n += 1
            if (n, code) in lookup:
                out[i] = lookup[(n, code)]
                break
            if n > max_len:
                raise CorruptFileError(f"invalid Huffman code at bit {pos}")
    return out
