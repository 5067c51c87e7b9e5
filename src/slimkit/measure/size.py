"""Parameters, non-zeros and the bytes of the fp32 state dict: the one parameter counter.

- :func:`count_params`: every parameter entry (shared parameters once).
- :func:`count_nonzeros`: parameter entries that are non-zero *after masking*: when the
  owning module has a buffer ``<param>_mask`` (slimkit's ``weight_mask``) or the parameter
  is ``<name>_orig`` with a ``<name>_mask`` buffer (``torch.nn.utils.prune``), an entry counts
  only if both the weight and its mask are non-zero.
- :func:`state_dict_bytes`: the size of the model stored densely in fp32, re-exported from
  :mod:`slimkit.measure.storage` (the one module for stored bytes, which says what counts;
  :func:`slimkit.measure.storage.stored_bytes` counts registered compressed layers as stored).

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

from slimkit.measure.storage import MASK_SUFFIX, state_dict_bytes

__all__ = ["MASK_SUFFIX", "count_nonzeros", "count_params", "state_dict_bytes"]


def count_params(model: nn.Module) -> int:
    """Number of parameter entries of ``model`` (shared parameters counted once); every parameter
    figure in slimkit (reports, profiles, decomposition costs) is this count."""
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
                mask = _mask_for(module, name)
                if mask is not None and mask.shape == param.shape:
                    total += int(torch.count_nonzero((param != 0) & (mask != 0)))
                else:
                    total += int(torch.count_nonzero(param))  # one pass, no boolean copy
    return total
