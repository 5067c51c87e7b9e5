"""``--dry-run``: check that a recipe fits its model and data before anything trains.

The dry run loads the data, builds the baseline the way the run would (zoo name or other
source, ``weights:``, ``baseline:``), runs it once on one batch (shapes, MACs) and traces
it with ``torch.fx`` (structured pruning needs the graph), then applies every stage in
order to a copy, exactly as the run would, except that every training phase is skipped:
a stage's fine-tune, the rounds between its pruning steps and distillation are built
(hooks, teachers, feature pairs) and their loss is computed on one batch, but no
optimizer step is taken. A stage that does not fit (``structured`` with ``bn_gamma`` on a
model without BatchNorm, a layer glob that matches nothing, a student that does not take
the data) stops the dry run with its one-line error, prefixed with the stage. Accuracies
during a dry run come from the first 256 test images of an untrained model: they mean
nothing and are not reported. Nothing is written to the run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

from slimkit.exceptions import ConfigError, SlimkitError
from slimkit.recipe import Recipe, Stage
from slimkit.train import TrainHooks

Log = Callable[[str], None]


def _baseline(recipe: Recipe, data) -> nn.Module:
    from slimkit.manifest import check_data_fits, load_model
    from slimkit.models import create_model

    if recipe.baseline:
        model = load_model(recipe.baseline)
        check_data_fits(model, data, f"baseline {recipe.baseline}")
        return model
    model = create_model(recipe.model, num_classes=data.num_classes, in_channels=data.in_channels,
                         **recipe.model_args)
    check_data_fits(model, data, f"model {recipe.model}")
    if recipe.weights:
        from slimkit.models.weights import load_weights

        load_weights(model, recipe.weights, recipe.model)
    return model


def _trace_note(model: nn.Module, example_inputs: torch.Tensor) -> str:
    """Whether the tracer of structured pruning (:func:`slimkit.prune.graph.trace.trace`) takes the model."""
    from slimkit.exceptions import UnsupportedModelError
    from slimkit.prune.graph.trace import trace

    try:
        gm = trace(copy.deepcopy(model), example_inputs)
    except UnsupportedModelError as err:
        return f"not traceable, so structured pruning will refuse it ({err})"
    return f"traced: {len(gm.graph.nodes)} graph nodes"


def _one_loss(model: nn.Module, hooks, data) -> None:
    """The training loss of one batch of two, as the fine-tune would compute it; no backward."""
    import torch.nn.functional as F

    inputs, targets = zip(*(data.train[i] for i in range(min(2, len(data.train)))))
    x, y = torch.stack(list(inputs)), torch.as_tensor(targets)
    model.train()
    for extra in hooks.modules:
        extra.train()
    with torch.no_grad():
        out = model(x)
        loss = hooks.loss(out, y, x) if hooks.loss else F.cross_entropy(out, y)
        for penalty in hooks.penalties:
            loss = loss + penalty(model)
    model.eval()
    if not torch.isfinite(loss):
        raise ConfigError(f"the fine-tune loss of one batch is {float(loss)}; check the loss settings")


def dry_run(recipe: Recipe, log: Log = print) -> None:
    """Check every stage of ``recipe`` against its model without training; ConfigError at the first misfit."""
    from slimkit.data import load_data
    from slimkit.measure import profile
    from slimkit.pipeline import RunPaths
    from slimkit.prune.masks import mask_hooks

    data = load_data(recipe.data, data_dir=recipe.data_dir, download=recipe.download, seed=recipe.train.seed,
                     image_size=recipe.image_size, augment=recipe.augment)
    example_inputs = torch.zeros(1, *data.input_shape)
    model = _baseline(recipe, data).eval()
    prof = profile(model, example_inputs, latency=False)
    log(f"[0] baseline: {recipe.model} on {recipe.data}, input {list(example_inputs.shape)}, "
        f"{data.num_classes} classes: {prof.params:,} params, {prof.macs:,} MACs; {_trace_note(model, example_inputs)}")
    baseline = copy.deepcopy(model)
    few = Subset(data.test, range(min(256, len(data.test))))
    kept, phase = mask_hooks(), "materialized"
    with tempfile.TemporaryDirectory(prefix="slimkit-dry-run-") as tmp:
        paths = RunPaths(Path(tmp))
        for index, stage in enumerate(recipe.stages, start=1):
            try:
                model, kept, phase = _check_stage(recipe, stage, index, model, kept, phase, data, example_inputs,
                                                  paths, baseline, few)
                prof = profile(model, example_inputs, latency=False)
            except SlimkitError as err:
                raise ConfigError(f"--dry-run: stages[{index - 1}] ({stage.name}: {stage.kind}) does not fit "
                                  f"{recipe.model}: {err}") from None
            log(f"[{index}] {stage.name}: {stage.kind} fits: {prof.params:,} params, {prof.nonzeros:,} non-zeros, "
                f"{prof.macs:,} MACs" + (", fine-tune built" if stage.finetune else ""))


def _check_stage(recipe: Recipe, stage: Stage, index: int, model: nn.Module, kept: TrainHooks, phase: str, data,
                 example_inputs: torch.Tensor, paths, baseline: nn.Module, few) -> tuple[nn.Module, TrainHooks, str]:
    """Apply one stage as the run would, training nothing; (model, kept hooks, phase) after it."""
    from slimkit.finetune import distill_hooks
    from slimkit.pipeline import stage_context
    from slimkit.stages import STAGES, no_training
    from slimkit.train import evaluate

    ctx = stage_context(recipe, data, example_inputs, paths, baseline, index, stage, progress=False, resume=False,
                        kept=kept, phase=phase)
    ctx = dataclasses.replace(ctx, finetune=no_training, evaluate=lambda m: evaluate(m, few))
    output = STAGES.get(stage.kind).apply(model, stage.config, ctx)
    model = output.model
    if output.persistent_hooks:
        kept = kept.merge(output.hooks)
    if stage.finetune is not None:
        hooks = kept.merge(output.hooks).merge(distill_hooks(stage.finetune, model, ctx))
        _one_loss(model, hooks, data)
    if output.finalize is not None:
        output = output.finalize(model)
        model = output.model
    model.eval()
    return model, kept, output.phase
