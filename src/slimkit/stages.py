"""The pipeline contract: a compression technique is a registered stage.

A stage is a function ``(model, config, ctx) -> StageOutput`` registered with its config
class. It transforms the model (in place or by returning a new one) and says what it did;
the runner (:mod:`slimkit.recipe`) then fine-tunes the result if the recipe asks, with the
hooks the stage returned (masks, shared-weight gradients) and optional distillation, and
measures it. Adding a technique = one module that calls :func:`register_stage`, listed
once in :data:`STAGE_MODULES`.

>>> from slimkit.stages import STAGES
>>> "train" in STAGES
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from slimkit.config import Config
from slimkit.registry import Registry
from slimkit.train import TrainConfig, TrainHooks

#: Modules that register stages; imported the first time the registry is read.
STAGE_MODULES = (
    "slimkit.stages_builtin",
    "slimkit.prune.unstructured_stages",
    "slimkit.prune.structured_stages",
    "slimkit.prune.literature_stages",
    "slimkit.quantize.sharing_stages",
    "slimkit.quantize.hashed_stages",
    "slimkit.deploy.stages",
    "slimkit.encode.stages",
    "slimkit.encode.dct_stages",
    "slimkit.decompose.stages",
    "slimkit.distill.stages",
)


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its function and the config class that validates its settings."""

    name: str
    config_cls: type[Config]
    apply: Callable[[nn.Module, Config, StageContext], StageOutput]
    doc: str = ""
    #: the persistent hooks of a stage whose model is loaded on resume instead of re-applied
    resume_hooks: Callable[[nn.Module], TrainHooks | None] | None = None


STAGES: Registry[StageSpec] = Registry("stage", lazy_modules=STAGE_MODULES)


def register_stage(name: str, config_cls: type[Config],
                   resume_hooks: Callable[[nn.Module], TrainHooks | None] | None = None):
    """Decorator: register ``fn(model, config, ctx) -> StageOutput`` as recipe stage ``name``.

    A stage that returns ``persistent_hooks`` also passes ``resume_hooks(model) -> TrainHooks``:
    when a resumed run loads the stage's saved model instead of applying it, the runner
    rebuilds from the loaded model the hooks that later fine-tunes must keep.
    """

    def add(fn):
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        STAGES.register(name, StageSpec(name, config_cls, fn, doc, resume_hooks))
        return fn

    return add


@dataclass
class StageContext:
    """What a stage may use besides the model and its config."""

    example_inputs: torch.Tensor
    data: Any
    train_config: TrainConfig
    run_dir: Path
    baseline: nn.Module
    stage_index: int = 0
    finetune: Callable[..., nn.Module] = field(repr=False, default=None)
    evaluate: Callable[[nn.Module], float] = field(repr=False, default=None)

    @property
    def stage_dir(self) -> Path:
        """A directory for this stage's files inside the run directory."""
        path = self.run_dir / "stages" / f"{self.stage_index:02d}"
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class StageOutput:
    """What a stage returns.

    ``model``: the transformed model (possibly a new object). ``details``: JSON-friendly
    figures for the report (per-layer tables go here). ``hooks``: used by this stage's
    fine-tune; with ``persistent_hooks`` the runner also keeps them in every later fine-tune
    (centroid sharing stays in force when a later stage distills).
    ``stored_bytes``: real size of the stored artifact when it is not the fp32 state dict
    (e.g. the ``.slim`` container). ``accuracy``: when the deployed model is evaluated by
    another engine (ONNX Runtime int8). ``phase``: ``simulated`` (masks, fake-quant) or
    ``materialized`` (channels removed, weights packed).
    """

    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    hooks: TrainHooks | None = None
    persistent_hooks: bool = False
    stored_bytes: int | None = None
    accuracy: float | None = None
    engine: str | None = None
    latency_ms: float | None = None
    phase: Literal["simulated", "materialized"] = "materialized"
    artifacts: dict[str, str] = field(default_factory=dict)
    #: Run after the stage's fine-tune, on the fine-tuned model; its StageOutput replaces
    #: this one (e.g. export and evaluate the integer model once QAT has trained it).
    finalize: Callable[[nn.Module], StageOutput] | None = field(default=None, repr=False)


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


#: method name -> build(spec, student, teacher, ctx) -> TrainHooks
DISTILL_METHODS: Registry[Callable[..., TrainHooks]] = Registry(
    "distillation method", lazy_modules=("slimkit.distill.methods", "slimkit.distill.fsp", "slimkit.distill.crd")
)


class FinetuneConfig(Config):
    """A stage's fine-tune: any training field overrides the recipe's ``train`` section."""

    epochs: int | None = Field(None, ge=0)
    optimizer: Literal["sgd", "adam", "adamw"] | None = None
    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    schedule: Literal["cosine", "step", "constant"] | None = None
    label_smoothing: float | None = Field(None, ge=0, lt=1)
    batch_size: int | None = Field(None, ge=1)
    distill: DistillSpec | None = None

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """``base`` with this fine-tune's overrides applied."""
        overrides = {k: v for k, v in self.model_dump(exclude={"distill"}).items() if v is not None}
        return base.model_copy(update=overrides)
