"""Frequency-domain weight compression: DCT of the kernels, k-means and Huffman on the coefficients.

Wang, Xu, You, Tao & Xu 2016, *CNNpack: Packing Convolutional Neural Networks in the
Frequency Domain* (NeurIPS). Each weight is moved to the frequency domain by the
orthonormal DCT-II, its small coefficients are dropped, the rest are shared among
``k = 2 ** bits`` values by 1-D k-means, and the cluster indices are Huffman-coded in the
``.slim`` container (record kind ``DCT``, see docs/slim-format.md).

Transforms (``D_n`` is the ``n x n`` orthonormal DCT-II matrix,
``D[f, i] = sqrt(2/n) c_f cos(pi (2i + 1) f / (2n))``, ``c_0 = 1/sqrt(2)``, else 1):

- ``kernel`` (conv layers with a ``kh x kw > 1`` kernel): per kernel ``C = D_kh W D_kw^T``,
  the 2-D DCT of each ``[kh, kw]`` slice (CNNpack's view of a kernel as a small image);
- ``row`` (Linear and 1x1 conv): ``C = W D_n^T`` over each row of ``W [out, n]``.

Compression of one layer: the ``zero_fraction`` smallest ``|C|`` are set to 0 (CNNpack's
shrinkage of small coefficients), the remaining coefficients are clustered,
``C_q = codebook[index]`` (0 where dropped), and the layer's weight becomes the inverse
transform ``W_q = D^T C_q D``. The transform is orthonormal, so the weight error equals the
coefficient error: ``||W - W_q||_F = ||C - C_q||_F`` (Parseval). Decoding is exact: the
container stores ``codebook`` and ``index``, and :func:`synthesize` recomputes ``W_q`` with
the same float64 arithmetic as the transform, bit for bit.

Each compressed layer carries two buffers, ``dct_codebook`` (float32 ``[k]``) and
``dct_index`` (int16, shaped like the weight, ``-1`` for dropped coefficients).
:func:`dct_hooks` fine-tunes the codebook in the frequency domain: the gradient of a
centroid is the sum of ``D (dL/dW) D^T`` over its coefficients, and after every step the
centroids are re-read and the weights rewritten from them, so assignments never change.

>>> import torch
>>> from torch import nn
>>> conv = nn.Sequential(nn.Conv2d(2, 4, 3))
>>> report = dct_compress_(conv, torch.zeros(1, 2, 5, 5), {"conv_bits": 4})
>>> report.layers["0"]["transform"], int(conv[0].dct_index.max()) < 16, report.changed
('kernel', True, ['0'])
>>> dense_dct_bytes(conv)  # 72 4-bit indices + 16 fp32 centroids + 4 fp32 biases
116
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from slimkit.exceptions import ConfigError, CorruptFileError, ModelStateError
from slimkit.quantize.sharing import ShareConfig, codebook_dense_bytes, set_buffer
from slimkit.reports import ModelSize, Report
from slimkit.selection import select_modules
from slimkit.train import StepInfo, TrainHooks

CODEBOOK = "dct_codebook"
INDEX = "dct_index"
TRANSFORMS = ("kernel", "row")


@lru_cache(maxsize=64)
def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``[n, n]`` (float64): ``C = D x`` for a column vector ``x``."""
    f = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(math.pi * (2 * i + 1) * f / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def transform_of(shape: tuple[int, ...]) -> str:
    """``kernel`` for 4-D weights with a kernel larger than 1x1, else ``row``."""
    return "kernel" if len(shape) == 4 and shape[2] * shape[3] > 1 else "row"


def forward_dct(weight: torch.Tensor, transform: str) -> torch.Tensor:
    """Frequency coefficients (float64, shaped like ``weight``) of ``weight``."""
    w = weight.detach().to(torch.float64)
    if transform == "kernel":
        return dct_matrix(w.shape[2]) @ w @ dct_matrix(w.shape[3]).T
    flat = w.reshape(w.shape[0], -1)
    return (flat @ dct_matrix(flat.shape[1]).T).reshape(w.shape)


def inverse_dct(coeffs: torch.Tensor, transform: str) -> torch.Tensor:
    """The weight (float64) whose :func:`forward_dct` is ``coeffs``."""
    c = coeffs.to(torch.float64)
    if transform == "kernel":
        return dct_matrix(c.shape[2]).T @ c @ dct_matrix(c.shape[3])
    flat = c.reshape(c.shape[0], -1)
    return (flat @ dct_matrix(flat.shape[1])).reshape(c.shape)


def synthesize(codebook: torch.Tensor, index: torch.Tensor, transform: str) -> torch.Tensor:
    """float32 weight ``inverse_dct(codebook[index])`` (0 where ``index < 0``); encoder and decoder both use it."""
    index = index.long().cpu()
    book = codebook.detach().cpu().to(torch.float64)
    coeffs = torch.where(index >= 0, book[index.clamp(min=0)], torch.zeros((), dtype=torch.float64))
    return inverse_dct(coeffs, transform).to(torch.float32)


class DCTConfig(ShareConfig):
    """Settings of the ``dct`` stage: bits per coefficient and dropped fraction, per layer type or glob.

    ``per_layer``, ``init``, ``max_iter``, ``layers``, ``ignore`` and ``seed`` mean what they mean in the
    ``share`` stage (:class:`slimkit.quantize.sharing.ShareConfig`); the k-means runs on DCT coefficients.
    """

    conv_bits: int = Field(5, ge=1, le=15, description="bits per shared coefficient in Conv layers")
    linear_bits: int = Field(5, ge=1, le=15, description="bits per shared coefficient in Linear layers")
    zero_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of smallest |coefficients| set to 0")


@torch.no_grad()
def dct_layer_(module: nn.Module, bits: int, zero_fraction: float = 0.0, init: str = "linear",
               max_iter: int = 300, seed: int = 0) -> dict[str, Any]:
    """Compress one layer's weight in the DCT domain, in place; returns its report row."""
    from slimkit.quantize.kmeans import kmeans_1d

    weight = module.weight
    transform = transform_of(tuple(weight.shape))
    coeffs = forward_dct(weight.cpu(), transform)
    flat = coeffs.flatten().numpy()
    keep = flat != 0
    dropped = int(round(zero_fraction * flat.size))
    if dropped:
        order = np.argsort(np.abs(flat), kind="stable")
        keep[order[:dropped]] = False
    k = 2**bits
    index = np.full(flat.shape, -1, dtype=np.int16)
    codebook = np.zeros(k, dtype=np.float32)
    if keep.any():
        result = kmeans_1d(flat[keep], k, init=init, max_iter=max_iter, seed=seed)
        codebook = result.centroids.astype(np.float32)
        index[keep] = result.labels.astype(np.int16)
    set_buffer(module, CODEBOOK, torch.from_numpy(codebook).to(weight.device))
    set_buffer(module, INDEX, torch.from_numpy(index).view(weight.shape).to(weight.device))
    original = weight.detach().double().clone()
    _write_weights(module)
    error = float((weight.double() - original).pow(2).sum() / original.pow(2).sum().clamp(min=1e-30))
    return {"weights": flat.size, "transform": transform, "bits": bits, "kept": int(keep.sum()),
            "relative_sq_error": round(error, 8)}


def _write_weights(module: nn.Module) -> None:
    weight = synthesize(module._buffers[CODEBOOK], module._buffers[INDEX], transform_of(tuple(module.weight.shape)))
    module.weight.copy_(weight.to(module.weight))


def dct_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules (by qualified name) that carry a ``dct_codebook``."""
    return {n: m for n, m in model.named_modules() if isinstance(m._buffers.get(CODEBOOK), torch.Tensor)}


@dataclass(kw_only=True)
class DCTReport(Report):
    """What :func:`dct_compress_` did: ``layers`` name -> ``{"weights", "transform", "bits", "kept",
    "relative_sq_error"}`` (names also in ``changed``) and the ``zero_fraction`` dropped.

    ``before`` / ``after`` count the simulation as it is held (fp32 weights + int16 indices);
    :func:`dense_dct_bytes` is the size stored as dense b-bit indices."""

    verb: str = "dct_compress_"
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    zero_fraction: float = 0.0


def dct_compress_(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
                  config: DCTConfig | dict[str, Any] | None = None) -> DCTReport:
    """DCT + k-means the selected Conv2d/Linear layers of ``model`` in place; returns a :class:`DCTReport`.

    ``example_inputs``: a tensor or a tuple of tensors the model accepts (the report's sizes).
    Layers already pruned (``weight_mask``) or shared (``weight_codebook``) are refused:
    the inverse DCT of shared coefficients is dense, it would undo both.
    """
    config = DCTConfig.coerce(config, where="dct")
    modules = select_modules(model, (nn.Conv2d, nn.Linear), config.layers, config.ignore, what="dct.layers")
    for name, module in modules.items():
        taken = [b for b in ("weight_mask", "weight_codebook") if b in module._buffers]
        if taken:
            raise ConfigError(f"dct: layer {name!r} carries {taken[0]}; DCT compression makes the weight dense "
                              "again, so apply it to a dense layer (or add the layer to dct.ignore)")
    report = DCTReport(zero_fraction=config.zero_fraction, before=ModelSize.of(model, example_inputs))
    for name, module in modules.items():
        report.layers[name] = dct_layer_(module, config.bits_for(name, module), config.zero_fraction, config.init,
                                         config.max_iter, config.seed)
        report.changed.append(name)
    report.after = ModelSize.of(model, example_inputs)
    return report


def dct_centroid_grads(model: nn.Module) -> None:
    """``grad_hooks`` entry: ``dL/dW := D^T S[index] D`` with ``S_k`` the summed coefficient gradients of centroid k."""
    for module in dct_modules(model).values():
        grad = module.weight.grad
        if grad is None:
            continue
        transform = transform_of(tuple(grad.shape))
        coeff_grad = forward_dct(grad.cpu(), transform)
        index = module._buffers[INDEX].long().cpu()
        valid = index >= 0
        k = module._buffers[CODEBOOK].numel()
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, index[valid], coeff_grad[valid])
        shared = torch.where(valid, sums[index.clamp(min=0)], torch.zeros((), dtype=torch.float64))
        grad.copy_(inverse_dct(shared, transform).to(grad))


@torch.no_grad()
def sync_dct_centroids(model: nn.Module, *_: object) -> None:
    """``after_step`` entry: centroid := mean of its coefficients of the updated weight; weight rewritten."""
    for module in dct_modules(model).values():
        coeffs = forward_dct(module.weight.cpu(), transform_of(tuple(module.weight.shape)))
        index = module._buffers[INDEX].long().cpu()
        valid = index >= 0
        book = module._buffers[CODEBOOK]
        k = book.numel()
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, index[valid], coeffs[valid])
        counts = torch.bincount(index[valid], minlength=k).to(sums)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), book.cpu().double())
        module._buffers[CODEBOOK] = updated.to(book.dtype).to(book.device)
        _write_weights(module)


def _after_step(model: nn.Module, info: StepInfo) -> None:
    sync_dct_centroids(model)


def dct_hooks() -> TrainHooks:
    """Training hooks that fine-tune the frequency-domain codebooks of every DCT-compressed layer."""
    return TrainHooks(grad_hooks=(dct_centroid_grads,), after_step=(_after_step,))


def dense_dct_bytes(model: nn.Module) -> int:
    """Bytes with each DCT layer stored as dense ``bits``-bit indices plus its fp32 codebook (before Huffman)."""
    return codebook_dense_bytes(model, CODEBOOK, INDEX)


# ------------------------------------------------------------------------- the DCT record of the .slim container


def dct_payload(module: nn.Module, formats: tuple[str, ...]) -> tuple[bytes, Any, int]:
    """(payload, layout, kept coefficients) of the container's ``DCT`` record for ``module``.

    Payload: ``u8 transform | u8 ndim | u32 dims | u16 k | f32 codebook[k] | layout``, the
    layout (Huffman streams of the symbols ``0`` = dropped, ``1 + i`` = centroid ``i``) as in
    a ``SHARED`` record. Raises ValueError when the weight differs from its codebook.
    """
    from slimkit.encode.container import codebook_payload

    index_t, codebook_t = module._buffers[INDEX], module._buffers[CODEBOOK]
    transform = transform_of(tuple(module.weight.shape))
    if not torch.equal(synthesize(codebook_t, index_t, transform), module.weight.detach().cpu().float()):
        raise ModelStateError("weight differs from the inverse DCT of its codebook; call "
                         "slimkit.encode.dct.sync_dct_centroids first")
    index = index_t.detach().cpu().numpy().astype(np.int64)
    codebook = codebook_t.detach().cpu().float().numpy()
    return codebook_payload(TRANSFORMS.index(transform), index, codebook, formats)


def decode_dct_record(payload: bytes, what: str, prefix: str) -> dict[str, torch.Tensor]:
    """The state-dict entries of a ``DCT`` record: weight, ``dct_codebook``, ``dct_index``.

    A record that decodes to an impossible layer (unknown transform, a transform that does
    not fit the shape, indices outside the codebook) raises one-line CorruptFileError.
    """
    from slimkit.encode.container import _Reader, read_layout
    from slimkit.encode.sparse import decode_layout

    r = _Reader(payload, what)
    transform_id = r.u8()
    if transform_id >= len(TRANSFORMS):
        raise CorruptFileError(f"{what}: unknown DCT transform id {transform_id} (known: 0 kernel, 1 row)")
    shape = tuple(r.u32() for _ in range(r.u8()))
    transform = TRANSFORMS[transform_id]
    if len(shape) not in (2, 4) or transform != transform_of(shape):
        raise CorruptFileError(f"{what}: DCT transform {transform!r} does not fit a weight of shape {shape}")
    k = r.u16()
    if k == 0:
        raise CorruptFileError(f"{what}: DCT record with an empty codebook")
    codebook = np.frombuffer(r.take(4 * k), dtype="<f4").astype(np.float32)
    layout = read_layout(r, k, what)
    if r.pos != len(payload):
        raise CorruptFileError(f"{what}: {len(payload) - r.pos} unexpected bytes after the DCT payload")
    try:
        symbols = decode_layout(layout, shape)
    except (CorruptFileError, ValueError, IndexError, struct.error) as err:
        raise CorruptFileError(f"{what}: DCT indices cannot be decoded ({err})") from None
    if symbols.size != math.prod(shape) or (symbols.size and int(symbols.max()) > k):
        raise CorruptFileError(f"{what}: DCT indices do not fit {k} centroids and shape {shape}")
    index = torch.from_numpy((symbols - 1).reshape(shape).astype(np.int16))
    book = torch.from_numpy(codebook.copy())
    return {prefix + "weight": synthesize(book, index, transform), prefix + CODEBOOK: book, prefix + INDEX: index}
