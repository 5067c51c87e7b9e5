"""Parameters, non-zeros and the bytes of the fp32 state dict.

- :func:`count_params`: every parameter entry (shared parameters once).
- :func:`count_nonzeros`: parameter entries that are non-zero *after masking*: when the
  owning module has a buffer ``<param>_mask`` (slimkit's ``weight_mask``) or the parameter
  is ``<name>_orig`` with a ``<name>_mask`` buffer (``torch.nn.utils.prune``), an entry counts
  only if both the weight and its mask are non-zero.
- :func:`state_dict_bytes`: the size of the model stored densely in fp32, i.e. of its
  ``state_dict``: every floating-point entry (parameters and buffers such as BatchNorm
  running statistics, whatever their dtype) at 4 bytes, every integer or bool buffer
  (``num_batches_tracked``) at its own item size. Entries whose name ends in ``_mask`` are
  excluded: masks are a simulation artefact, not part of a deployed model. Tensors shared
  under two names count once. No file-format overhead (pickle headers, zip) is included.
  This is the "before" figure; compressed artifacts report their real bytes themselves.

>>> from torch import nn
>>> layer = nn.Linear(4, 3)
>>> count_params(layer), state_dict_bytes(layer)
(15, 60)
>>> bn = nn.BatchNorm2d(8)  # weight, bias, running_mean, running_var (fp32) + num_batches_tracked (int64)
>>> state_dict_bytes(bn)
136
"""

from __future__ import annotations

import torch
from torch import nn

MASK_SUFFIX = "_mask"


def count_params(model: nn.Module) -> int:
    """Number of parameter entries of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _mask_for(module: nn.Module, param_name: str) -> torch.Tensor | None:
    buffers = dict(module.named_buffers(recurse=False))
    base = param_name[: -len("_orig")] if param_name.endswith("_orig") else param_name
    for key in (param_name + MASK_SUFFIX, base + MASK_SUFFIX):
        if key in buffers and buffers[key] is not None:
            return buffers[key]
    return None


def count_nonzeros(model: nn.Module) -> int:
    """Number of non-zero parameter entries, a parameter's ``*_mask`` buffer applied when present."""
    total = 0
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                nonzero = param != 0
                mask = _mask_for(module, name)
                if mask is not None and mask.shape == param.shape:
                    nonzero = nonzero & (mask != 0)
                total += int(nonzero.sum())
    return total


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state dict stored densely in fp32 (see the module docstring for what counts)."""
    total = 0
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.rsplit(".", 1)[-1].endswith(MASK_SUFFIX) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        itemsize = 4 if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * itemsize
    return total
