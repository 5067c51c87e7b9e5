"""Compressed-domain inference: run a ``.slim`` model from its stored cluster indices and codebooks (EIE, Han et al.
2016, "EIE: Efficient Inference Engine on Compressed Deep Neural Network").

``load_compressed(path)`` (reached as ``slimkit.encode.load(path, runtime="compressed")``)
rebuilds the model's module tree but never makes the dense fp32 weight of a pruned,
weight-shared Linear or Conv2d: each SHARED record becomes a ``SharedSparseLinear`` or
``SharedSparseConv2d`` (:mod:`slimkit.kernels.sparse`) that keeps the layer as a
:class:`~slimkit.kernels.sparse.SharedSparseMatrix` (8/16-bit relative-index entries holding
the b-bit centroid index, row pointers, the codebook) and computes with the sparse kernels
of :mod:`slimkit.kernels.sparse`. Every other record (biases, batch-norm statistics,
unshared layers) is loaded as usual. :func:`resident_bytes` counts the bytes of every
tensor and array the returned model keeps, which is what "resident weight memory" means
in the reports.

Grouped or dilated convolutions and other layer types with a SHARED record are decoded to
dense as in :func:`slimkit.encode.container.load` and listed in ``model.compressed_report``.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimkit.exceptions import ConfigError, CorruptFileError
from slimkit.kernels.sparse import COMPRESSED_LAYERS, SharedSparseConv2d, SharedSparseLinear, SharedSparseMatrix


def _unsupported(module: nn.Module | None) -> str | None:
    """Why ``module`` cannot run from its indices (None when it can)."""
    if type(module) is nn.Linear:
        return None
    if type(module) is nn.Conv2d:
        if module.groups != 1 or tuple(module.dilation) != (1, 1):
            return "grouped or dilated convolution"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return f"padding {module.padding!r} ({module.padding_mode})"
        return None
    return f"layer type {type(module).__name__}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None, order: str = "csr",
                    fuse: bool = True) -> nn.Module:
    """The model of a ``.slim`` file with its pruned/shared Linear and Conv2d layers computing from the indices.

    ``model``: a skeleton for models outside the zoo (as in ``slimkit.encode.load``);
    ``order``: ``csr`` or ``csc`` for the Linear layers (convolutions always use CSR);
    ``fuse``: run each straight chain of compressed layers (with the ReLU, pooling and
    flatten between them) as one compiled call (:func:`slimkit.kernels.fused.fuse_`; the
    model keeps its class and every layer under its own name).
    Returns the model in eval mode with ``model.compressed_report`` (per layer: kept as
    indices or decoded, and why; ``fused in fused_i`` for the layers of a fused chain).
    Raises CorruptFileError for a damaged file.
    """
    from slimkit.encode import container as c
    from slimkit.manifest import load_rebuilt_state, rebuild, skeleton_from

    if order not in ("csr", "csc"):
        raise ConfigError(f"load(runtime='compressed'): order must be 'csr' or 'csc', got {order!r}")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f".slim file {str(path)!r} does not exist")
    where = str(path)
    records = c._records(path.read_bytes(), where)
    if not records or records[0][0] != c.KIND_META:
        raise CorruptFileError(f"{where}: record 0 is not the meta record")
    try:
        meta = json.loads(zlib.decompress(records[0][2]))
    except (zlib.error, ValueError) as err:
        raise CorruptFileError(f"{where}: record 0 ('meta') cannot be decoded ({err})") from None
    model = rebuild(model if model is not None else skeleton_from(path, meta.get("arch")), meta["modules"])
    modules = dict(model.named_modules())
    report: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    need_full = False
    for i, (kind, name, payload) in enumerate(records[1:], start=1):
        what = f"{where}: record {i} ({name!r})"
        owner, _, leaf = name.rpartition(".")
        prefix = f"{owner}." if owner else ""
        if kind == c.KIND_SHARED and leaf == "weight":
            reason = _unsupported(modules.get(owner))
            if reason is None:
                codebook, index, _ = c._decode_shared(payload, what)
                flat = index.reshape(index.shape[0], -1).ravel()
                positions = np.flatnonzero(flat >= 0)
                matrix = SharedSparseMatrix((index.shape[0], flat.size // index.shape[0]), positions,
                                            flat[positions] + 1, codebook,
                                            order if index.ndim == 2 else "csr")
                del index, flat
                old = modules[owner]
                new = SharedSparseLinear(matrix, old.bias is not None) if isinstance(old, nn.Linear) else \
                    SharedSparseConv2d(matrix, old)
                _set_module(model, owner, new)
                replaced.add(owner)
                report[owner] = f"indices ({matrix.order}, {matrix.nonzeros} non-zeros, {matrix.nbytes} bytes)"
                continue
            report[owner] = f"decoded to dense ({reason})"
        if kind == c.KIND_RAW:
            tensor, flags = c._decode_raw(payload, what)
            state[name] = tensor
            if flags & c.FLAG_MASK and owner not in replaced:
                state[prefix + "weight_mask"] = (tensor != 0).to(tensor.dtype)
        else:
            need_full = True  # PACKED, DCT, a SHARED layer kept dense: decode those records as load() does
    if need_full:
        _, full = c.read_state(path)
        state.update({k: v for k, v in full.items() if k not in state and k.rpartition(".")[0] not in replaced})
    load_rebuilt_state(model, state, where)
    model.eval()
    if fuse:
        from slimkit.kernels.fused import fuse_

        for i, chain in enumerate(fuse_(model)):
            for name in chain:
                if name in report:
                    report[name] += f", fused in fused_{i}"
    model.compressed_report = report
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor and array ``model`` keeps (parameters, buffers, compressed matrices, fused chains).

    Shared storage is counted once: tensors by storage, numpy arrays by the buffer they view
    (a fused chain's layers keep views of the chain's arrays).
    """
    from slimkit.kernels.fused import FusedChain

    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    arrays: dict[int, np.ndarray] = {}
    for module in model.modules():
        if isinstance(module, COMPRESSED_LAYERS):
            kept = (module.matrix.entries, module.matrix.ptr, module.matrix.codebook)
        elif isinstance(module, FusedChain):
            kept = (module.ptrs, module.books, module.ent8, module.ent16, module.fvals)
        else:
            continue
        for array in kept:
            while isinstance(array.base, np.ndarray):
                array = array.base
            arrays[id(array)] = array
    return total + sum(int(a.nbytes) for a in arrays.values())
