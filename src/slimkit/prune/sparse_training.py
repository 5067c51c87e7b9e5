"""Sparsity-inducing penalties for channel pruning, as ``TrainHooks`` penalties.

- :class:`BNL1Penalty`: ``lam * sum |gamma|`` over BatchNorm scales (Network Slimming, Liu
  et al. 2017; Liu & Lei 2022's MobileNetV3 method uses ``lam = 1e-5``), which drives whole
  channels towards zero so that ``bn_gamma`` / ``sparsity_gamma`` can find them.
- :class:`GroupLassoPenalty`: ``lam * sum_n ||W_n||_2`` over the filters of conv layers
  (structured sparsity learning, SSL, Wen et al. 2016).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
>>> float(BNL1Penalty(0.5)(net).detach())  # gammas start at 1
1.0
>>> hooks = sparse_hooks("bn_l1", 1e-5)
>>> len(hooks.penalties)
1
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.selection import matches
from slimkit.train import TrainHooks


class BNL1Penalty:
    """``lam * sum |gamma|`` of the BatchNorm layers whose names match ``layers``."""

    def __init__(self, lam: float, layers: Sequence[str] = ("*",)) -> None:
        self.lam, self.layers = float(lam), tuple(layers)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        terms = [m.weight.abs().sum() for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and matches(name, self.layers)]
        if not terms:
            return torch.zeros(())
        return self.lam * torch.stack(terms).sum()


class GroupLassoPenalty:
    """``lam * sum over filters of ||W_n||_2`` for conv layers whose names match ``layers`` (SSL)."""

    def __init__(self, lam: float, layers: Sequence[str] = ("*",)) -> None:
        self.lam, self.layers = float(lam), tuple(layers)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        terms = [m.weight.flatten(1).norm(dim=1).sum() for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups == 1 and matches(name, self.layers)]
        if not terms:
            return torch.zeros(())
        return self.lam * torch.stack(terms).sum()


PENALTIES = {"bn_l1": BNL1Penalty, "group_lasso": GroupLassoPenalty}


def sparse_hooks(penalty: str, lam: float, layers: Sequence[str] = ("*",)) -> TrainHooks:
    """TrainHooks adding the named penalty (``bn_l1`` or ``group_lasso``) to the training loss."""
    if penalty not in PENALTIES:
        raise ConfigError(f"sparse-train penalty must be one of {sorted(PENALTIES)}, got {penalty!r}")
    return TrainHooks(penalties=(PENALTIES[penalty](lam, layers),))
