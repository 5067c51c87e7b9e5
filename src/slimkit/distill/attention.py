"""Attention transfer (Zagoruyko & Komodakis 2017, *Paying More Attention to Attention*).

The spatial attention map of a feature ``[N, C, H, W]`` is ``Q = mean_c |f_c|^p``
(p = 2), flattened to ``[N, H*W]`` and L2-normalized per sample. The loss of a layer pair
is the mean squared difference of the two normalized maps, and the total is
``beta / 2 * sum over pairs`` with ``beta = 1000``, as in the authors' code. Channel
counts may differ between the pair; when spatial sizes differ the larger map is
average-pooled to the smaller size before normalization.

>>> import torch
>>> f = torch.randn(2, 8, 6, 6)
>>> at = ATLoss()
>>> round(at([f], [3 * f]).item(), 6)   # attention is scale-invariant
0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.exceptions import ConfigError


def attention_map(feature: torch.Tensor, p: float = 2.0, size: Sequence[int] | None = None) -> torch.Tensor:
    """Normalized spatial attention ``[N, H*W]`` of ``feature [N, C, H, W]``, optionally pooled to ``size``."""
    if feature.dim() != 4:
        raise ConfigError(
            f"attention transfer needs conv feature maps [N, C, H, W], got shape {tuple(feature.shape)}; "
            "pair convolutional layers"
        )
    q = feature.abs().pow(p).mean(dim=1, keepdim=True)  # [N, 1, H, W]
    if size is not None and tuple(q.shape[-2:]) != tuple(size):
        q = F.adaptive_avg_pool2d(q, tuple(size))
    return F.normalize(q.flatten(1), dim=1)


class ATLoss(nn.Module):
    """``beta / 2 * sum_pairs mean((Q_s/|Q_s| - Q_t/|Q_t|)^2)``; teacher features are detached."""

    def __init__(self, p: float = 2.0, beta: float = 1000.0) -> None:
        super().__init__()
        if not p > 0 or not beta >= 0:
            raise ConfigError(f"ATLoss needs p > 0 and beta >= 0, got p={p!r}, beta={beta!r}")
        self.p = float(p)
        self.beta = float(beta)

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        total = student_feats[0].new_zeros(())
        for s, t in zip(student_feats, teacher_feats):
            size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
            a_s = attention_map(s, self.p, size)
            a_t = attention_map(t.detach(), self.p, size)
            total = total + (a_s - a_t).pow(2).mean()
        return self.beta / 2 * total
