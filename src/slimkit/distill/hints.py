"""FitNets hints (Romero et al. 2015, *FitNets: Hints for Thin Deep Nets*).

A learned regressor maps a student feature map onto a teacher's ("guided" onto "hint"
layer) and the L2 distance between them is the hint loss. The regressor is a 1x1
convolution from the student's to the teacher's channel count (a Linear for ``[N, D]``
features); when the spatial sizes differ the regressed map is average-pooled down or
bilinearly upsampled to the teacher's size. The paper's two-stage schedule (hint
pre-training of the layers up to the guided one, then KD of the whole student) is the
``two_stage`` option of the ``hint`` method (:mod:`slimkit.distill.methods`).

>>> import torch
>>> reg = HintRegressor(student_shape=(8, 14, 14), teacher_shape=(32, 7, 7))
>>> reg(torch.zeros(2, 8, 14, 14)).shape
torch.Size([2, 32, 7, 7])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.exceptions import ConfigError


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, *size]``: average pooling to shrink, bilinear to grow."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class HintRegressor(nn.Module):
    """Maps a student feature ``[N, *student_shape]`` to the teacher's ``[N, *teacher_shape]``.

    Shapes exclude the batch: ``(C, H, W)`` for conv features (1x1 conv, then resize),
    ``(D,)`` for vectors (Linear). Mixing a map and a vector is an error.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        self.student_shape = tuple(int(s) for s in student_shape)
        self.teacher_shape = tuple(int(s) for s in teacher_shape)
        if len(self.student_shape) == 3 and len(self.teacher_shape) == 3:
            self.proj = nn.Conv2d(self.student_shape[0], self.teacher_shape[0], kernel_size=1, bias=False)
        elif len(self.student_shape) == 1 and len(self.teacher_shape) == 1:
            self.proj = nn.Linear(self.student_shape[0], self.teacher_shape[0], bias=False)
        else:
            raise ConfigError(
                f"cannot regress a student feature of shape {self.student_shape} onto a teacher feature of shape "
                f"{self.teacher_shape}; pair two conv maps (C, H, W) or two vectors (D,)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if y.dim() == 4:
            y = resize_to(y, self.teacher_shape[1:])
        return y

    def extra_repr(self) -> str:
        return f"{self.student_shape} -> {self.teacher_shape}"


class HintLoss(nn.Module):
    """Sum over pairs of the mean squared error between regressed student and teacher features.

    Built from the per-pair feature shapes (without batch); its regressors are the
    parameters to train alongside the student (``TrainHooks.modules``).
    """

    def __init__(self, student_shapes: Sequence[Sequence[int]], teacher_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(student_shapes) != len(teacher_shapes):
            raise ConfigError(f"{len(student_shapes)} student features but {len(teacher_shapes)} teacher features")
        self.regressors = nn.ModuleList(HintRegressor(s, t) for s, t in zip(student_shapes, teacher_shapes))

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        total = student_feats[0].new_zeros(())
        for reg, s, t in zip(self.regressors, student_feats, teacher_feats):
            total = total + F.mse_loss(reg(s.flatten(1) if s.dim() == 2 else s), t.detach())
        return total
