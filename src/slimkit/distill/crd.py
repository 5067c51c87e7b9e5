"""CRD: contrastive representation distillation with a memory bank (Tian, Krishnan & Isola 2020, ICLR).

Tian et al. 2020, *Contrastive Representation Distillation*. Student and teacher features
``f_s [N, d_s]``, ``f_t [N, d_t]`` (flattened) are embedded by learned linear heads and
L2-normalized, ``s = g_s(f_s)``, ``t = g_t(f_t)`` in ``R^dim``. A critic scores a pair by

    h(s, t) = exp(s . t / tau) / Z,      Z = M * mean(exp(. / tau)) over the first batch

(the NCE normalization of the authors' code, fixed after the first batch). For anchor ``i``
with positive ``p_i`` (the same sample's embedding on the other network, read from the
memory bank) and ``K`` negatives ``n_ik`` (other samples' embeddings drawn uniformly from the
bank), the NCE loss with noise probability ``P_n = 1/M`` is (eq. 10-18 of the paper):

    L = -1/N sum_i [ log(h_ip / (h_ip + K P_n)) + sum_k log(K P_n / (h_ik + K P_n)) ]

and CRD sums it over both directions: student anchors against the teacher's bank and
teacher anchors against the student's bank. The memory bank keeps one embedding per
training sample (``M`` slots) for each network, updated after each step with momentum
``m``: ``bank[i] := normalize(m bank[i] + (1 - m) e_i)``; a sample's first embedding is
written as it is.

slimkit's trainer does not pass dataset indices to the loss, so a sample's slot is found
by hashing its input tensor (:func:`slimkit.distill.methods._sample_keys`); with random
augmentation every view is a new key and the bank becomes a FIFO of the last ``M``
embeddings. Gradients reach the student and the two embedding heads, never the teacher.

Method ``crd`` in ``DISTILL_METHODS`` (options: ``pairs`` (one ``{student: name, teacher:
name}``; default: the logits), ``weight`` = 0.8 (the paper's beta), ``dim`` = 128,
``negatives`` = 4096, ``tau`` = 0.07, ``momentum`` = 0.5, ``bank_size`` (default: the
training set's size), ``kd`` = false). The total is the task term + ``weight x L``.

>>> import torch
>>> crd = CRDLoss(student_dim=8, teacher_dim=6, bank_size=32, dim=4, negatives=5)
>>> loss = crd(torch.randn(4, 8), torch.randn(4, 6), torch.arange(4))
>>> loss.shape, bool(loss > 0)
(torch.Size([]), True)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.distill import methods as M
from slimkit.distill.spec import DISTILL_METHODS, DistillSpec
from slimkit.exceptions import ConfigError
from slimkit.stages import StageContext
from slimkit.train import TrainHooks

M.OPTIONS["crd"] = frozenset({"pairs", "weight", "dim", "negatives", "tau", "momentum", "bank_size", "kd"})

EPS = 1e-7  # as in the authors' ContrastLoss


def nce_loss(scores: torch.Tensor, bank_size: int) -> torch.Tensor:
    """CRD's NCE loss of normalized critic scores ``h [N, 1 + K]`` (column 0 = positive), noise ``P_n = 1/M``."""
    negatives = scores.shape[1] - 1
    noise = negatives / bank_size  # K * P_n
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))
    negative = torch.log(noise / (scores[:, 1:] + noise + EPS))
    return -(positive.sum() + negative.sum()) / scores.shape[0]


class CRDLoss(nn.Module):
    """Embedding heads + memory banks + the two-sided NCE loss; ``forward(f_s, f_t, slots) -> scalar``.

    ``slots [N]`` (int64 in ``[0, bank_size)``) name each sample's row in the banks. The
    negatives are drawn uniformly from the filled rows other than the anchor's own, or
    given as ``negatives_idx [N, K]`` (tests).
    """

    def __init__(self, student_dim: int, teacher_dim: int, bank_size: int, dim: int = 128, negatives: int = 4096,
                 tau: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        if bank_size < 2 or dim < 1 or negatives < 1 or not tau > 0 or not 0 <= momentum < 1:
            raise ConfigError(f"CRD needs bank_size >= 2, dim >= 1, negatives >= 1, tau > 0 and 0 <= momentum < 1; "
                              f"got bank_size={bank_size}, dim={dim}, negatives={negatives}, tau={tau}, "
                              f"momentum={momentum}")
        self.embed_s = nn.Linear(int(student_dim), int(dim))
        self.embed_t = nn.Linear(int(teacher_dim), int(dim))
        self.bank_size, self.negatives = int(bank_size), int(negatives)
        self.tau, self.momentum = float(tau), float(momentum)
        self.register_buffer("bank_s", torch.zeros(self.bank_size, int(dim)))
        self.register_buffer("bank_t", torch.zeros(self.bank_size, int(dim)))
        self.register_buffer("filled", torch.zeros(self.bank_size, dtype=torch.bool))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of the student-anchor and teacher-anchor critics

    def embed(self, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalized embeddings ``[N, dim]`` of flattened student and (detached) teacher features."""
        return (F.normalize(self.embed_s(f_s.flatten(1)), dim=1),
                F.normalize(self.embed_t(f_t.detach().flatten(1)), dim=1))

    def sample_negatives(self, slots: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` uniform draws from the filled bank rows, never the anchor's own row."""
        rows = torch.nonzero(self.filled).flatten()
        if rows.numel() < 2:
            raise ConfigError("CRD needs at least two samples in the memory bank; use a batch size of 2 or more")
        k = min(self.negatives, rows.numel() - 1)
        own = torch.searchsorted(rows, slots)  # position of each anchor's row among the filled rows
        draw = torch.randint(0, rows.numel() - 1, (slots.numel(), k), device=slots.device)
        draw = draw + (draw >= own.view(-1, 1)).long()  # skip the anchor's own row
        return rows[draw]

    def scores(self, anchor: torch.Tensor, bank: torch.Tensor, slots: torch.Tensor, negatives_idx: torch.Tensor,
               side: int) -> torch.Tensor:
        """Normalized critic ``h [N, 1 + K]`` of ``anchor`` against the bank rows (own slot first)."""
        idx = torch.cat([slots.view(-1, 1), negatives_idx], dim=1)
        contrast = bank[idx].detach()  # [N, 1 + K, dim]
        out = torch.exp(torch.bmm(contrast, anchor.unsqueeze(2)).squeeze(2) / self.tau)
        if self.z[side] < 0:
            self.z[side] = float(out.mean().detach()) * self.bank_size
        return out / float(self.z[side])

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, slots: torch.Tensor,
                negatives_idx: torch.Tensor | None = None) -> torch.Tensor:
        s, t = self.embed(f_s, f_t)
        slots = slots.to(s.device).long()
        with torch.no_grad():  # first sight of a sample: its bank rows are its embeddings
            new = ~self.filled[slots]
            self.bank_s[slots[new]] = s.detach()[new]
            self.bank_t[slots[new]] = t.detach()[new]
            self.filled[slots] = True
        if negatives_idx is None:
            negatives_idx = self.sample_negatives(slots)
        loss = (nce_loss(self.scores(s, self.bank_t, slots, negatives_idx, 0), self.bank_size)
                + nce_loss(self.scores(t, self.bank_s, slots, negatives_idx, 1), self.bank_size))
        with torch.no_grad():
            for bank, e in ((self.bank_s, s), (self.bank_t, t)):
                bank[slots] = F.normalize(self.momentum * bank[slots] + (1 - self.momentum) * e.detach(), dim=1)
        return loss


class SlotTable:
    """Sample key -> bank row; new keys take the next row, round-robin once all ``size`` rows are taken."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.rows: dict[bytes, int] = {}
        self.owner: list[bytes | None] = [None] * self.size
        self.next = 0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        out = []
        for key in M._sample_keys(inputs):
            row = self.rows.get(key)
            if row is None:
                row = self.next
                self.next = (self.next + 1) % self.size
                if self.owner[row] is not None:
                    del self.rows[self.owner[row]]
                self.owner[row], self.rows[key] = key, row
            out.append(row)
        return torch.tensor(out, dtype=torch.long)


def _int_option(options: dict[str, Any], key: str, default: int, low: int = 1) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"distill option {key!r} must be an integer >= {low}, got {value!r}")
    return value


def _bank_size(opts: dict[str, Any], ctx: StageContext | None) -> int:
    if opts.get("bank_size") is not None:
        return _int_option(opts, "bank_size", 0, low=2)
    train = getattr(getattr(ctx, "data", None), "train", None)
    if train is None:
        raise ConfigError("distill method 'crd' needs options.bank_size or a stage context with training data")
    return max(2, len(train))


@DISTILL_METHODS.register("crd")
def build_crd(spec: DistillSpec, student: nn.Module, teacher: nn.Module, ctx: StageContext | None) -> TrainHooks:
    """CRD (Tian 2020): two-sided NCE over a per-sample memory bank of embeddings, plus the task term."""
    opts = spec.options
    M.check_options("crd", opts)
    M._check_models(student, teacher)
    weight = M._float_option(opts, "weight", 0.8)
    tau = M._float_option(opts, "tau", 0.07)
    momentum = M._float_option(opts, "momentum", 0.5)
    bank = _bank_size(opts, ctx)
    x = M._example_inputs(ctx, "crd")
    pairs = None
    if opts.get("pairs") is not None:
        pairs = M.parse_pairs(opts["pairs"], "distill.options.pairs")
        if len(pairs) != 1:
            raise ConfigError(f"distill.options.pairs: crd takes one {{student, teacher}} pair (the penultimate "
                              f"features), got {len(pairs)}")
        s_dim = math.prod(M._probe_shapes(student, [pairs[0][0]], x, "student")[0])
        t_dim = math.prod(M._probe_shapes(teacher, [pairs[0][1]], x, "teacher")[0])
    else:
        s_dim, t_dim = _logit_dims(student, teacher, x)
    crd = CRDLoss(s_dim, t_dim, bank, dim=_int_option(opts, "dim", 128), negatives=_int_option(opts, "negatives",
                  4096), tau=tau, momentum=momentum)
    crd.to(next((p.device for p in student.parameters()), torch.device("cpu")))
    slots = SlotTable(bank)
    task = M._task_loss(spec, bool(opts.get("kd", False)), M._label_smoothing(ctx))
    students = M.StudentFeatures(student, [pairs[0][0]]) if pairs else None
    runner = M.Teacher(teacher, [pairs[0][1]] if pairs else ())

    def loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if not slots.rows:  # a new slot table (a resumed run restores the banks, not the key -> row map)
            crd.filled.zero_()
        t_logits, t_feats = runner(inputs)
        f_s = students.take(inputs)[0] if students else outputs
        f_t = t_feats[0] if pairs else t_logits
        return task(outputs, t_logits, targets) + weight * crd(f_s, f_t, slots(inputs))

    after = (students.after_step,) if students else ()
    loss.crd = crd  # type: ignore[attr-defined]  # exposes the banks (tests, studies)
    return TrainHooks(loss=loss, after_step=after, modules=(crd,))


def _logit_dims(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    dims = []
    for model in (student, teacher):
        was = model.training
        model.eval()
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            dims.append(int(model(x.to(device)).flatten(1).shape[1]))
        model.train(was)
    return dims[0], dims[1]
