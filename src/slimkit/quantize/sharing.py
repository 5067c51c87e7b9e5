"""k-means weight sharing with centroid fine-tuning (Han, Mao & Dally, ICLR 2016, section 3).

:func:`share_weights_` clusters the non-zero weights of each selected Conv/Linear layer
into ``k = 2 ** bits`` centroids (1-D k-means, :mod:`slimkit.quantize.kmeans`) and
replaces every weight by its centroid. Each layer gets two buffers, saved and restored
with the model like any buffer:

- ``weight_codebook``: float32 ``[k]``, the shared values;
- ``weight_index``: int16, shaped like the weight; the centroid of each weight, ``-1``
  for weights that are exactly zero (pruned), which stay zero.

:func:`sharing_hooks` trains the centroids: after backward, every weight's gradient is
replaced by the sum of the gradients of all weights sharing its centroid (the paper's
centroid gradient), pruned weights get zero. All weights of a cluster then receive
identical updates (SGD, momentum, weight decay and Adam are element-wise), so a cluster
moves as one value; after each step the hook re-reads the centroids and rewrites the
weights from them, so assignments and zeros never change.

>>> import torch
>>> from torch import nn
>>> layer = nn.Sequential(nn.Linear(16, 8))
>>> report = share_weights_(layer, torch.zeros(1, 16), {"linear_bits": 2})
>>> int(layer[0].weight.unique().numel()) <= 4, report.layers["0"]["bits"], report.changed
(True, 2, ['0'])
>>> dense_shared_bytes(layer)  # 128 2-bit indices + 4 fp32 centroids + 8 fp32 biases
80
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from slimkit.config import Config
from slimkit.measure.storage import stored_bytes
from slimkit.prune.masks import PRUNABLE
from slimkit.reports import ModelSize, Report
from slimkit.selection import matches, select_modules
from slimkit.train import StepInfo, TrainHooks

CODEBOOK = "weight_codebook"
INDEX = "weight_index"


class ShareConfig(Config):
    """Settings of the ``share`` stage: bits per layer type, overridable by glob."""

    conv_bits: int = Field(8, ge=1, le=15, description="bits per shared weight in Conv layers (k = 2**bits)")
    linear_bits: int = Field(5, ge=1, le=15, description="bits per shared weight in Linear layers")
    per_layer: dict[str, int] = Field(default_factory=dict, description="glob -> bits, first match wins")
    init: Literal["linear", "density", "random"] = "linear"
    max_iter: int = Field(300, ge=1)
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    seed: int = 0

    @field_validator("per_layer")
    @classmethod
    def _check_bits(cls, value: dict[str, int]) -> dict[str, int]:
        for glob, bits in value.items():
            if not 1 <= int(bits) <= 15:
                raise ValueError(f"per_layer[{glob!r}] must be a bit width in 1..15, got {bits}")
        return value

    def bits_for(self, name: str, module: nn.Module) -> int:
        for glob, bits in self.per_layer.items():
            if matches(name, (glob,)):
                return int(bits)
        return self.linear_bits if isinstance(module, nn.Linear) else self.conv_bits


def set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set buffer ``name`` of ``module`` to ``value``, registering it on first use."""
    if name in module._buffers:
        module._buffers[name] = value
    else:
        module.register_buffer(name, value)


@torch.no_grad()
def share_layer_(module: nn.Module, bits: int, init: str = "linear", max_iter: int = 300, seed: int = 0) -> dict:
    """Share one layer's non-zero weights among ``2**bits`` centroids; returns its report row."""
    from slimkit.quantize.kmeans import kmeans_1d

    weight = module.weight
    flat = weight.detach().cpu().double().flatten().numpy()
    nonzero = flat != 0
    k = 2**bits
    index = np.full(flat.shape, -1, dtype=np.int16)
    codebook = np.zeros(k, dtype=np.float32)
    inertia, used = 0.0, 0
    if nonzero.any():
        result = kmeans_1d(flat[nonzero], k, init=init, max_iter=max_iter, seed=seed)
        codebook = result.centroids.astype(np.float32)
        index[nonzero] = result.labels.astype(np.int16)
        inertia, used = result.inertia, int(np.unique(result.labels).size)
    codebook_t = torch.from_numpy(codebook).to(weight.device)
    index_t = torch.from_numpy(index).view(weight.shape).to(weight.device)
    set_buffer(module, CODEBOOK, codebook_t)
    set_buffer(module, INDEX, index_t)
    _write_weights(module)
    return {"weights": flat.size, "nonzeros": int(nonzero.sum()), "bits": bits, "clusters": k,
            "clusters_used": used, "inertia": round(inertia, 8)}


def _write_weights(module: nn.Module) -> None:
    index = module._buffers[INDEX].long()
    codebook = module._buffers[CODEBOOK].to(module.weight.dtype)
    module.weight.copy_(torch.where(index >= 0, codebook[index.clamp(min=0)], torch.zeros((), dtype=codebook.dtype)))


def shared_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules (by qualified name) that carry a ``weight_codebook``."""
    return {n: m for n, m in model.named_modules() if isinstance(m._buffers.get(CODEBOOK), torch.Tensor)}


@dataclass(kw_only=True)
class ShareReport(Report):
    """What :func:`share_weights_` did: ``layers`` name -> ``{"weights", "nonzeros", "bits", "clusters",
    "clusters_used", "inertia"}`` (names also in ``changed``) and the k-means ``init``.

    ``before`` / ``after`` count the simulation as it is held (fp32 weights + int16 indices);
    :func:`dense_shared_bytes` is the size stored as dense b-bit indices."""

    verb: str = "share_weights_"
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    init: str = "linear"


def share_weights_(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
                   config: ShareConfig | dict[str, Any] | None = None) -> ShareReport:
    """Weight-share the selected Conv/Linear layers of ``model`` in place; returns a :class:`ShareReport`.

    ``example_inputs``: a tensor or a tuple of tensors the model accepts (the report's sizes).
    """
    config = ShareConfig.coerce(config, where="share")
    modules = select_modules(model, PRUNABLE, config.layers, config.ignore, what="share.layers")
    report = ShareReport(init=config.init, before=ModelSize.of(model, example_inputs))
    for name, module in modules.items():
        report.layers[name] = share_layer_(module, config.bits_for(name, module), config.init, config.max_iter,
                                           config.seed)
        report.changed.append(name)
    report.after = ModelSize.of(model, example_inputs)
    return report


def codebook_dense_bytes(model: nn.Module, codebook: str, index: str) -> int:
    """:func:`~slimkit.measure.storage.stored_bytes` of ``model`` with every layer that carries the
    ``codebook`` / ``index`` buffers counted as dense ``log2(k)``-bit indices plus its fp32 codebook
    (``k`` centroids) instead of its fp32 weight and int16 index; masks do not count."""
    total = stored_bytes(model)
    for module in model.modules():
        book, idx = module._buffers.get(codebook), module._buffers.get(index)
        if not (isinstance(book, torch.Tensor) and isinstance(idx, torch.Tensor)):
            continue
        numel = module.weight.numel()
        bits = int(book.numel()).bit_length() - 1  # k = 2 ** bits centroids
        total -= 4 * numel + idx.numel() * idx.element_size()
        total += math.ceil(numel * bits / 8)
    return total


def dense_shared_bytes(model: nn.Module) -> int:
    """Bytes with every shared weight stored as a dense ``bits``-bit index plus its fp32 codebook.

    The rest counts as :func:`~slimkit.measure.storage.stored_bytes` does; the simulation
    buffers (index as int16, masks) are not counted. Sparse storage and Huffman coding come in
    the ``encode`` stage.
    """
    return codebook_dense_bytes(model, CODEBOOK, INDEX)


def share_centroid_grads(model: nn.Module) -> None:
    """``grad_hooks`` entry: each weight's gradient := the summed gradient of its centroid."""
    for module in shared_modules(model).values():
        grad = module.weight.grad
        if grad is None:
            continue
        index = module._buffers[INDEX].long()
        valid = index >= 0
        k = module._buffers[CODEBOOK].numel()
        sums = torch.zeros(k, dtype=grad.dtype, device=grad.device).index_add_(0, index[valid], grad[valid])
        grad.copy_(torch.where(valid, sums[index.clamp(min=0)], torch.zeros((), dtype=grad.dtype)))


@torch.no_grad()
def sync_centroids(model: nn.Module, *_: object) -> None:
    """``after_step`` entry: centroids := mean of their (identical) weights; weights rewritten from them."""
    for module in shared_modules(model).values():
        index = module._buffers[INDEX].long()
        valid = index >= 0
        codebook = module._buffers[CODEBOOK]
        k = codebook.numel()
        sums = torch.zeros(k, dtype=torch.float64, device=codebook.device)
        sums.index_add_(0, index[valid], module.weight[valid].double())
        counts = torch.bincount(index[valid], minlength=k).to(sums)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), codebook.double()).to(codebook.dtype)
        module._buffers[CODEBOOK] = updated
        _write_weights(module)


def _after_step(model: nn.Module, info: StepInfo) -> None:
    sync_centroids(model)


def sharing_hooks() -> TrainHooks:
    """Training hooks for centroid fine-tuning of every weight-shared layer of the trained model."""
    return TrainHooks(grad_hooks=(share_centroid_grads,), after_step=(_after_step,))
