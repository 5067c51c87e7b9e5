"""Recipe stages of the second-order, reconstruction, DSD/IHT and L0 pruning methods.

- ``obd``: Optimal Brain Damage masks (:mod:`slimkit.prune.second_order`), one-shot or in
  ``rounds`` with ``round_epochs`` of fine-tuning between them;
- ``lobs``: layer-wise Optimal Brain Surgeon masks with the surgeon's weight update;
- ``reconstruct``: ThiNet / LASSO (or any channel criterion) channel selection with the
  least-squares refit of the next layers (:mod:`slimkit.prune.reconstruction`), materialized;
- ``dsd``: dense-sparse-dense training / iterative hard thresholding (:mod:`slimkit.prune.dsd`);
  the model comes back dense;
- ``l0``: hard-concrete L0 gates (:mod:`slimkit.prune.l0`); the stage's ``finetune:`` is the
  regularised training, after which the gates are folded (weights: masks; channels: cut).

Fisher pruning is the channel criterion ``fisher`` of the ``structured`` stage
(:mod:`slimkit.prune.fisher`). Statistics are sampled from the first ``samples`` training
images in a fixed shuffled order (``seed`` 0), so a stage is reproducible.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from slimkit.exceptions import ConfigError
from slimkit.prune.dsd import DSDConfig, dsd_
from slimkit.prune.l0 import L0Config, L0Penalty, add_l0_gates_, fold_l0_
from slimkit.prune.masks import mask_hooks, sparsity_of
from slimkit.prune.reconstruction import ReconstructionConfig, reconstruct_prune_
from slimkit.prune.second_order import LOBSConfig, OBDConfig, lobs_prune_, obd_prune_
from slimkit.stages import StageContext, StageOutput, register_stage
from slimkit.train import TrainHooks


def sample_batches(ctx: StageContext, samples: int, batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``samples`` training (inputs, targets) in a fixed shuffled order, in batches."""
    data = getattr(ctx.data, "train", None)
    if data is None:
        raise ConfigError("this stage samples training data; run it from a recipe with `data:` (or give ctx.data)")
    loader = DataLoader(data, batch_size=min(batch_size, samples), shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    out, seen = [], 0
    for x, y in loader:
        take = min(len(x), samples - seen)
        out.append((x[:take], torch.as_tensor(y[:take])))
        seen += take
        if seen >= samples:
            break
    return out


def _masked_output(model: nn.Module, details: dict) -> StageOutput:
    details["sparsity_measured"] = round(sparsity_of(model)["total"], 6)
    return StageOutput(model=model, details=details, hooks=mask_hooks(), persistent_hooks=True, phase="simulated")


class ReconstructStageConfig(ReconstructionConfig):
    """:class:`ReconstructionConfig` plus how many training images the statistics use."""

    samples: int = 256


@register_stage("obd", OBDConfig)
def obd_stage(model: nn.Module, config: OBDConfig, ctx: StageContext) -> StageOutput:
    """Optimal Brain Damage (LeCun 1990): mask the weights of lowest saliency 0.5 * h_ii * w_i^2."""
    rounds = []
    for r in range(1, config.rounds + 1):
        target = 1 - (1 - config.sparsity) ** (r / config.rounds)
        step = config.model_copy(update={"sparsity": target})
        report = obd_prune_(model, ctx.example_inputs, step, batches=sample_batches(ctx, config.samples))
        rounds.append({"round": r, "sparsity": report.sparsity})
        if r < config.rounds and config.round_epochs > 0:
            model = ctx.finetune(model, hooks=mask_hooks(), epochs=config.round_epochs) or model
    details = {"hessian": config.hessian, "scope": config.scope, **report.to_dict(), "rounds": rounds}
    return _masked_output(model, details)


@register_stage("lobs", LOBSConfig)
def lobs_stage(model: nn.Module, config: LOBSConfig, ctx: StageContext) -> StageOutput:
    """Layer-wise Optimal Brain Surgeon (Dong 2017): prune by w_q^2 / (2 [H^-1]_qq), refit the rest."""
    report = lobs_prune_(model, ctx.example_inputs, config, batches=sample_batches(ctx, config.samples))
    return _masked_output(model, {**report.to_dict(), "rounds": config.rounds})


@register_stage("reconstruct", ReconstructStageConfig)
def reconstruct_stage(model: nn.Module, config: ReconstructStageConfig, ctx: StageContext) -> StageOutput:
    """ThiNet / LASSO channel selection with least-squares reconstruction of the next layers (channels removed)."""
    base = ReconstructionConfig(**config.model_dump(exclude={"samples"}))
    report = reconstruct_prune_(model, ctx.example_inputs, base, batches=sample_batches(ctx, config.samples))
    return StageOutput(model=model, details=report.to_dict(), phase="materialized")


@register_stage("dsd", DSDConfig)
def dsd_stage(model: nn.Module, config: DSDConfig, ctx: StageContext) -> StageOutput:
    """Dense-sparse-dense training (Han 2017) / iterative hard thresholding (Jin 2016); returns a dense model."""
    data = getattr(ctx.data, "train", None)
    if data is None:
        raise ConfigError("dsd trains; run it from a recipe with `data:`")

    def train(m: nn.Module, cfg, hooks: TrainHooks | None) -> nn.Module:
        return ctx.finetune(m, hooks, config=cfg)

    report = dsd_(model, ctx.example_inputs, config, train=train, train_config=ctx.train_config)
    return StageOutput(model=model, details=report.to_dict(), phase="materialized")


@register_stage("l0", L0Config)
def l0_stage(model: nn.Module, config: L0Config, ctx: StageContext) -> StageOutput:
    """L0 regularisation with hard-concrete gates (Louizos 2018) on weights or channels; train in `finetune:`."""
    added = add_l0_gates_(model, ctx.example_inputs, config)
    details = {"target": config.target, "lam": config.lam, "gated": added.gated, "skipped": added.skipped}

    def finalize(trained: nn.Module) -> StageOutput:
        folded = fold_l0_(trained, ctx.example_inputs).to_dict()
        folded.pop("skipped")
        if config.target == "weights":  # no channel is cut
            for key in ("channels_removed", "cuts", "max_abs_change"):
                folded.pop(key)
        out = {**details, **folded}
        if config.target == "weights":
            return _masked_output(trained, out)
        return StageOutput(model=trained, details=out, phase="materialized")

    return StageOutput(model=model, details=details, hooks=TrainHooks(penalties=(L0Penalty(config.lam),)),
                       finalize=finalize, phase="simulated")
