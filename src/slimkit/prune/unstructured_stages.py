"""Recipe stages of unstructured pruning: ``magnitude`` (one-shot, iterative, AGP, DNS).

The schedules that train (``iterative``, ``agp``, ``dns``) run their training inside the
stage with ``ctx.finetune``; the stage then returns the mask hooks (persistent, so later
stages' fine-tunes keep the zeros) for the stage's own ``finetune:`` section.
"""

from __future__ import annotations

from torch import nn

from slimkit.prune.magnitude import MagnitudeConfig, magnitude_prune_
from slimkit.prune.masks import mask_hooks, sparsity_of
from slimkit.stages import StageContext, StageOutput, register_stage


@register_stage("magnitude", MagnitudeConfig)
def magnitude_stage(model: nn.Module, config: MagnitudeConfig, ctx: StageContext) -> StageOutput:
    """Magnitude pruning with masks (Han 2015), scheduled one-shot, iteratively, by AGP or by DNS."""
    from slimkit.prune.schedules import iterative_prune_, scheduled_hooks

    details: dict = {"schedule": config.schedule, "scope": config.scope}
    if config.schedule == "oneshot":
        report = magnitude_prune_(model, ctx.example_inputs, config)
    elif config.schedule == "iterative":
        report = iterative_prune_(model, ctx.example_inputs, config, finetune=ctx.finetune)
    else:
        hooks = scheduled_hooks(model, config)
        model = ctx.finetune(model, hooks=hooks, epochs=config.epochs) or model
        report = magnitude_prune_(model, ctx.example_inputs, config)
    details.update(report.to_dict())
    if not report.rounds:
        details.pop("rounds")
    details["sparsity_measured"] = round(sparsity_of(model)["total"], 6)
    return StageOutput(model=model, details=details, hooks=mask_hooks(), persistent_hooks=True, phase="simulated")
