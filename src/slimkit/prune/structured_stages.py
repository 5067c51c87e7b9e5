"""Recipe stages of structured pruning: ``structured`` and ``sparse-train``.

``structured`` prunes channels physically (:func:`slimkit.prune.structured_`); with
``rounds > 1`` it prunes iteratively (a fraction, fine-tune ``round_epochs``, repeat).
``sparse-train`` leaves the model as it is and returns the sparsity penalty (L1 on BN
gamma or group lasso) as hooks: the stage's ``finetune:`` section *is* the sparse training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from slimkit.config import Config
from slimkit.prune.criteria import DATA_CRITERIA
from slimkit.prune.sparse_training import sparse_hooks
from slimkit.prune.structured import StructuredConfig, structured_
from slimkit.stages import StageContext, StageOutput, register_stage


class StructuredStageConfig(StructuredConfig):
    """:class:`StructuredConfig` plus an iterative schedule."""

    rounds: int = Field(1, ge=1, description="prune in this many steps, fine-tuning between them")
    round_epochs: int = Field(1, ge=0, description="fine-tune epochs between rounds")


class SparseTrainConfig(Config):
    """Penalty added to the loss during the stage's fine-tune."""

    penalty: Literal["bn_l1", "group_lasso"] = "bn_l1"
    lam: float = Field(1e-5, ge=0, description="penalty weight (Liu & Lei 2022 use 1e-5 for bn_l1)")
    layers: tuple[str, ...] = ("*",)


def _batches(ctx: StageContext, count: int = 4):
    data = getattr(ctx.data, "train", None)
    if data is None:
        return None
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    out = []
    for i, batch in enumerate(loader):
        if i >= count:
            break
        out.append((batch[0], batch[1]))
    return out


@register_stage("structured", StructuredStageConfig)
def structured_stage(model: nn.Module, config: StructuredStageConfig, ctx: StageContext) -> StageOutput:
    """Structured channel pruning that removes channels (one-shot or iterative)."""
    base = StructuredConfig(**config.model_dump(exclude={"rounds", "round_epochs"}))
    batches = _batches(ctx) if config.criterion in DATA_CRITERIA else None
    rounds = []
    report = None
    for r in range(config.rounds):
        # cumulative keep fraction (1 - ratio) reached geometrically over the rounds
        step = 1 - (1 - config.ratio) ** (1 / config.rounds)
        report = structured_(model, ctx.example_inputs, base.model_copy(update={"ratio": step}), batches=batches)
        rounds.append({"round": r + 1, "params": report.params_after, "macs": report.macs_after})
        if r + 1 < config.rounds and config.round_epochs > 0:
            model = ctx.finetune(model, epochs=config.round_epochs) or model
    details = report.to_dict()
    details.pop("layers")
    details["rounds"] = rounds
    return StageOutput(model=model, details=details, phase="materialized")


def _check_penalized(model: nn.Module, config: SparseTrainConfig) -> None:
    """ConfigError when the penalty would find no layer: it would add zero, and the stage would do nothing."""
    from slimkit.exceptions import ConfigError
    from slimkit.selection import matches

    if config.penalty == "bn_l1":
        found = [n for n, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and matches(n, config.layers)]
        what, fix = "affine BatchNorm layer", "use penalty: group_lasso or a model with BatchNorm"
    else:
        found = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups == 1 and matches(n, config.layers)]
        what, fix = "ungrouped Conv2d layer", "check layers"
    if not found:
        raise ConfigError(f"sparse-train: penalty {config.penalty} finds no {what} among layers={list(config.layers)} "
                          f"of {type(model).__name__}, so it would add nothing; {fix}")


@register_stage("sparse-train", SparseTrainConfig)
def sparse_train_stage(model: nn.Module, config: SparseTrainConfig, ctx: StageContext) -> StageOutput:
    """Sparse training: the stage's fine-tune runs with an L1-on-gamma or group-lasso penalty."""
    hooks = sparse_hooks(config.penalty, config.lam, config.layers)
    gammas = [m.weight.detach().abs() for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    _check_penalized(model, config)
    details = {"penalty": config.penalty, "lam": config.lam}
    if gammas:
        import torch

        g = torch.cat(gammas)
        details["gamma_below_1e-2_before"] = float((g < 1e-2).float().mean())
    return StageOutput(model=model, details=details, hooks=hooks, phase=ctx.phase)  # the model is unchanged
