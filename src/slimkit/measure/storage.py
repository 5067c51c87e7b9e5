"""Stored bytes of a model: the one module every technique's bytes figure goes through.

- :func:`stored_bytes`: the model as stored. A module whose class (or a base of it) has a
  rule registered with :func:`register_storage_rule` is counted by that rule (its own
  tensors, not its children's: bit-packed codes + scales for a quantized layer, 1 bit per
  weight + alpha for a binary layer, ...); every other tensor of the state dict as
  :func:`state_dict_bytes` counts it. The owning packages register their layers' rules, so
  this module imports none of them.
- :func:`state_dict_bytes`: the model stored densely in fp32, i.e. its ``state_dict``: every
  floating-point entry (parameters and buffers such as BatchNorm running statistics, whatever
  their dtype) at 4 bytes, every integer or bool buffer (``num_batches_tracked``) at its own
  item size. Entries whose name ends in ``_mask`` are excluded: masks are a simulation
  artefact, not part of a deployed model. Tensors shared under two names count once. No
  file-format overhead (pickle headers, zip) is included. This is the "before" figure, and
  what :func:`stored_bytes` gives for a model without registered layers.

>>> from torch import nn
>>> stored_bytes(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))  # 15*4 + (4*3*4 + 8)
116
>>> state_dict_bytes(nn.BatchNorm2d(8))  # weight, bias, running_mean, running_var (fp32) + num_batches_tracked
136
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: buffers named ``<name>_mask`` are pruning masks: never counted as stored
MASK_SUFFIX = "_mask"

#: bytes one module's own tensors take as stored (its children are counted on their own)
StorageRule = Callable[[nn.Module], int]

_RULES: dict[type, StorageRule] = {}


def register_storage_rule(cls: type[nn.Module], rule: StorageRule) -> None:
    """Count modules of ``cls`` (and subclasses) with ``rule(module) -> bytes of its own tensors``."""
    _RULES[cls] = rule


def rule_for(module: nn.Module) -> StorageRule | None:
    """The rule registered for ``module``'s class or its nearest base, or None."""
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def dense_tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of one state-dict tensor stored densely: floating point at 4 bytes, others at their item size."""
    return tensor.numel() * (4 if tensor.is_floating_point() else tensor.element_size())


def own_tensor_bytes(module: nn.Module, seen: set[int] | None = None) -> int:
    """Bytes of ``module``'s own state-dict tensors stored densely (``*_mask`` excluded; ids in ``seen`` skipped)."""
    seen = set() if seen is None else seen
    total = 0
    for name, tensor in module.state_dict(keep_vars=True).items():
        if "." in name or name.endswith(MASK_SUFFIX) or id(tensor) in seen:
            continue  # a child's tensor, a mask, or a tensor shared with a module counted already
        seen.add(id(tensor))
        total += dense_tensor_bytes(tensor)
    return total


def _count(model: nn.Module, rules: bool) -> int:
    ruled: dict[str, nn.Module] = {}
    if rules and _RULES:
        ruled = {name: m for name, m in model.named_modules(remove_duplicate=False) if rule_for(m) is not None}
    total = 0
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if owner in ruled or leaf.endswith(MASK_SUFFIX) or id(tensor) in seen:
            continue  # counted by its module's rule, a mask, or a tensor shared with one counted already
        seen.add(id(tensor))
        total += dense_tensor_bytes(tensor)
    unique = {id(m): m for m in ruled.values()}
    return total + sum(int(rule_for(m)(m)) for m in unique.values())


def stored_bytes(model: nn.Module) -> int:
    """Bytes of ``model`` as stored: registered layers by their rules, every other tensor densely (shared once)."""
    return _count(model, rules=True)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state dict stored densely in fp32 (see the module docstring for what counts)."""
    return _count(model, rules=False)
