"""The ``.slim`` container: one file holding a compressed model, every record CRC-checked.

Layout (little-endian; docs/slim-format.md has the full description)::

    header   b"SLIM" | u16 version | u32 record count | u32 CRC32 of the preceding 10 bytes
    record*  u32 body length | body | u32 CRC32 of body
    body     u8 kind | u16 name length | name (UTF-8) | kind-specific payload

Record kinds: ``META`` (zlib-compressed JSON: architecture reference and module manifest of
:mod:`slimkit.manifest`), ``RAW`` (a tensor as its bytes: dtype, shape, data) and
``SHARED`` (a weight-shared tensor: shape, flags, float32 codebook, layout from
:mod:`slimkit.encode.sparse`, Huffman code lengths and bitstreams). The derived buffers of
a pruned/shared layer (``weight_mask``, ``weight_codebook``, ``weight_index``) are not
stored; a flag says which to rebuild, and they are rebuilt exactly from the indices.
``PACKED`` holds the weight of a quantized or binary layer as bit-packed integer codes
(1, 2, 4 or 8 bits each) plus its scales and zero points (see docs/slim-format.md).

:func:`save` writes atomically; :func:`load` rebuilds the model (zoo models by name,
others from ``model=skeleton``) and restores every stored tensor bit-exactly. A truncated
or damaged file raises :class:`~slimkit.exceptions.CorruptFileError` naming the record.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.atomic import atomic_write_bytes
from slimkit.encode.sparse import FORMATS, Layout, choose_layout, decode_layout
from slimkit.exceptions import ConfigError, CorruptFileError, ModelStateError

MAGIC = b"SLIM"
VERSION = 2  # 2: PACKED scales may be float16 and zero points uint8 or absent (flags 4, 8)
KIND_META, KIND_RAW, KIND_SHARED, KIND_PACKED = 0, 1, 2, 3
KIND_DCT = 4  # frequency-domain shared weight (slimkit.encode.dct, CNNpack)
FLAG_MASK, FLAG_SHARED_BUFFERS = 1, 2
PACKED_UNIFORM, PACKED_BINARY = 0, 1  # KIND_PACKED sub-kinds
PACKED_SIGNED, PACKED_SCALAR, PACKED_FP16_SCALES, PACKED_U8_ZEROS = 1, 2, 4, 8  # PACKED flags
GRID_BUFFERS = ("w_scale", "w_zero")  # rebuilt from a uniform PACKED record
DERIVED = ("weight_mask", "weight_codebook", "weight_index")
DCT_BUFFERS = ("dct_codebook", "dct_index")  # rebuilt from a DCT record


@dataclass
class TensorInfo:
    """Per-tensor figures of a written container (what the report tables show)."""

    name: str
    kind: str
    format: str
    weights: int
    nonzeros: int
    bits_per_weight: float  # bits of value symbols per stored non-zero (Huffman mean)
    bits_per_index: float  # bits of gap symbols per stored non-zero (csr/csc), bitmask bits, or 0
    gap_bits: int
    bytes: int  # the whole record, framing and CRC included


class _Writer:
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
        nz = np.flatnonzero(lengths)
        trimmed = np.asarray(lengths[: nz[-1] + 1] if nz.size else lengths[:0], dtype=np.uint8)
        self.u16(trimmed.size)
        self.raw(trimmed.tobytes())

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
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


def _record(kind: int, name: str, payload: bytes) -> bytes:
    encoded = name.encode()
    body = struct.pack("<BH", kind, len(encoded)) + encoded + payload
    return struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))


def _raw_payload(tensor: torch.Tensor, flags: int = 0) -> bytes:
    array = tensor.detach().cpu().contiguous().numpy()
    w = _Writer()
    w.u8(flags)
    dtype = array.dtype.str.encode()
    w.u8(len(dtype))
    w.raw(dtype)
    w.u8(array.ndim)
    for d in array.shape:
        w.u32(d)
    w.raw(array.tobytes())
    return w.getvalue()


def _shared_payload(module: nn.Module, flags: int, formats: tuple[str, ...]) -> tuple[bytes, Layout, int]:
    index = module._buffers["weight_index"].detach().cpu().numpy().astype(np.int64)
    codebook = module._buffers["weight_codebook"].detach().cpu().float().numpy()
    weight = module.weight.detach().cpu().float().numpy()
    expected = np.where(index >= 0, codebook[np.clip(index, 0, None)], 0).astype(np.float32)
    if not np.array_equal(expected, weight):
        raise ModelStateError("weight differs from its codebook[index]; "
                              "call slimkit.quantize.sharing.sync_centroids first")
    return codebook_payload(flags, index, codebook, formats)


def codebook_payload(head: int, index: np.ndarray, codebook: np.ndarray,
                     formats: tuple[str, ...] = FORMATS) -> tuple[bytes, Layout, int]:
    """(payload, layout, kept entries) of a codebook record (``SHARED``, and ``DCT`` in ``slimkit.encode.dct``).

    ``index``: int array of any shape, ``-1`` = zero/dropped, ``i`` = ``codebook[i]``; ``codebook``: ``k``
    floats. Payload: ``u8 head | u8 ndim | u32 dims | u16 k | f32 codebook[k] | layout``, the layout being
    the Huffman-coded symbols ``0`` = zero, ``1 + i`` = centroid ``i`` in the format that stores them smallest.
    """
    k = codebook.size
    layout = choose_layout((index + 1).ravel(), index.shape, k + 1, formats)
    w = _Writer()
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


def _packed_kind(module: nn.Module | None) -> int | None:
    """PACKED_UNIFORM / PACKED_BINARY for quantized / binary layers (their weight is stored packed), else None."""
    if module is None:
        return None
    from slimkit.quantize.binary import BINARY_LAYERS
    from slimkit.quantize.fake import QUANT_LAYERS

    if isinstance(module, QUANT_LAYERS):
        return PACKED_UNIFORM
    if isinstance(module, BINARY_LAYERS):
        return PACKED_BINARY
    return None


def _packed_payload(module: nn.Module, sub: int) -> tuple[bytes, int]:
    """(payload, bits) of a bit-packed weight: integer codes of a uniform grid, or 1-bit signs + alpha."""
    from slimkit.quantize.observers import is_fp16_exact
    from slimkit.quantize.packing import pack_bits, storage_bits, to_unsigned

    w = _Writer()
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


def _decode_packed(payload: bytes, what: str, prefix: str) -> dict[str, torch.Tensor]:
    """The state-dict entries of a PACKED record: the weight (+ ``w_scale``/``w_zero`` for a uniform grid)."""
    from slimkit.quantize.packing import from_unsigned, unpack_bits

    r = _Reader(payload, what)
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


def _meta(model: nn.Module) -> bytes:
    from slimkit.manifest import model_meta

    meta = model_meta(model)  # source, data spec and module manifest, as in a model.pt
    return zlib.compress(json.dumps(meta, separators=(",", ":")).encode(), 9)


def encode_model(model: nn.Module, formats: tuple[str, ...] = FORMATS) -> tuple[bytes, list[TensorInfo]]:
    """The container bytes of ``model`` and per-tensor figures (nothing written)."""
    state = model.state_dict()
    modules = dict(model.named_modules())
    records: list[bytes] = [_record(KIND_META, "meta", _meta(model))]
    infos: list[TensorInfo] = []
    skip: set[str] = set()
    for key in state:
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if leaf in DERIVED and module is not None and leaf != "weight" and (
            "weight_codebook" in module._buffers or leaf == "weight_mask"):
            skip.add(key)
        if leaf in GRID_BUFFERS and _packed_kind(module) == PACKED_UNIFORM:
            skip.add(key)
        if leaf in DCT_BUFFERS and module is not None and "dct_codebook" in module._buffers:
            skip.add(key)
    for key, tensor in state.items():
        if key in skip:
            continue
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        has_mask = module is not None and "weight_mask" in module._buffers
        packed = _packed_kind(module) if leaf == "weight" else None
        if packed is not None:
            payload, bits = _packed_payload(module, packed)
            record = _record(KIND_PACKED, key, payload)
            infos.append(TensorInfo(key, "packed", "binary" if packed == PACKED_BINARY else f"int{bits}",
                                    tensor.numel(), int((tensor != 0).sum()), float(bits), 0.0, 0, len(record)))
        elif leaf == "weight" and module is not None and "dct_codebook" in module._buffers:
            from slimkit.encode.dct import dct_payload

            payload, layout, kept = dct_payload(module, formats)
            record = _record(KIND_DCT, key, payload)
            entries = max(layout.value_count, 1)
            index_bytes = len(layout.gaps) if layout.format in ("csr", "csc") else len(layout.bitmask)
            index_bits = 8 * index_bytes / (entries if layout.format in ("csr", "csc") else max(kept, 1))
            infos.append(TensorInfo(key, "dct", layout.format, tensor.numel(), kept,
                                    round(8 * len(layout.values) / entries, 3), round(index_bits, 3),
                                    layout.gap_bits, len(record)))
        elif leaf == "weight" and module is not None and "weight_codebook" in module._buffers:
            flags = FLAG_SHARED_BUFFERS | (FLAG_MASK if has_mask else 0)
            payload, layout, nonzeros = _shared_payload(module, flags, formats)
            record = _record(KIND_SHARED, key, payload)
            entries = max(layout.value_count, 1)
            if layout.format in ("csr", "csc"):
                index_bits = 8 * len(layout.gaps) / entries
            elif layout.format == "bitmask":
                index_bits = 8 * len(layout.bitmask) / max(nonzeros, 1)
            else:
                index_bits = 0.0
            infos.append(TensorInfo(key, "shared", layout.format, tensor.numel(), nonzeros,
                                    round(8 * len(layout.values) / entries, 3), round(index_bits, 3),
                                    layout.gap_bits, len(record)))
        else:
            flags = FLAG_MASK if (leaf == "weight" and has_mask) else 0
            record = _record(KIND_RAW, key, _raw_payload(tensor, flags))
            nonzeros = int((tensor != 0).sum()) if tensor.is_floating_point() else tensor.numel()
            infos.append(TensorInfo(key, "raw", "raw", tensor.numel(), nonzeros, float(tensor.element_size() * 8),
                                    0.0, 0, len(record)))
        records.append(record)
    head = MAGIC + struct.pack("<HI", VERSION, len(records))
    header = head + struct.pack("<I", zlib.crc32(head))
    return header + b"".join(records), infos


def save(model: nn.Module, path: str | os.PathLike, formats: tuple[str, ...] = FORMATS) -> list[TensorInfo]:
    """Write ``model`` as a ``.slim`` container at ``path`` (atomically); returns per-tensor figures.

    Weight-shared layers (``weight_codebook``/``weight_index`` buffers, see
    :mod:`slimkit.quantize.sharing`) are stored as Huffman-coded sparse indices; every
    other tensor of the state dict is stored raw. ``formats`` limits the sparse layouts tried.
    """
    data, infos = encode_model(model, formats)
    atomic_write_bytes(path, data)
    return infos


def _records(data: bytes, where: str) -> list[tuple[int, str, bytes]]:
    if len(data) < 14:
        raise CorruptFileError(f"{where}: truncated header ({len(data)} bytes); not a complete .slim file")
    if data[:4] != MAGIC:
        raise CorruptFileError(f"{where}: not a .slim file (magic {data[:4]!r}, expected {MAGIC!r})")
    version, count = struct.unpack("<HI", data[4:10])
    if struct.unpack("<I", data[10:14])[0] != zlib.crc32(data[:10]):
        raise CorruptFileError(f"{where}: header is corrupted (CRC mismatch)")
    if version > VERSION:
        raise CorruptFileError(f"{where}: format version {version} is newer than this slimkit reads ({VERSION})")
    out, pos = [], 14
    for i in range(count):
        if pos + 4 > len(data):
            raise CorruptFileError(f"{where}: truncated at record {i} of {count} (file ends at byte {len(data)})")
        (length,) = struct.unpack("<I", data[pos : pos + 4])
        body = data[pos + 4 : pos + 4 + length]
        name = _peek_name(body)
        label = f"record {i} ({name!r})" if name else f"record {i}"
        if len(body) < length or pos + 8 + length > len(data):
            raise CorruptFileError(f"{where}: {label} is truncated (file ends at byte {len(data)})")
        (crc,) = struct.unpack("<I", data[pos + 4 + length : pos + 8 + length])
        if crc != zlib.crc32(body):
            raise CorruptFileError(f"{where}: {label} is corrupted (CRC mismatch)")
        kind, name_len = struct.unpack("<BH", body[:3])
        out.append((kind, body[3 : 3 + name_len].decode(), body[3 + name_len :]))
        pos += 8 + length
    if pos != len(data):
        raise CorruptFileError(f"{where}: {len(data) - pos} unexpected bytes after the last record")
    return out


def _peek_name(body: bytes) -> str:
    try:
        (name_len,) = struct.unpack("<H", body[1:3])
        name = body[3 : 3 + name_len]
        return name.decode() if len(name) == name_len else ""
    except (struct.error, UnicodeDecodeError):
        return ""


def _decode_raw(payload: bytes, what: str) -> tuple[torch.Tensor, int]:
    r = _Reader(payload, what)
    flags = r.u8()
    dtype = np.dtype(r.take(r.u8()).decode())
    shape = tuple(r.u32() for _ in range(r.u8()))
    count = int(np.prod(shape)) if shape else 1
    array = np.frombuffer(r.take(count * dtype.itemsize), dtype=dtype).reshape(shape).copy()
    return torch.from_numpy(array), flags


def read_layout(r: _Reader, k: int, what: str) -> Layout:
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


def _decode_shared(payload: bytes, what: str) -> tuple[np.ndarray, np.ndarray, int]:
    r = _Reader(payload, what)
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


def read_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, state dict) stored in a ``.slim`` file, derived buffers rebuilt."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f".slim file {str(path)!r} does not exist")
    where = str(path)
    records = _records(path.read_bytes(), where)
    if not records or records[0][0] != KIND_META:
        raise CorruptFileError(f"{where}: record 0 is not the meta record")
    try:
        meta = json.loads(zlib.decompress(records[0][2]))
    except (zlib.error, ValueError) as err:
        raise CorruptFileError(f"{where}: record 0 ('meta') cannot be decoded ({err})") from None
    state: dict[str, torch.Tensor] = {}
    for i, (kind, name, payload) in enumerate(records[1:], start=1):
        what = f"{where}: record {i} ({name!r})"
        owner = name.rpartition(".")[0]
        prefix = f"{owner}." if owner else ""
        if kind == KIND_RAW:
            tensor, flags = _decode_raw(payload, what)
            state[name] = tensor
            if flags & FLAG_MASK:
                state[prefix + "weight_mask"] = (tensor != 0).to(tensor.dtype)
        elif kind == KIND_PACKED:
            state.update(_decode_packed(payload, what, prefix))
        elif kind == KIND_DCT:
            from slimkit.encode.dct import decode_dct_record

            state.update(decode_dct_record(payload, what, prefix))
        elif kind == KIND_SHARED:
            codebook, index, flags = _decode_shared(payload, what)
            weight = np.where(index >= 0, codebook[np.clip(index, 0, None)], 0).astype(np.float32)
            state[name] = torch.from_numpy(weight)
            if flags & FLAG_SHARED_BUFFERS:
                state[prefix + "weight_codebook"] = torch.from_numpy(codebook.copy())
                state[prefix + "weight_index"] = torch.from_numpy(index.astype(np.int16))
            if flags & FLAG_MASK:
                state[prefix + "weight_mask"] = torch.from_numpy((index >= 0).astype(np.float32))
        else:
            raise CorruptFileError(f"{what}: unknown record kind {kind}")
    return meta, state


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model stored in a ``.slim`` file, in eval mode.

    Zoo models are rebuilt by name; any other needs ``model=skeleton`` (an instance of the
    original class). Raises CorruptFileError (naming the record) for a damaged file.
    """
    from slimkit.manifest import restore

    meta, state = read_state(path)
    return restore(path, meta.get("arch"), meta["modules"], state, model, data=meta.get("data"))


def decode(path: str | os.PathLike, out: str | os.PathLike, model: nn.Module | None = None) -> Path:
    """``slimkit decode FILE -o model.pt``: load a ``.slim`` file, write it with ``manifest.save_model``."""
    from slimkit.manifest import save_model

    return save_model(load(path, model), out)


def dense_bytes(model: nn.Module) -> int:
    """fp32 bytes of the weights and biases of ``model`` (what compression ratios are counted against)."""
    return 4 * sum(p.numel() for p in model.parameters())
