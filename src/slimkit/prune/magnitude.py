"""Magnitude pruning of Conv/Linear weights (Han, Pool, Tran & Dally 2015), layer-wise or global.

Targets are sparsities (fraction of weights set to zero, in [0, 1)):

- ``sparsity``: one target for every selected layer (``scope: local``), or for all of
  them together with one global magnitude threshold (``scope: global``);
- ``per_layer``: ``{glob: sparsity}`` (first matching glob wins, in the order written),
  e.g. ``{"conv*": 0.34, "fc*": 0.92}``; layers no glob matches take ``sparsity`` or stay
  dense.

Exactly ``round(sparsity * numel)`` weights are pruned per layer (ties broken by index),
so a schedule reaches its target exactly. Pruned weights are the smallest by absolute
value; weights that are already zero count as pruned first.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
>>> report = magnitude_prune_(model, torch.zeros(1, 10), {"sparsity": 0.8})
>>> report.layers["0"]["sparsity"], report.layers["2"]["sparsity"], report.after.nonzeros < report.before.nonzeros
(0.8, 0.8, True)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from slimkit.config import Config
from slimkit.exceptions import ConfigError
from slimkit.prune.common import Scope, size_of
from slimkit.prune.masks import PRUNABLE, MaskReport, set_mask
from slimkit.reports import ModelSize
from slimkit.selection import matches, select_modules


class MagnitudeConfig(Config):
    """Settings of the ``magnitude`` stage and of :func:`magnitude_prune_`.

    ``schedule``: ``oneshot`` (prune once), ``iterative`` (``rounds`` of prune -> fine-tune
    ``round_epochs``, targets growing geometrically in kept weights, Han 2015), ``agp``
    (gradual cubic schedule of Zhu & Gupta 2017 during ``epochs`` of training) or ``dns``
    (dynamic network surgery, Guo 2016: prune and splice during ``epochs`` of training with
    thresholds ``(1 - dns_margin)`` and ``(1 + dns_margin)`` times the target's magnitude).
    """

    sparsity: float | None = Field(None, ge=0, lt=1, description="target for every selected layer / all of them")
    per_layer: dict[str, float] = Field(default_factory=dict, description="glob -> sparsity, first match wins")
    scope: Scope = "local"
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    schedule: Literal["oneshot", "iterative", "agp", "dns"] = "oneshot"
    rounds: int = Field(3, ge=1, description="iterative: prune -> fine-tune rounds")
    round_epochs: int | None = Field(None, ge=0, description="iterative: fine-tune epochs per round (not the last)")
    epochs: int | None = Field(None, ge=1, description="agp/dns: training epochs of the schedule")
    agp_end: float = Field(0.75, gt=0, le=1, description="agp: fraction of the steps at which the target is reached")
    frequency: int = Field(10, ge=1, description="agp/dns: optimizer steps between mask updates")
    dns_margin: float = Field(0.1, ge=0, lt=1, description="dns: half-width of the prune/splice band")

    @field_validator("per_layer")
    @classmethod
    def _check_targets(cls, value: dict[str, float]) -> dict[str, float]:
        for glob, target in value.items():
            if not 0 <= float(target) < 1:
                raise ValueError(f"per_layer[{glob!r}] must be a sparsity in [0, 1), got {target}")
        return value

    @model_validator(mode="after")
    def _need_target(self) -> MagnitudeConfig:
        if self.sparsity is None and not self.per_layer:
            raise ValueError("give `sparsity` (e.g. 0.9) or `per_layer` (e.g. {'conv*': 0.6, 'fc*': 0.92})")
        if self.scope == "global" and self.sparsity is None:
            raise ValueError("scope 'global' needs `sparsity` (one target for all selected layers)")
        return self


def layer_targets(model: nn.Module, config: MagnitudeConfig) -> dict[str, float]:
    """Final sparsity per selected layer name (``scope: local``; global uses ``sparsity`` overall)."""
    modules = select_modules(model, PRUNABLE, config.layers, config.ignore, what="magnitude.layers")
    targets: dict[str, float] = {}
    for name in modules:
        target = next((float(s) for glob, s in config.per_layer.items() if matches(name, (glob,))), None)
        if target is None:
            target = config.sparsity
        if target is not None:
            targets[name] = target
    if not targets:
        raise ConfigError(
            f"magnitude.per_layer: no glob of {list(config.per_layer)} matches a selected layer "
            f"({list(modules)[:6]}...) and no `sparsity` is given; fix the globs"
        )
    return targets


def _topk_mask(scores: torch.Tensor, prune: int) -> torch.Tensor:
    """1 for the ``numel - prune`` largest scores (ties: lower index kept), 0 elsewhere."""
    flat = scores.flatten()
    mask = torch.ones_like(flat)
    if prune > 0:
        order = torch.argsort(flat, stable=True)  # ascending; equal scores in index order
        mask[order[:prune]] = 0
    return mask.view_as(scores)


def compute_masks(
    model: nn.Module, config: MagnitudeConfig, scale: float = 1.0, scores: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Masks for ``scale`` times the configured targets (0 = dense, 1 = final targets).

    ``scores`` (name -> tensor shaped like the weight) replaces ``|weight|`` (dynamic
    network surgery scores the dense shadow weights).
    """
    modules = dict(model.named_modules())
    targets = layer_targets(model, config)
    score = {n: (scores[n] if scores and n in scores else modules[n].weight.detach().abs()) for n in targets}
    if config.scope == "global":
        flat = torch.cat([score[n].flatten() for n in targets])
        prune = round(config.sparsity * scale * flat.numel())
        keep = _topk_mask(flat, prune)
        masks, offset = {}, 0
        for n in targets:
            size = score[n].numel()
            masks[n] = keep[offset : offset + size].view_as(score[n])
            offset += size
        return masks
    return {n: _topk_mask(score[n], round(targets[n] * scale * score[n].numel())) for n in targets}


def apply_computed_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Set the masks on their modules; per-layer report of weights, non-zeros and sparsity."""
    modules = dict(model.named_modules())
    layers = {}
    for name, mask in masks.items():
        set_mask(modules[name], mask)
        kept = int(mask.sum())
        layers[name] = {"weights": mask.numel(), "nonzeros": kept, "sparsity": round(1 - kept / mask.numel(), 6)}
    total = sum(v["weights"] for v in layers.values())
    kept = sum(v["nonzeros"] for v in layers.values())
    return {"layers": layers, "weights": total, "nonzeros": kept, "sparsity": round(1 - kept / max(total, 1), 6)}


def mask_report(verb: str, model: nn.Module, example_inputs: Any, before: ModelSize, table: dict[str, Any],
                skipped: dict[str, str] | None = None, rounds: list[dict[str, Any]] | None = None) -> MaskReport:
    """The :class:`MaskReport` of a masking verb from :func:`apply_computed_masks`' ``table``, measured after."""
    return MaskReport(verb=verb, changed=list(table["layers"]), skipped=dict(skipped or {}), before=before,
                      after=size_of(model, example_inputs), layers=table["layers"], weights=table["weights"],
                      nonzeros=table["nonzeros"], sparsity=table["sparsity"], rounds=list(rounds or []))


def magnitude_prune_(model: nn.Module, example_inputs: Any, config: MagnitudeConfig | dict[str, Any]) -> MaskReport:
    """Prune ``model`` in place to its targets in one shot; returns a :class:`~slimkit.prune.masks.MaskReport`.

    ``example_inputs``: one batch (a tensor or a tuple of tensors) the sizes are measured on.
    Adds/updates ``weight_mask`` buffers and zeroes pruned weights. Layers selected but
    without a target are reported under ``skipped``. The schedule in ``config`` is not
    run here (see :mod:`slimkit.prune.schedules`).
    """
    config = MagnitudeConfig.coerce(config, where="magnitude")
    before = size_of(model, example_inputs)
    masks = compute_masks(model, config)
    table = apply_computed_masks(model, masks)
    selected = select_modules(model, PRUNABLE, config.layers, config.ignore, what="magnitude.layers")
    skipped = {n: "no target matches" for n in selected if n not in masks}
    return mask_report("magnitude_prune_", model, example_inputs, before, table, skipped)
