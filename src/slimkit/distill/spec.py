"""What a distillation is, as a recipe says it, and the registries of its methods.

- :class:`DistillSpec`: ``distill:`` inside a fine-tune (or the loss part of a ``distill``
  stage): which method, how strong, which teacher;
- :data:`DISTILL_METHODS`: method name -> ``build(spec, student, teacher, ctx) -> TrainHooks``.
  A builder only builds: it probes shapes and makes loss modules, it never trains;
- :data:`DISTILL_PRETRAINING`: method name -> ``pretrain(spec, student, teacher, ctx) -> None``
  for the two-stage methods (FitNets hints, FSP): stage 1, which trains the student in
  place before the hooks of stage 2 are used. :func:`slimkit.distill.methods.prepare_distillation`
  runs both in order; nothing else needs to.

``ctx`` is a :class:`slimkit.stages.StageContext` (or None for methods that need nothing
from it): builders read ``example_inputs`` (to size regressors), ``train_config``
(label smoothing), ``data`` (bank sizes) and ``baseline`` (``teacher: baseline``);
pre-training trains through ``ctx.finetune``.

>>> DistillSpec(method="kd").teacher
'baseline'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field

from slimkit.config import Config
from slimkit.registry import Registry


class DistillSpec(Config):
    """``distill:`` inside a fine-tune: which loss, how strong, and which teacher.

    ``teacher: baseline`` is the model as it was before compression; any other value is a
    path to a model saved by slimkit. ``options`` go to the method (feature pairs, ...).
    """

    method: str = "kd"
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation term")
    temperature: float = Field(4.0, gt=0)
    teacher: str = "baseline"
    options: dict[str, Any] = Field(default_factory=dict)


_METHOD_MODULES = ("slimkit.distill.methods", "slimkit.distill.fsp", "slimkit.distill.crd")

#: method name -> build(spec, student, teacher, ctx) -> TrainHooks (builds, never trains)
DISTILL_METHODS: Registry[Callable[..., Any]] = Registry("distillation method", lazy_modules=_METHOD_MODULES)

#: method name -> pretrain(spec, student, teacher, ctx) -> None: stage 1 of a two-stage method
#: (run when ``options.two_stage`` is true), training the student in place
DISTILL_PRETRAINING: Registry[Callable[..., None]] = Registry("distillation pre-training",
                                                              lazy_modules=_METHOD_MODULES)
