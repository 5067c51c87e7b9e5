"""Stored bytes of a model: one function every technique reports through.

:func:`stored_bytes` walks the model's modules; a module whose class (or a base of it) has a
rule registered with :func:`register_storage_rule` is counted by that rule (its own tensors,
not its children's: bit-packed codes + scales for a quantized layer, 1 bit per weight + alpha
for a binary layer, ...); every other module's own parameters and buffers count as
:func:`slimkit.measure.size.state_dict_bytes` counts them (fp32 at 4 bytes, integer buffers at
their item size, ``*_mask`` buffers excluded: masks are a simulation artefact). The owning
packages register their layers' rules, so this module imports none of them.

>>> from torch import nn
>>> stored_bytes(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)))  # 15*4 + (4*3*4 + 8)
116
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

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


def own_tensor_bytes(module: nn.Module, seen: set[int] | None = None) -> int:
    """Bytes of ``module``'s own state-dict tensors stored densely (``*_mask`` excluded; ids in ``seen`` skipped)."""
    from slimkit.measure.size import MASK_SUFFIX

    seen = set() if seen is None else seen
    total = 0
    for name, tensor in module.state_dict(keep_vars=True).items():
        if "." in name or name.endswith(MASK_SUFFIX) or id(tensor) in seen:
            continue  # a child's tensor, a mask, or a tensor shared with a module counted already
        seen.add(id(tensor))
        itemsize = 4 if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * itemsize
    return total


def stored_bytes(model: nn.Module) -> int:
    """Bytes of ``model`` as stored: registered layers by their rules, every other tensor densely (shared once)."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        rule = rule_for(module)
        total += rule(module) if rule is not None else own_tensor_bytes(module, seen)
    return total
