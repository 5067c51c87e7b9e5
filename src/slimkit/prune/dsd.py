"""Dense-sparse-dense training (Han et al. 2017, "DSD: Dense-Sparse-Dense Training for Deep Neural
Networks") and iterative hard thresholding (Jin et al. 2016, "Training Skinny Deep Neural Networks
with Iterative Hard Thresholding Methods").

One cycle, on a trained (dense) model:

1. **sparse**: magnitude-prune to ``sparsity`` (the mask ``m = 1[|w| >= t]``, ``t`` the
   magnitude at the target), then train ``sparse_epochs`` with the mask held
   (``w <- m * w`` after every step);
2. **release**: drop the mask; the pruned weights restart from zero;
3. **re-dense**: train all weights ``dense_epochs`` at ``dense_lr`` (DSD: a tenth of the
   training rate by default).

DSD is one cycle; IHT repeats it (``cycles > 1``: hard-threshold, train sparse, release,
train dense, ...). The result is a *dense* model (no mask): DSD is a regulariser, not a
compression method, and the report says so (``phase: materialized``, no ``weight_mask``).
The ``dsd`` stage trains through ``ctx.finetune`` (with each phase's config), so hooks
kept from earlier stages (weight sharing) stay in force inside the cycles; the released
masks are gone, so the runner's mask hooks do nothing in the dense phase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field
from torch import nn

from slimkit.config import Config
from slimkit.prune.common import Scope, size_of, trained_in_place
from slimkit.prune.magnitude import magnitude_prune_
from slimkit.prune.masks import PRUNABLE, mask_hooks, mask_of, masked_modules, remove_masks, sparsity_of
from slimkit.reports import Report
from slimkit.train import TrainConfig, fit

#: ``train(model, config, hooks)`` trains ``model`` in place for ``config.epochs`` (returns it or None)
Train = Callable[..., Any]


class DSDConfig(Config):
    """Settings of the ``dsd`` stage and of :func:`dsd_`."""

    sparsity: float = Field(0.5, gt=0, lt=1, description="sparse phase target (DSD uses 0.3-0.5)")
    scope: Scope = "local"
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    cycles: int = Field(1, ge=1, description="1: DSD; more: iterative hard thresholding")
    sparse_epochs: int = Field(1, ge=0)
    dense_epochs: int = Field(1, ge=0)
    sparse_lr: float | None = Field(None, gt=0, description="default: the stage's training lr")
    dense_lr: float | None = Field(None, gt=0, description="default: a tenth of the stage's training lr")


@dataclass(kw_only=True)
class DSDReport(Report):
    """What :func:`dsd_` did: one row per cycle, and whether the model came back dense (no mask).

    A row: ``cycle``, ``sparse_sparsity`` (reached by the sparse phase), ``released`` (fraction
    of the pruned weights non-zero after the re-dense phase), ``sparsity_after_dense``.
    """

    cycles: list[dict[str, Any]] = field(default_factory=list)
    dense: bool = True


def dsd_(model: nn.Module, example_inputs: Any, config: DSDConfig | dict[str, Any], *, train: Train,
         train_config: TrainConfig) -> DSDReport:
    """Run the DSD / IHT cycles on ``model`` in place; returns a :class:`DSDReport`.

    ``example_inputs``: one batch (a tensor or a tuple of tensors) the sizes are measured on.
    ``train(model, cfg, hooks)`` trains ``model`` in place with a :class:`~slimkit.train.TrainConfig`
    and hooks; ``train_config`` gives the epochs-independent settings. Each cycle records the
    sparsity reached, the fraction of pruned weights that are non-zero after the re-dense phase
    (``released``), and the final measured sparsity. Masks set before the call are dropped.
    """
    cfg = DSDConfig.coerce(config, where="dsd")
    before = size_of(model, example_inputs)
    sparse_cfg = train_config.model_copy(update={"epochs": cfg.sparse_epochs, "lr": cfg.sparse_lr or train_config.lr})
    dense_cfg = train_config.model_copy(update={"epochs": cfg.dense_epochs,
                                                "lr": cfg.dense_lr or train_config.lr / 10})
    cycles = []
    changed: dict[str, None] = {}
    for c in range(1, cfg.cycles + 1):
        report = magnitude_prune_(model, example_inputs, {"sparsity": cfg.sparsity, "scope": cfg.scope,
                                                          "layers": cfg.layers, "ignore": cfg.ignore})
        changed.update(dict.fromkeys(report.changed))
        if cfg.sparse_epochs:
            trained_in_place(model, train(model, sparse_cfg, mask_hooks()), "dsd_ train")
        pruned = {n: mask_of(m) == 0 for n, m in masked_modules(model).items()}
        remove_masks(model)
        if cfg.dense_epochs:
            trained_in_place(model, train(model, dense_cfg, None), "dsd_ train")
        modules = dict(model.named_modules())
        total = sum(int(p.sum()) for p in pruned.values())
        moved = sum(int((modules[n].weight.detach()[p] != 0).sum()) for n, p in pruned.items())
        cycles.append({"cycle": c, "sparse_sparsity": report.sparsity,
                       "released": round(moved / max(total, 1), 6),
                       "sparsity_after_dense": round(sparsity_of(model, PRUNABLE)["total"], 6)})
    return DSDReport(verb="dsd_", changed=list(changed), before=before, after=size_of(model, example_inputs),
                     cycles=cycles, dense=not masked_modules(model))


def fit_train(data: Any, **fit_kwargs: Any) -> Train:
    """A :data:`Train` that runs :func:`slimkit.train.fit` on ``data`` (a training Dataset)."""

    def train(model: nn.Module, cfg: TrainConfig, hooks: Any) -> nn.Module:
        return fit(model, data, cfg, hooks, **fit_kwargs)

    return train
