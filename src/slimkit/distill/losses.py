"""Logit-level distillation losses.

:class:`KDLoss` is Hinton, Vinyals & Dean 2015 (*Distilling the Knowledge in a Neural
Network*): the student matches the teacher's temperature-softened class probabilities,
and the ``T^2`` factor keeps the soft term's gradient scale independent of ``T``.

>>> import torch
>>> loss = KDLoss(temperature=4.0, alpha=0.9)
>>> s, t, y = torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1])
>>> round(loss(s, t, y).item(), 4)   # equal logits: KL = 0, only 0.1 * CE = 0.1 * ln 3
0.1099
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.exceptions import ConfigError


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` summed over classes, averaged over the batch.

    Logits are ``[N, C]``; the teacher is detached (it receives no gradient).
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


class KDLoss(nn.Module):
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``, batch mean.

    ``temperature`` > 0 softens both distributions; ``alpha`` in [0, 1] weighs the soft
    term (0.9 with T = 4 is the CRD benchmark's setting). Called as
    ``loss(student_logits [N, C], teacher_logits [N, C], targets [N])``; the teacher
    logits are detached. ``label_smoothing`` applies to the hard term.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"KDLoss temperature must be > 0, got {temperature!r}; 4 is a common choice")
        if not 0 <= alpha <= 1:
            raise ConfigError(f"KDLoss alpha must be in [0, 1], got {alpha!r}; it weighs the soft (teacher) term")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.label_smoothing = float(label_smoothing)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ConfigError(
                f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                "differ; both models must predict the same classes"
            )
        loss = student_logits.new_zeros(())
        if self.alpha > 0:
            loss = loss + self.alpha * self.temperature**2 * soft_kl(student_logits, teacher_logits, self.temperature)
        if self.alpha < 1:
            hard = F.cross_entropy(student_logits, targets, label_smoothing=self.label_smoothing)
            loss = loss + (1 - self.alpha) * hard
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"
