"""Recipe stages ``distill`` and ``takd``: train a new, smaller student from the current model.

Unlike ``distill:`` inside a fine-tune (which keeps the architecture and lets the dense
model teach its own compressed version), these stages *replace* the model: the model the
stage receives is the teacher, and the stage returns a freshly trained student of another
architecture (a zoo name, ``plaincnn-<depth>`` or ``plaincnn-<w1>-<w2>...``).

```yaml
stages:
  - name: student
    distill: {student: plaincnn-4-8, method: kd, temperature: 4, alpha: 0.9, epochs: 10}
  - name: takd
    takd: {student: plaincnn-4-8, num_assistants: 1, epochs: 10}
```
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from slimkit.config import Config
from slimkit.distill.spec import DISTILL_METHODS, DistillSpec
from slimkit.stages import StageContext, StageOutput, register_stage


class _StudentTraining(Config):
    """Fields shared by ``distill`` and ``takd``: the loss and the student's training."""

    method: str = "kd"
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation term")
    temperature: float = Field(4.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    epochs: int | None = Field(None, ge=0, description="student training epochs (default: the recipe's train)")
    lr: float | None = Field(None, gt=0)
    optimizer: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in DISTILL_METHODS:
            raise ValueError(DISTILL_METHODS.unknown_message(value))
        return value

    def spec(self) -> DistillSpec:
        return DistillSpec(method=self.method, alpha=self.alpha, temperature=self.temperature, options=self.options)

    def train_config(self, ctx: StageContext):
        update = {k: v for k, v in {"epochs": self.epochs, "lr": self.lr, "optimizer": self.optimizer}.items()
                  if v is not None}
        return ctx.train_config.model_copy(update=update)


class DistillStageConfig(_StudentTraining):
    """``distill`` stage: ``student`` is a zoo name, or ``auto`` with ``between`` (a plain CNN)."""

    student: str
    between: str | None = Field(None, description="with student: auto, size a plain CNN between teacher and this")

    @model_validator(mode="after")
    def _auto_needs_between(self):
        if (self.student == "auto") != (self.between is not None):
            raise ValueError("student: auto needs between: <plaincnn-...> (and between is only for student: auto)")
        return self


class TakdConfig(_StudentTraining):
    """``takd`` stage: the student, and the assistants (names, teacher side first, or a count to size)."""

    student: str
    assistants: list[str] = Field(default_factory=list)
    num_assistants: int = Field(1, ge=1, le=4)


def _later_hooks(spec: DistillSpec, student: nn.Module, teacher: nn.Module, ctx: StageContext):
    """Hooks for the stage's own ``finetune:``: keep distilling (a two-stage method's second stage, no pre-training)."""
    return DISTILL_METHODS.get(spec.method)(spec, student, teacher, ctx)


def _teacher_row(model: nn.Module, ctx: StageContext) -> dict[str, Any]:
    from slimkit.distill.takd import _macs, count_params
    from slimkit.models import arch_of

    arch = arch_of(model) or {}
    accuracy = ctx.evaluate(model)
    return {"role": "teacher", "name": arch.get("name", type(model).__name__), "accuracy": accuracy,
            "params": count_params(model), "macs": _macs(model, ctx.example_inputs)}


@register_stage("distill", DistillStageConfig)
def distill_stage(model: nn.Module, config: DistillStageConfig, ctx: StageContext) -> StageOutput:
    """Train a new student architecture with the current model as its teacher (KD, hints, AT, RKD)."""
    from slimkit.distill.methods import prepare_distillation
    from slimkit.distill.takd import build_student, count_params, size_assistant

    teacher = model
    teacher.eval()
    data = ctx.data
    name = config.student
    if name == "auto":
        name = size_assistant(teacher, config.between, data.num_classes, data.in_channels)
    cfg = config.train_config(ctx)
    torch.manual_seed(cfg.seed)
    student = build_student(name, data.num_classes, data.in_channels)
    spec = config.spec()
    hooks = prepare_distillation(spec, student, teacher, ctx)
    student = ctx.finetune(student, hooks, config=cfg)  # the student's training, checkpointed with the run
    student.eval()
    details = {
        "teacher": _teacher_row(teacher, ctx),
        "student": name,
        "student_params": count_params(student),
        "method": spec.method,
        "temperature": spec.temperature,
        "alpha": spec.alpha,
        "epochs": cfg.epochs,
    }
    # A new, smaller architecture: what is stored is what runs. A later `finetune:` of this
    # stage keeps distilling from the same teacher.
    return StageOutput(model=student, phase="materialized", details=details,
                       hooks=_later_hooks(spec, student, teacher, ctx))


@register_stage("takd", TakdConfig)
def takd_stage(model: nn.Module, config: TakdConfig, ctx: StageContext) -> StageOutput:
    """Teacher-assistant KD: current model -> assistant(s) -> student; details list every link."""
    from slimkit.distill.takd import size_assistants, takd_chain
    from slimkit.models import arch_of

    teacher = model
    teacher.eval()
    data = ctx.data
    assistants = list(config.assistants) or size_assistants(teacher, config.student, data.num_classes,
                                                            data.in_channels, config.num_assistants)
    cfg = config.train_config(ctx)
    chain = takd_chain(teacher, [*assistants, config.student], data, cfg, config.spec(),
                       teacher_name=(arch_of(teacher) or {}).get("name", type(teacher).__name__),
                       example_inputs=ctx.example_inputs, ctx=ctx)
    student = chain[-1].model
    details = {"chain": [m.row() for m in chain], "method": config.method, "temperature": config.temperature,
               "alpha": config.alpha, "epochs": cfg.epochs}
    hooks = _later_hooks(config.spec(), student, chain[-2].model, ctx)
    return StageOutput(model=student, phase="materialized", details=details, hooks=hooks)
