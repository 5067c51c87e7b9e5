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
Training here uses :func:`slimkit.train.fit` directly, so hooks kept from earlier stages
(weight sharing) do not apply inside the cycles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field
from torch import nn

from slimkit.config import Config
from slimkit.prune.magnitude import magnitude_prune_
from slimkit.prune.masks import MASK, PRUNABLE, mask_hooks, masked_modules, remove_masks, sparsity_of
from slimkit.train import TrainConfig, fit

#: ``train(model, config, hooks)`` trains ``model`` for ``config.epochs`` and returns it
Train = Callable[..., nn.Module]


class DSDConfig(Config):
    """Settings of the ``dsd`` stage and of :func:`dsd_`."""

    sparsity: float = Field(0.5, gt=0, lt=1, description="sparse phase target (DSD uses 0.3-0.5)")
    scope: Literal["layer", "global"] = "layer"
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    cycles: int = Field(1, ge=1, description="1: DSD; more: iterative hard thresholding")
    sparse_epochs: int = Field(1, ge=0)
    dense_epochs: int = Field(1, ge=0)
    sparse_lr: float | None = Field(None, gt=0, description="default: the stage's training lr")
    dense_lr: float | None = Field(None, gt=0, description="default: a tenth of the stage's training lr")


def dsd_(model: nn.Module, config: DSDConfig | dict[str, Any], train: Train, base: TrainConfig) -> dict[str, Any]:
    """Run the DSD / IHT cycles on ``model`` in place; returns a report per cycle.

    ``train(model, cfg, hooks)`` trains with a :class:`~slimkit.train.TrainConfig` and hooks;
    ``base`` gives the epochs-independent settings. Each cycle records the sparsity reached,
    the fraction of pruned weights that are non-zero after the re-dense phase (``released``),
    and the final measured sparsity. Masks set before the call are dropped.
    """
    cfg = DSDConfig.coerce(config, where="dsd")
    sparse_cfg = base.model_copy(update={"epochs": cfg.sparse_epochs, "lr": cfg.sparse_lr or base.lr})
    dense_cfg = base.model_copy(update={"epochs": cfg.dense_epochs, "lr": cfg.dense_lr or base.lr / 10})
    cycles = []
    for c in range(1, cfg.cycles + 1):
        report = magnitude_prune_(model, {"sparsity": cfg.sparsity, "scope": cfg.scope, "layers": cfg.layers,
                                          "ignore": cfg.ignore})
        if cfg.sparse_epochs:
            model = train(model, sparse_cfg, mask_hooks()) or model
        pruned = {n: m._buffers[MASK] == 0 for n, m in masked_modules(model).items()}
        remove_masks(model)
        if cfg.dense_epochs:
            model = train(model, dense_cfg, None) or model
        modules = dict(model.named_modules())
        total = sum(int(p.sum()) for p in pruned.values())
        moved = sum(int((modules[n].weight.detach()[p] != 0).sum()) for n, p in pruned.items())
        cycles.append({"cycle": c, "sparse_sparsity": report["sparsity"],
                       "released": round(moved / max(total, 1), 6),
                       "sparsity_after_dense": round(sparsity_of(model, PRUNABLE)["total"], 6)})
    return {"cycles": cycles, "dense": not masked_modules(model)}


def fit_train(data: Any, **fit_kwargs: Any) -> Train:
    """A :data:`Train` that runs :func:`slimkit.train.fit` on ``data`` (a training Dataset)."""

    def train(model: nn.Module, cfg: TrainConfig, hooks: Any) -> nn.Module:
        return fit(model, data, cfg, hooks, **fit_kwargs)

    return train
