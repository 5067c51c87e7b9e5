"""The pipeline contract: a compression technique is a registered stage.

A stage is a function ``(model, config, ctx) -> StageOutput`` registered with its config
class. It transforms the model (in place or by returning a new one) and says what it did;
the runner (:mod:`slimkit.pipeline`) then fine-tunes the result if the recipe asks, with the
hooks the stage returned (masks, shared-weight gradients) and optional distillation, and
measures it. Every output states its ``phase``; the context always has ``finetune`` and
``evaluate``. Adding a technique = one module that calls :func:`register_stage`, listed
once in :data:`STAGE_MODULES`.

>>> from slimkit.stages import STAGES
>>> "train" in STAGES
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from slimkit.config import Config
from slimkit.exceptions import ConfigError
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


#: Simulated: masks, fake quantization, codebooks held by hooks (the stored size is a claim
#: the ``encode`` stage makes real); materialized: what is stored is what runs (channels
#: removed, low-rank layers, packed weights, a new architecture, a dense model).
Phase = Literal["simulated", "materialized"]


class Finetune(Protocol):
    """``ctx.finetune``: train ``model`` inside a stage (e.g. between pruning rounds); returns it.

    The runner's masks and the hooks earlier stages kept stay in force, ``hooks`` are added
    (each hook runs once, :meth:`TrainHooks.merge`). The stage's training config is used,
    or ``config`` instead (a stage with its own rates: DSD's sparse and dense phases), with
    ``epochs`` overriding either.
    """

    def __call__(self, model: nn.Module, hooks: TrainHooks | None = None, epochs: int | None = None, *,
                 config: TrainConfig | None = None) -> nn.Module: ...


#: ``ctx.evaluate(model)``: top-1 accuracy in percent on the test split; None only from
#: :func:`no_evaluation` (a context without test data).
Evaluate = Callable[[nn.Module], float | None]


def no_training(model: nn.Module, hooks: TrainHooks | None = None, epochs: int | None = None, *,
                config: TrainConfig | None = None) -> nn.Module:
    """A :class:`Finetune` that trains nothing, for contexts that must not train (dry run, structural search)."""
    return model


def no_evaluation(model: nn.Module) -> None:
    """An :data:`Evaluate` for a context without test data: every accuracy it gives is None (not reported)."""
    return None


@dataclass(kw_only=True)
class StageContext:
    """What a stage may use besides the model and its config.

    ``finetune`` and ``evaluate`` are always there: the runner trains and evaluates for
    real; a context that must not (the dry run, a unit test without data) says so with
    :func:`no_training` / :func:`no_evaluation`. ``phase`` is the phase of the model the
    stage receives (a dense baseline is ``materialized``): a stage that leaves the model
    as it is (``train``) reports it. ``run_dir`` is None outside a run (a TAKD chain
    called from Python); :attr:`stage_dir` then refuses.
    """

    example_inputs: torch.Tensor
    data: Any
    train_config: TrainConfig
    run_dir: Path | None
    baseline: nn.Module | None
    finetune: Finetune = field(repr=False)
    evaluate: Evaluate = field(repr=False)
    stage_index: int = 0
    phase: Phase = "materialized"

    @property
    def stage_dir(self) -> Path:
        """A directory for this stage's files inside the run directory."""
        if self.run_dir is None:
            raise ConfigError(f"stage {self.stage_index} writes files but its context has no run_dir; "
                              "give StageContext(run_dir=...) a directory")
        path = self.run_dir / "stages" / f"{self.stage_index:02d}"
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(kw_only=True)
class StageOutput:
    """What a stage returns.

    ``model``: the transformed model (possibly a new object). ``phase`` (required): whether
    the model is now ``simulated`` (masks, fake-quant) or ``materialized`` (channels removed,
    weights packed); a stage that leaves the model as it is returns ``ctx.phase``.
    ``details``: JSON-friendly figures for the report (per-layer tables go here). ``hooks``:
    used by this stage's fine-tune; with ``persistent_hooks`` the runner also keeps them in
    every later fine-tune (centroid sharing stays in force when a later stage distills).
    The runner owns the kept set and merges each hook once (:meth:`TrainHooks.merge`), so a
    stage may return hooks the runner already keeps (the masks) without doubling them.
    ``stored_bytes``: real size of the stored artifact when it is not the fp32 state dict
    (e.g. the ``.slim`` container). ``accuracy``: when the deployed model is evaluated by
    another engine (ONNX Runtime int8).
    """

    model: nn.Module
    phase: Phase
    details: dict[str, Any] = field(default_factory=dict)
    hooks: TrainHooks | None = None
    persistent_hooks: bool = False
    stored_bytes: int | None = None
    accuracy: float | None = None
    engine: str | None = None
    latency_ms: float | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    #: Run after the stage's fine-tune, on the fine-tuned model; its StageOutput replaces
    #: this one (e.g. export and evaluate the integer model once QAT has trained it).
    finalize: Callable[[nn.Module], StageOutput] | None = field(default=None, repr=False)
