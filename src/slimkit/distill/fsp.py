"""FSP: distil the flow of solution procedure (Yim, Joo, Bae & Kim 2017, CVPR).

Yim et al. 2017, *A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning*. The "flow" between two layers of one network is the
FSP matrix of their feature maps ``F1 [N, m, h, w]`` and ``F2 [N, n, h, w]``:

    G_ij(x) = sum_{s,t} F1_{i,s,t}(x) F2_{j,s,t}(x) / (h w)        G(x) in R^{m x n}

and the student learns the teacher's flows (eq. 2 of the paper):

    L_FSP = 1/N sum_x sum_i lambda_i ||G_i^T(x) - G_i^S(x)||_2^2

(the squared Frobenius norm per sample, averaged over the batch, summed over the layer
pairs with equal ``lambda_i = weight``). Student and teacher FSP matrices must have the
same size: pair layers of equal channel counts. When the two maps of one network differ
in spatial size, the larger is max-pooled to the smaller (as in torchdistill's FSPLoss).

Method ``fsp`` in ``DISTILL_METHODS`` (options: ``pairs`` (required), ``weight`` = 1,
``kd`` = false, ``two_stage`` = false, ``fsp_epochs``). Each pair names two modules on each
model: ``{student: [first, second], teacher: [first, second]}``. The paper's schedule is
``two_stage``: the FSP loss alone for ``fsp_epochs`` (default: half the fine-tune's epochs,
:func:`pretrain_fsp`), then the task loss alone (:func:`build_fsp`); without it, the task
term and ``weight x L_FSP`` are summed.

>>> import torch
>>> f1, f2 = torch.ones(2, 3, 4, 4), 2 * torch.ones(2, 5, 4, 4)
>>> fsp_matrix(f1, f2).shape, float(fsp_matrix(f1, f2)[0, 0, 0])
(torch.Size([2, 3, 5]), 2.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.distill import methods as M
from slimkit.distill.spec import DISTILL_METHODS, DISTILL_PRETRAINING, DistillSpec
from slimkit.exceptions import ConfigError
from slimkit.stages import StageContext
from slimkit.train import TrainHooks

M.OPTIONS["fsp"] = frozenset({"pairs", "weight", "kd", "two_stage", "fsp_epochs"})

Section = tuple[str, str]  # (first, second) module names on one network


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``[N, m, n]`` FSP matrices of ``first [N, m, h, w]`` and ``second [N, n, h', w']``.

    The larger map is adaptive-max-pooled to the smaller spatial size first.
    """
    if first.dim() != 4 or second.dim() != 4:
        raise ConfigError(f"FSP needs conv feature maps [N, C, H, W], got shapes {tuple(first.shape)} and "
                          f"{tuple(second.shape)}; name convolutional layers")
    size = (min(first.shape[2], second.shape[2]), min(first.shape[3], second.shape[3]))
    if tuple(first.shape[2:]) != size:
        first = F.adaptive_max_pool2d(first, size)
    if tuple(second.shape[2:]) != size:
        second = F.adaptive_max_pool2d(second, size)
    return torch.einsum("nihw,njhw->nij", first, second) / (size[0] * size[1])


class FSPLoss(nn.Module):
    """``weight * sum_pairs mean_N ||G_T - G_S||_F^2`` over FSP matrices; teacher features are detached.

    ``forward(student_feats, teacher_feats)`` takes the flat feature lists
    ``[s1_first, s1_second, s2_first, ...]`` (two maps per pair, in order).
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if not weight >= 0:
            raise ConfigError(f"FSPLoss weight must be >= 0, got {weight!r}")
        self.weight = float(weight)

    def forward(self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(student_feats) != len(teacher_feats) or len(student_feats) % 2:
            raise ConfigError(f"FSP needs two maps per pair on each network, got {len(student_feats)} student and "
                              f"{len(teacher_feats)} teacher maps")
        total = student_feats[0].new_zeros(())
        for i in range(0, len(student_feats), 2):
            g_s = fsp_matrix(student_feats[i], student_feats[i + 1])
            g_t = fsp_matrix(teacher_feats[i].detach(), teacher_feats[i + 1].detach())
            if g_s.shape[1:] != g_t.shape[1:]:
                raise ConfigError(f"FSP pair {i // 2}: student matrix is {tuple(g_s.shape[1:])} but the teacher's is "
                                  f"{tuple(g_t.shape[1:])}; pair layers with equal channel counts")
            total = total + (g_t - g_s).pow(2).flatten(1).sum(1).mean()
        return self.weight * total


def parse_sections(pairs: Any, where: str = "distill.options.pairs") -> list[tuple[Section, Section]]:
    """``[{student: [a, b], teacher: [c, d]}, ...]`` -> ``[((a, b), (c, d)), ...]``."""
    if not isinstance(pairs, Sequence) or isinstance(pairs, str) or not pairs:
        raise ConfigError(f"{where}: expected a non-empty list of {{student: [first, second], teacher: "
                          f"[first, second]}}, got {pairs!r}")
    out = []
    for i, pair in enumerate(pairs):
        ok = isinstance(pair, Mapping) and set(pair) == {"student", "teacher"} and all(
            isinstance(pair[r], Sequence) and not isinstance(pair[r], str) and len(pair[r]) == 2
            for r in ("student", "teacher"))
        if not ok:
            raise ConfigError(f"{where}[{i}]: expected {{student: [first, second], teacher: [first, second]}} "
                              f"(two module names on each network), got {pair!r}")
        out.append(((str(pair["student"][0]), str(pair["student"][1])),
                    (str(pair["teacher"][0]), str(pair["teacher"][1]))))
    return out


def _flat(sections: list[tuple[Section, Section]], role: int) -> list[str]:
    return [name for pair in sections for name in pair[role]]


def _check_sizes(spec_pairs: list[tuple[Section, Section]], student: nn.Module, teacher: nn.Module,
                 ctx: StageContext | None) -> None:
    x = M._example_inputs(ctx, "fsp")
    s_shapes = M._probe_shapes(student, _flat(spec_pairs, 0), x, "student")
    t_shapes = M._probe_shapes(teacher, _flat(spec_pairs, 1), x, "teacher")
    for i in range(len(spec_pairs)):
        s_mat = (s_shapes[2 * i][0], s_shapes[2 * i + 1][0])
        t_mat = (t_shapes[2 * i][0], t_shapes[2 * i + 1][0])
        if any(len(s) != 3 for s in s_shapes[2 * i: 2 * i + 2] + t_shapes[2 * i: 2 * i + 2]):
            raise ConfigError(f"distill.options.pairs[{i}]: FSP needs conv feature maps (C, H, W) on all four layers")
        if s_mat != t_mat:
            raise ConfigError(f"distill.options.pairs[{i}]: student FSP matrix is {s_mat[0]}x{s_mat[1]} but the "
                              f"teacher's is {t_mat[0]}x{t_mat[1]}; pair layers with equal channel counts")


def _fsp_loss(spec: DistillSpec, student: nn.Module, teacher: nn.Module,
              ctx: StageContext | None) -> tuple[list[str], list[str], FSPLoss]:
    """The checked student and teacher layer names (pairs flattened) and the weighted FSP loss."""
    opts = spec.options
    M.check_options("fsp", opts)
    M._check_models(student, teacher)
    sections = parse_sections(opts.get("pairs"))
    _check_sizes(sections, student, teacher, ctx)
    return _flat(sections, 0), _flat(sections, 1), FSPLoss(M._float_option(opts, "weight", 1.0))


@DISTILL_METHODS.register("fsp")
def build_fsp(spec: DistillSpec, student: nn.Module, teacher: nn.Module, ctx: StageContext | None) -> TrainHooks:
    """FSP (Yim 2017) hooks: match the student's FSP matrices to the teacher's, plus the task term.

    With ``two_stage`` these are the hooks of the paper's second stage: the task loss alone
    (KD with ``kd: true``); the first stage is :func:`pretrain_fsp`. Builds only.
    """
    s_names, t_names, fsp = _fsp_loss(spec, student, teacher, ctx)
    use_kd = bool(spec.options.get("kd", False))
    if spec.options.get("two_stage"):
        if use_kd:
            return M.build_kd(spec.model_copy(update={"method": "kd", "options": {}}), student, teacher, ctx)
        return TrainHooks()
    return M._feature_hooks(spec, student, teacher, list(zip(s_names, t_names)), fsp, use_kd, ctx)


@DISTILL_PRETRAINING.register("fsp")
def pretrain_fsp(spec: DistillSpec, student: nn.Module, teacher: nn.Module, ctx: StageContext | None) -> None:
    """Stage 1 of the paper (``two_stage``): train ``student`` in place on the FSP loss alone, via ``ctx.finetune``."""
    if ctx is None:
        raise ConfigError("fsp option two_stage trains the student first; it needs a stage context "
                          "(slimkit.finetune.training_context(data, train_config))")
    s_names, t_names, fsp = _fsp_loss(spec, student, teacher, ctx)
    epochs = spec.options.get("fsp_epochs")
    if epochs is None:
        epochs = max(1, ctx.train_config.epochs // 2)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ConfigError(f"distill option 'fsp_epochs' must be a non-negative integer, got {epochs!r}")
    students = M.StudentFeatures(student, s_names)
    runner = M.Teacher(teacher, t_names)

    def loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        _, t_feats = runner(inputs)
        return fsp(students.take(inputs), t_feats)

    hooks = TrainHooks(loss=loss, after_step=(students.after_step,))
    ctx.finetune(student, hooks, epochs=epochs, config=ctx.train_config)
    students.tap.remove()
