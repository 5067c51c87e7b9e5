"""Stages that need no technique: ``train`` leaves the model as it is for its fine-tune to train."""

from __future__ import annotations

from torch import nn

from slimkit.config import Config
from slimkit.stages import StageContext, StageOutput, register_stage


class NoSettings(Config):
    """A stage without settings."""


@register_stage("train", NoSettings)
def finetune_stage(model: nn.Module, config: NoSettings, ctx: StageContext) -> StageOutput:
    """Leave the model unchanged; the stage's ``finetune:`` section trains it (the phase stays the model's)."""
    return StageOutput(model=model, phase=ctx.phase, details={})
