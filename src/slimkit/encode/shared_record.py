"""The ``SHARED`` record (kind 2) of the ``.slim`` container: a weight-shared, possibly pruned weight.

Han, Mao & Dally 2016, *Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding* (ICLR). A layer shared by
:mod:`slimkit.quantize.sharing` carries ``weight_codebook`` (float32 ``[k]``) and
``weight_index`` (int16, shaped like the weight, ``-1`` where pruned), and its weight is
``codebook[index]``. The record stores the codebook and the Huffman-coded indices in the
smallest sparse layout (:mod:`slimkit.encode.sparse`); the weight, both buffers and the
``weight_mask`` (``index >= 0``) are rebuilt from it bit-exactly. Payload::

    u8 flags | u8 ndim | u32 dims | u16 k | f32 codebook[k] | layout

flags: 1 = rebuild ``weight_mask``, 2 = rebuild ``weight_codebook`` and ``weight_index``.
:func:`codebook_payload` and :func:`read_layout` write and read the ``k``-entry codebook
records that the ``DCT`` record (:mod:`slimkit.encode.dct`) shares with this one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from slimkit.encode.sparse import FORMATS, Layout, choose_layout, decode_layout
from slimkit.exceptions import CorruptFileError, ModelStateError
from slimkit.slim_codecs import Reader, RecordCodec, RecordFigures, Writer, register_record_codec

KIND_SHARED = 2
FLAG_MASK, FLAG_SHARED_BUFFERS = 1, 2
CODEBOOK, INDEX, MASK = "weight_codebook", "weight_index", "weight_mask"


def codebook_payload(head: int, index: np.ndarray, codebook: np.ndarray,
                     formats: tuple[str, ...] = FORMATS) -> tuple[bytes, Layout, int]:
    """(payload, layout, kept entries) of a codebook record (``SHARED``, and ``DCT`` in ``slimkit.encode.dct``).

    ``index``: int array of any shape, ``-1`` = zero/dropped, ``i`` = ``codebook[i]``; ``codebook``: ``k``
    floats. Payload: ``u8 head | u8 ndim | u32 dims | u16 k | f32 codebook[k] | layout``, the layout being
    the Huffman-coded symbols ``0`` = zero, ``1 + i`` = centroid ``i`` in the format that stores them smallest.
    """
    k = codebook.size
    layout = choose_layout((index + 1).ravel(), index.shape, k + 1, formats)
    w = Writer()
    w.u8(head)
    w.u8(index.ndim)
    for d in index.shape:
        w.u32(d)
    w.u16(k)
    w.raw(codebook.astype("<f4").tobytes())
    w.u8(FORMATS.index(layout.format))
    w.u8(layout.gap_bits)
    w.u32(layout.value_count)
    w.lengths(layout.value_lengths)
    w.blob(layout.values)
    if layout.format in ("csr", "csc"):
        w.lengths(layout.gap_lengths)
        w.blob(layout.gaps)
    if layout.format == "bitmask":
        w.blob(layout.bitmask)
    return w.getvalue(), layout, int((index >= 0).sum())


def read_layout(r: Reader, k: int, what: str) -> Layout:
    """The index layout that :func:`codebook_payload` wrote after a ``k``-entry codebook (Huffman streams)."""
    fmt_id = r.u8()
    if fmt_id >= len(FORMATS):
        raise CorruptFileError(f"{what}: unknown sparse format id {fmt_id}")
    layout = Layout(FORMATS[fmt_id], r.u8())
    layout.value_count = r.u32()
    layout.value_lengths = r.lengths(k + 1)
    layout.values = r.blob()
    if layout.format in ("csr", "csc"):
        layout.gap_lengths = r.lengths(1 << layout.gap_bits)
        layout.gaps = r.blob()
    if layout.format == "bitmask":
        layout.bitmask = r.blob()
    return layout


def decode_shared(payload: bytes, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(float32 codebook ``[k]``, int index shaped like the weight with ``-1`` = zero, flags) of a SHARED payload."""
    r = Reader(payload, what)
    flags = r.u8()
    shape = tuple(r.u32() for _ in range(r.u8()))
    k = r.u16()
    codebook = np.frombuffer(r.take(4 * k), dtype="<f4").astype(np.float32)
    layout = read_layout(r, k, what)
    try:
        symbols = decode_layout(layout, shape)
    except CorruptFileError as err:
        raise CorruptFileError(f"{what}: {err}") from None
    return codebook, (symbols - 1).reshape(shape), flags


def _claims(module: nn.Module) -> bool:
    return CODEBOOK in module._buffers


def _derived(module: nn.Module) -> tuple[str, ...]:
    return (CODEBOOK, INDEX) if CODEBOOK in module._buffers else ()


def _encode(module: nn.Module, formats: tuple[str, ...]) -> tuple[bytes, RecordFigures]:
    index = module._buffers[INDEX].detach().cpu().numpy().astype(np.int64)
    codebook = module._buffers[CODEBOOK].detach().cpu().float().numpy()
    weight = module.weight.detach().cpu().float().numpy()
    expected = np.where(index >= 0, codebook[np.clip(index, 0, None)], 0).astype(np.float32)
    if not np.array_equal(expected, weight):
        raise ModelStateError("weight differs from its codebook[index]; "
                              "call slimkit.quantize.sharing.sync_centroids first")
    flags = FLAG_SHARED_BUFFERS | (FLAG_MASK if MASK in module._buffers else 0)
    payload, layout, nonzeros = codebook_payload(flags, index, codebook, formats)
    entries = max(layout.value_count, 1)
    if layout.format in ("csr", "csc"):
        index_bits = 8 * len(layout.gaps) / entries
    elif layout.format == "bitmask":
        index_bits = 8 * len(layout.bitmask) / max(nonzeros, 1)
    else:
        index_bits = 0.0
    return payload, RecordFigures(layout.format, nonzeros, round(8 * len(layout.values) / entries, 3),
                                  round(index_bits, 3), layout.gap_bits)


def _decode(payload: bytes, what: str, prefix: str) -> dict[str, torch.Tensor]:
    codebook, index, flags = decode_shared(payload, what)
    weight = np.where(index >= 0, codebook[np.clip(index, 0, None)], 0).astype(np.float32)
    state = {prefix + "weight": torch.from_numpy(weight)}
    if flags & FLAG_SHARED_BUFFERS:
        state[prefix + CODEBOOK] = torch.from_numpy(codebook.copy())
        state[prefix + INDEX] = torch.from_numpy(index.astype(np.int16))
    if flags & FLAG_MASK:
        state[prefix + MASK] = torch.from_numpy((index >= 0).astype(np.float32))
    return state


SHARED_CODEC = register_record_codec(RecordCodec(
    name="shared", kind=KIND_SHARED, precedence=30, claims=_claims, derived=_derived, encode=_encode,
    decode=_decode))
