"""Relational knowledge distillation (Park et al. 2019, *Relational Knowledge Distillation*).

Instead of matching outputs one sample at a time, RKD matches the *structure* of a batch:

- distance: the pairwise Euclidean distances of the embeddings, each divided by their
  mean over the batch, compared with the Huber (smooth L1) loss;
- angle: for every triple (i, j, k) the cosine of the angle at j between i and k
  (dot product of the normalized differences), compared with the Huber loss.

Weights 25 (distance) and 50 (angle) are the paper's. Embeddings are any ``[N, ...]``
tensors (flattened); student and teacher dimensions may differ.

>>> import torch
>>> e = torch.randn(6, 4)
>>> round(RKDLoss()([e], [2 * e]).item(), 6)   # scaling the teacher's embedding changes nothing
0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``[N, N]`` Euclidean distances of the rows of ``e [N, D]`` (zero diagonal)."""
    sq = e.pow(2).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _normalized_distances(e: torch.Tensor) -> torch.Tensor:
    d = pairwise_distances(e)
    mean = d[d > 0].mean() if bool((d > 0).any()) else d.new_ones(())
    return d / mean


def angles(e: torch.Tensor) -> torch.Tensor:
    """``[N, N, N]`` cosines: entry (i, j, k) is cos of the angle at j between e_i and e_k."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [j, i, D]: e_i - e_j normalized
    return torch.bmm(diff, diff.transpose(1, 2))  # [j, i, k]


class RKDLoss(nn.Module):
    """``distance_weight * L_dist + angle_weight * L_angle`` summed over embedding pairs."""

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        total = student_feats[0].new_zeros(())
        for s, t in zip(student_feats, teacher_feats):
            s, t = s.flatten(1), t.detach().flatten(1)
            if self.distance_weight:
                total = total + self.distance_weight * F.smooth_l1_loss(_normalized_distances(s),
                                                                         _normalized_distances(t))
            if self.angle_weight:
                total = total + self.angle_weight * F.smooth_l1_loss(angles(s), angles(t))
        return total
