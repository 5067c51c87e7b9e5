"""A stage's fine-tune: its settings (``finetune:`` in a recipe) and the training it runs.

- :class:`FinetuneConfig`: any training field overrides the recipe's ``train`` section, and
  ``distill:`` (a :class:`slimkit.distill.spec.DistillSpec`) lets a teacher guide it;
- :func:`trainer`: the :class:`slimkit.stages.Finetune` a context hands to its stage,
  training on a dataset with the hooks the runner keeps (masks, sharing) always in force;
- :func:`distill_hooks`: the distillation hooks of a fine-tune (a two-stage method
  pre-trains the student first);
- :func:`training_context`: a real :class:`slimkit.stages.StageContext` outside a recipe
  run (a TAKD chain, a study), training on ``data.train`` and evaluating on ``data.test``.

>>> from slimkit.train import TrainConfig
>>> FinetuneConfig(epochs=2, lr=0.01).train_config(TrainConfig(epochs=10)).lr
0.01
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from slimkit.config import Config
from slimkit.distill.spec import DistillSpec
from slimkit.exceptions import ConfigError
from slimkit.stages import Finetune, StageContext
from slimkit.train import TrainConfig, TrainHooks, evaluate, fit


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


def trainer(train_data: Any, base: TrainConfig, kept: TrainHooks | None = None, *,
            checkpoint_stem: Path | None = None, resume: bool = False, progress: bool = False,
            desc: str = "fine-tune", device: torch.device | None = None) -> Finetune:
    """A :class:`~slimkit.stages.Finetune` over ``train_data``: ``fit`` with ``base`` (or the call's config).

    ``kept`` hooks (the runner's masks and persistent hooks) are merged into every call,
    each hook once. Call ``n`` checkpoints to ``<checkpoint_stem>-round-NN.pt`` (none without
    a stem) and resumes from it with ``resume``. The model comes back on the CPU.
    """
    kept = kept or TrainHooks()
    calls = 0

    def finetune(model: nn.Module, hooks: TrainHooks | None = None, epochs: int | None = None, *,
                 config: TrainConfig | None = None) -> nn.Module:
        nonlocal calls
        calls += 1
        cfg = config if config is not None else base
        if epochs is not None:
            cfg = cfg.model_copy(update={"epochs": epochs})
        checkpoint = None
        if checkpoint_stem is not None:
            checkpoint = checkpoint_stem.with_name(f"{checkpoint_stem.name}-round-{calls:02d}.pt")
        fit(model, train_data, cfg, kept.merge(hooks), checkpoint=checkpoint, resume=resume, progress=progress,
            desc=f"{desc} round {calls}", device=device)
        return model.cpu()

    return finetune


def distill_hooks(finetune: FinetuneConfig | None, student: nn.Module, ctx: StageContext) -> TrainHooks | None:
    """The hooks of ``finetune.distill`` for training ``student`` (None without ``distill:``).

    ``teacher: baseline`` is ``ctx.baseline``, any other teacher a saved model file. A
    two-stage method (``hint``/``fsp`` with ``two_stage``) pre-trains ``student`` through
    ``ctx.finetune`` here, before returning the hooks of its second stage.
    """
    spec = finetune.distill if finetune is not None else None
    if spec is None:
        return None
    from slimkit.distill.methods import prepare_distillation

    return prepare_distillation(spec, student, None, ctx)


def training_context(data: Any, train_config: TrainConfig | dict, *, example_inputs: torch.Tensor | None = None,
                     baseline: nn.Module | None = None, run_dir: Path | None = None,
                     checkpoint_stem: Path | None = None, kept: TrainHooks | None = None, progress: bool = False,
                     desc: str = "fine-tune", device: torch.device | None = None) -> StageContext:
    """A stage context outside a recipe run: trains on ``data.train``, evaluates on ``data.test``.

    ``data`` is a bundle with ``train``/``test`` datasets (and ``input_shape`` when no
    ``example_inputs`` are given: zeros of one sample). Training calls checkpoint under
    ``checkpoint_stem`` (see :func:`trainer`); without ``run_dir`` a stage that writes files
    refuses.
    """
    train_config = TrainConfig.coerce(train_config, where="train")
    if example_inputs is None:
        shape = getattr(data, "input_shape", None)
        if shape is None:
            raise ConfigError("training_context: pass example_inputs (the data bundle has no input_shape)")
        example_inputs = torch.zeros(1, *shape)
    finetune = trainer(data.train, train_config, kept, checkpoint_stem=checkpoint_stem, progress=progress,
                       desc=desc, device=device)
    return StageContext(
        example_inputs=example_inputs, data=data, train_config=train_config, run_dir=run_dir, baseline=baseline,
        finetune=finetune, evaluate=lambda m: evaluate(m, data.test),
    )
