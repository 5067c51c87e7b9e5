"""Pruning schedules: iterative (Han 2015), gradual AGP (Zhu & Gupta 2017), DNS (Guo 2016).

- :func:`iterative_prune_`: ``rounds`` of prune -> fine-tune; round ``r`` (1-based) keeps
  ``(1 - s) ** (r / rounds)`` of the weights, so the kept fraction shrinks geometrically
  and the last round reaches the target ``s`` exactly.
- :class:`AGPHook`: an ``after_step`` hook; at training progress ``p`` (fraction of
  ``agp_end`` x total steps) the sparsity is ``s * (1 - (1 - p) ** 3)``, updated every
  ``frequency`` steps and exactly ``s`` from ``agp_end`` on.
- :class:`DNSHook`: an ``after_step`` hook keeping a dense shadow copy of each pruned
  weight. The optimizer updates the masked weight; the hook adds that update to the
  shadow (pruned weights keep learning), then every ``frequency`` steps re-evaluates the
  mask with hysteresis: shadow magnitudes below ``(1 - margin) * t`` are pruned, above
  ``(1 + margin) * t`` spliced back, where ``t`` is the magnitude at the target sparsity.
  On the last step the mask is set to the exact target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.prune.common import size_of, trained_in_place
from slimkit.prune.magnitude import MagnitudeConfig, apply_computed_masks, compute_masks, layer_targets, mask_report
from slimkit.prune.masks import _FREE_ATTR, PRUNABLE, MaskReport, mask_hooks, set_mask
from slimkit.selection import select_modules
from slimkit.train import StepInfo, TrainHooks


def agp_fraction(progress: float) -> float:
    """Fraction of the final sparsity at ``progress`` in [0, 1] (cubic, Zhu & Gupta 2017).

    >>> agp_fraction(0.0), agp_fraction(0.5), agp_fraction(1.0)
    (0.0, 0.875, 1.0)
    """
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - progress) ** 3


class AGPHook:
    """``after_step`` hook that raises sparsity along the cubic AGP curve; masks kept in between."""

    def __init__(self, config: MagnitudeConfig) -> None:
        self.config = config
        self.last_scale = -1.0

    def __call__(self, model: nn.Module, info: StepInfo) -> None:
        end = max(1, round(self.config.agp_end * info.total_steps))
        if info.step % self.config.frequency and info.step < end and info.step != info.total_steps:
            return
        scale = agp_fraction(info.step / end)
        if scale != self.last_scale:
            apply_computed_masks(model, compute_masks(model, self.config, scale))
            self.last_scale = scale


class DNSHook:
    """``after_step`` hook of dynamic network surgery (prune + splice), see the module docstring.

    While training, the surgery masks live in the hook (not as ``weight_mask`` buffers, so
    that generic mask keepers do not freeze the pruned weights); the final masks are set as
    ``weight_mask`` buffers on the last step.
    """

    def __init__(self, model: nn.Module, config: MagnitudeConfig) -> None:
        self.config = config
        modules = dict(model.named_modules())
        self.targets = layer_targets(model, config)
        self.names = list(self.targets)
        # Shadow weights: the dense values; last: the masked weights we last wrote.
        self.dense = {n: modules[n].weight.detach().clone() for n in self.names}
        self.masks = compute_masks(model, config, 1.0)
        with torch.no_grad():
            for n in self.names:
                modules[n].weight.mul_(self.masks[n])
                setattr(modules[n], _FREE_ATTR, True)
        self.last = {n: modules[n].weight.detach().clone() for n in self.names}

    @torch.no_grad()
    def __call__(self, model: nn.Module, info: StepInfo) -> None:
        modules = dict(model.named_modules())
        for n in self.names:
            self.dense[n] += modules[n].weight - self.last[n]  # the optimizer's update, applied to the shadow
        final = info.step == info.total_steps
        if final:
            self.masks = compute_masks(model, self.config, 1.0, scores={n: self.dense[n].abs() for n in self.names})
        elif info.step % self.config.frequency == 0:
            self.masks = {n: self._surgery(n, self.masks[n]) for n in self.names}
        for n in self.names:
            module = modules[n]
            module.weight.copy_(self.dense[n] * self.masks[n])
            self.last[n] = module.weight.detach().clone()
            if final:
                set_mask(module, self.masks[n])
                setattr(module, _FREE_ATTR, False)

    def _surgery(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        score = self.dense[name].abs()
        if self.config.scope == "global":
            flat = torch.cat([self.dense[n].abs().flatten() for n in self.names])
            target = self.config.sparsity
        else:
            flat, target = score.flatten(), self.targets[name]
        k = round(target * flat.numel())
        if k == 0:
            return torch.ones_like(mask)
        t = flat.kthvalue(k).values
        low, high = (1 - self.config.dns_margin) * t, (1 + self.config.dns_margin) * t
        mask = mask.clone()
        mask[score < low] = 0
        mask[score > high] = 1
        return mask


def iterative_prune_(model: nn.Module, example_inputs: Any, config: MagnitudeConfig | dict[str, Any], *,
                     finetune: Callable[..., Any]) -> MaskReport:
    """``config.rounds`` rounds of prune -> fine-tune (no fine-tune after the last round), in place.

    ``example_inputs``: one batch (a tensor or a tuple of tensors) the sizes are measured on.
    ``finetune(model, hooks=..., epochs=config.round_epochs)`` trains ``model`` in place with
    the mask hooks. After the last round the masks are set at the configured targets exactly
    (the geometric schedule reaches them up to float rounding). The report's ``rounds`` gives
    the sparsity of every round; its table is the final one.
    """
    config = MagnitudeConfig.coerce(config, where="magnitude")
    before = size_of(model, example_inputs)
    rounds = []
    targets = layer_targets(model, config)
    epochs = config.round_epochs
    for r in range(1, config.rounds + 1):
        kept = {n: (1 - s) ** (r / config.rounds) for n, s in targets.items()}
        if config.scope == "global":
            scale = (1 - (1 - config.sparsity) ** (r / config.rounds)) / config.sparsity if config.sparsity else 1.0
        else:
            scale = None
        if scale is not None:
            masks = compute_masks(model, config, scale)
        else:
            round_cfg = config.model_copy(update={"per_layer": {n: 1 - k for n, k in kept.items()},
                                                  "layers": tuple(kept), "sparsity": None})
            masks = compute_masks(model, round_cfg)
        table = apply_computed_masks(model, masks)
        rounds.append({"round": r, "sparsity": table["sparsity"]})
        if r < config.rounds and (epochs is None or epochs > 0):
            trained_in_place(model, finetune(model, hooks=mask_hooks(), epochs=epochs), "iterative_prune_ finetune")
    table = apply_computed_masks(model, compute_masks(model, config))  # idempotent at the final target
    selected = select_modules(model, PRUNABLE, config.layers, config.ignore, what="magnitude.layers")
    skipped = {n: "no target matches" for n in selected if n not in table["layers"]}
    return mask_report("iterative_prune_", model, example_inputs, before, table, skipped, rounds)


def scheduled_hooks(model: nn.Module, config: MagnitudeConfig) -> TrainHooks:
    """Training hooks that run the ``agp`` or ``dns`` schedule of ``config`` during a fit."""
    if config.schedule == "agp":
        return mask_hooks().merge(TrainHooks(after_step=(AGPHook(config),)))
    if config.schedule == "dns":
        return mask_hooks().merge(TrainHooks(after_step=(DNSHook(model, config),)))
    raise ValueError(f"schedule {config.schedule!r} has no training hooks; use 'agp' or 'dns'")
