"""Unstructured masks: a ``weight_mask`` buffer on Conv/Linear modules, kept by training hooks.

A pruned layer keeps its dense ``weight`` parameter (pruned entries exactly zero) and a
``weight_mask`` buffer of the same shape (1 = kept, 0 = pruned), as ``torch.nn.utils.prune``
documents it. The buffer is an ordinary buffer, so :func:`slimkit.manifest.save_model`
stores it and :func:`slimkit.manifest.load_model` restores it.

Masks are not compression (nothing gets smaller or faster by itself): the real bytes come
from :mod:`slimkit.encode`. :func:`mask_hooks` keeps pruned weights exactly zero while
training: gradients of pruned entries are zeroed before the optimizer step, and the weight
is multiplied by its mask after it, which also cancels momentum and weight decay.

>>> import torch
>>> from torch import nn
>>> layer = nn.Linear(4, 2)
>>> set_mask(layer, (layer.weight.abs() > 0.2).float())
>>> bool((layer.weight[layer.weight_mask == 0] == 0).all())
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.reports import Report
from slimkit.train import StepInfo, TrainHooks

MASK = "weight_mask"
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
#: Modules whose weight a schedule (dynamic network surgery) currently manages itself.
_FREE_ATTR = "_slimkit_mask_free"


@dataclass(kw_only=True)
class MaskReport(Report):
    """What a masking verb did (``magnitude_prune_``, ``iterative_prune_``, ``obd_prune_``, ``lobs_prune_``).

    ``layers``: per masked layer ``{"weights", "nonzeros", "sparsity"}`` (entries of its weight,
    entries kept, fraction pruned); ``weights`` / ``nonzeros`` / ``sparsity``: the same over all
    of them. ``rounds``: ``{"round", "sparsity"}`` per step of a schedule that prunes in rounds.
    """

    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    weights: int = 0
    nonzeros: int = 0
    sparsity: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)


def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Store ``mask`` (same shape as ``module.weight``) as ``weight_mask`` and zero pruned weights."""
    mask = mask.to(dtype=module.weight.dtype, device=module.weight.device).detach()
    if mask.shape != module.weight.shape:
        raise ConfigError(f"mask shape {tuple(mask.shape)} differs from weight shape {tuple(module.weight.shape)}")
    if mask_of(module) is not None:
        setattr(module, MASK, mask.clone())  # an existing buffer: nn.Module keeps it a buffer
    else:
        module.register_buffer(MASK, mask.clone())
    with torch.no_grad():
        module.weight.mul_(mask)


def mask_of(module: nn.Module) -> torch.Tensor | None:
    """``module``'s own ``weight_mask`` buffer, or None."""
    mask = getattr(module, MASK, None)
    return mask if isinstance(mask, torch.Tensor) and not isinstance(mask, nn.Parameter) else None


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules (by qualified name) that carry a ``weight_mask`` buffer."""
    return {name: m for name, m in model.named_modules() if mask_of(m) is not None}


def remove_masks(model: nn.Module) -> int:
    """Drop every ``weight_mask`` buffer (weights keep their zeros); returns how many were removed."""
    modules = masked_modules(model)
    for module in modules.values():
        delattr(module, MASK)
    return len(modules)


@torch.no_grad()
def apply_masks(model: nn.Module, *_: object) -> None:
    """Multiply every masked weight by its mask (usable as an ``after_step`` hook)."""
    for module in masked_modules(model).values():
        if not getattr(module, _FREE_ATTR, False):
            module.weight.mul_(mask_of(module))


def zero_masked_grads(model: nn.Module) -> None:
    """Zero the gradients of pruned weights (usable as a ``grad_hooks`` entry)."""
    for module in masked_modules(model).values():
        if module.weight.grad is not None and not getattr(module, _FREE_ATTR, False):
            module.weight.grad.mul_(mask_of(module))


def _after_step(model: nn.Module, info: StepInfo) -> None:
    apply_masks(model)


def mask_hooks() -> TrainHooks:
    """Training hooks that keep every masked weight of the trained model exactly zero.

    The hooks look the masks up on each call, so they follow masks added or changed later.
    """
    return TrainHooks(grad_hooks=(zero_masked_grads,), after_step=(_after_step,))


def sparsity_of(model: nn.Module, types: tuple[type[nn.Module], ...] = PRUNABLE) -> dict[str, float]:
    """Fraction of exactly-zero weights per Conv/Linear layer, plus ``"total"`` over all of them."""
    out: dict[str, float] = {}
    zeros = total = 0
    for name, module in model.named_modules():
        if name and isinstance(module, types):
            z = int((module.weight == 0).sum())
            n = module.weight.numel()
            out[name] = z / n
            zeros, total = zeros + z, total + n
    out["total"] = zeros / max(total, 1)
    return out


class L1Penalty:
    """``strength * sum |w|`` over Conv/Linear weights: a ``TrainHooks.penalties`` entry.

    Sparsity-inducing training (Han 2015 found L1 best before pruning without retraining).
    ``layers``/``ignore`` are globs on qualified names.

    >>> from torch import nn
    >>> penalty = L1Penalty(0.5)
    >>> model = nn.Sequential(nn.Linear(2, 1, bias=False))
    >>> _ = nn.init.constant_(model[0].weight, -2.0)
    >>> float(penalty(model).detach())
    2.0
    """

    def __init__(self, strength: float, layers: Sequence[str] = ("*",), ignore: Sequence[str] = ()) -> None:
        if strength < 0:
            raise ConfigError(f"L1 strength must be >= 0 (got {strength})")
        self.strength, self.layers, self.ignore = float(strength), tuple(layers), tuple(ignore)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        from slimkit.selection import matches

        terms = [
            m.weight.abs().sum()
            for name, m in model.named_modules()
            if name and isinstance(m, PRUNABLE) and matches(name, self.layers) and not matches(name, self.ignore)
        ]
        if not terms:
            return torch.zeros(())
        return self.strength * torch.stack(terms).sum()
