"""The ``.slim`` container: one file holding a compressed model, every record CRC-checked.

Layout (little-endian; docs/slim-format.md has the full description)::

    header   b"SLIM" | u16 version | u32 record count | u32 CRC32 of the preceding 10 bytes
    record*  u32 body length | body | u32 CRC32 of body
    body     u8 kind | u16 name length | name (UTF-8) | kind-specific payload

The container writes two kinds itself: ``META`` (0; zlib-compressed JSON: architecture
reference and module manifest of :mod:`slimkit.manifest`) and ``RAW`` (1; a tensor as its
bytes: dtype, shape, data; flag 1 rebuilds the module's ``weight_mask`` from the weight's
zeros). Every other kind is a codec of :mod:`slimkit.slim_codecs`, registered by the package
that owns the layer: ``SHARED`` (2, weight-shared layers, :mod:`slimkit.encode.shared_record`),
``PACKED`` (3, quantized and binary layers, :mod:`slimkit.quantize.packed_record`) and ``DCT``
(4, :mod:`slimkit.encode.dct_record`). The buffers a codec rebuilds from its record are not stored.
This module imports none of those packages' layers.

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
from slimkit.encode.shared_record import FLAG_SHARED_BUFFERS, KIND_SHARED, codebook_payload, read_layout  # noqa: F401
from slimkit.encode.shared_record import decode_shared as _decode_shared  # noqa: F401 (slimkit.encode.runtime)
from slimkit.encode.sparse import FORMATS
from slimkit.exceptions import ConfigError, CorruptFileError
from slimkit.manifest import ModelFileFormat, register_model_file_format
from slimkit.slim_codecs import KIND_META, KIND_RAW, RecordCodec, codec_of_kind, record_codecs
from slimkit.slim_codecs import Reader as _Reader  # noqa: F401 (slimkit.encode.dct)
from slimkit.slim_codecs import Writer as _Writer

MAGIC = b"SLIM"
VERSION = 2  # 2: PACKED scales may be float16 and zero points uint8 or absent (flags 4, 8)
KIND_PACKED, KIND_DCT = 3, 4  # written by slimkit.quantize.packed_record and slimkit.encode.dct_record
FLAG_MASK = 1  # RAW (and SHARED) flag: the module had a weight_mask, rebuilt from the weight's zeros
MASK = "weight_mask"


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


def _meta(model: nn.Module) -> bytes:
    from slimkit.manifest import model_meta

    meta = model_meta(model)  # source, data spec and module manifest, as in a model.pt
    return zlib.compress(json.dumps(meta, separators=(",", ":")).encode(), 9)


def encode_model(model: nn.Module, formats: tuple[str, ...] = FORMATS) -> tuple[bytes, list[TensorInfo]]:
    """The container bytes of ``model`` and per-tensor figures (nothing written).

    A layer's weight is written by the first codec of :func:`slimkit.slim_codecs.record_codecs`
    that claims the layer; every other tensor as RAW. Masks and the buffers the codecs list
    as ``derived`` are rebuilt on decoding, not stored.
    """
    codecs = record_codecs()
    state = model.state_dict()
    modules = dict(model.named_modules())
    claims: dict[str, RecordCodec | None] = {}
    skip: set[str] = set()
    for name, module in modules.items():
        claims[name] = next((c for c in codecs if c.claims(module)), None)
        prefix = f"{name}." if name else ""
        skip.update(prefix + leaf for c in codecs for leaf in c.derived(module))
        skip.add(prefix + MASK)
    records: list[bytes] = [_record(KIND_META, "meta", _meta(model))]
    infos: list[TensorInfo] = []
    for key, tensor in state.items():
        if key in skip:
            continue
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        codec = claims.get(owner) if leaf == "weight" else None
        if codec is not None:
            payload, fig = codec.encode(module, formats)
            record = _record(codec.kind, key, payload)
            infos.append(TensorInfo(key, codec.name, fig.format, tensor.numel(), fig.nonzeros, fig.bits_per_weight,
                                    fig.bits_per_index, fig.gap_bits, len(record)))
        else:
            has_mask = module is not None and MASK in module._buffers
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

    Layers a record codec claims (weight-shared ones as Huffman-coded sparse indices, quantized
    and binary ones bit-packed, :mod:`slimkit.slim_codecs`) are stored by it; every other tensor of
    the state dict is stored raw. ``formats`` limits the sparse layouts tried.
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
                state[prefix + MASK] = (tensor != 0).to(tensor.dtype)
            continue
        codec = codec_of_kind(kind)
        if codec is None:
            raise CorruptFileError(f"{what}: unknown record kind {kind}")
        state.update(codec.decode(payload, what, prefix))
    return meta, state


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model stored in a ``.slim`` file, in eval mode.

    Zoo models are rebuilt by name; any other needs ``model=skeleton`` (an instance of the
    original class). Raises CorruptFileError (naming the record) for a damaged file.
    """
    from slimkit.manifest import restore

    meta, state = read_state(path)
    return restore(path, meta.get("arch"), meta["modules"], state, model, data=meta.get("data"))


register_model_file_format(ModelFileFormat("slim", MAGIC, load))  # slimkit.manifest.load_model opens .slim files


def decode(path: str | os.PathLike, out: str | os.PathLike, model: nn.Module | None = None) -> Path:
    """``slimkit decode FILE -o model.pt``: load a ``.slim`` file, write it with ``manifest.save_model``."""
    from slimkit.manifest import save_model

    return save_model(load(path, model), out)


def dense_bytes(model: nn.Module) -> int:
    """fp32 bytes of the weights and biases of ``model`` (what compression ratios are counted against)."""
    return 4 * sum(p.numel() for p in model.parameters())
