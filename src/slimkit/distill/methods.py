"""Distillation methods as trainer hooks: ``DISTILL_METHODS[name](spec, student, teacher, ctx) -> TrainHooks``.

A builder only builds hooks; the two-stage methods register their first, training stage
in ``DISTILL_PRETRAINING`` (:mod:`slimkit.distill.spec`), and :func:`prepare_distillation`
runs both in order: pre-training (which trains the student in place) then the hooks.

Every method returns :class:`slimkit.train.TrainHooks` whose ``loss`` replaces the task
loss of :func:`slimkit.train.fit`, so distillation runs through the normal trainer (DDP,
progress, checkpoints unchanged). The teacher runs in eval mode under ``torch.no_grad()``
inside the loss: it gets no gradient and its weights never change. Student features are
taken by forward hooks during the trainer's own forward pass (no second student pass);
the hooks are removed after the last optimizer step.

Methods (``spec.options`` keys in brackets, defaults after ``=``):

- ``kd``: :class:`~slimkit.distill.losses.KDLoss` with ``spec.temperature`` and ``spec.alpha``
  [``cache`` = false: keep the teacher's logits per input sample, for data without random
  augmentation].
- ``hint``: task term + ``weight`` x FitNets hint loss over feature ``pairs`` [``pairs``
  (required), ``weight`` = 1, ``kd`` = false, ``two_stage`` = false, ``hint_epochs``]. With
  ``two_stage``, :func:`pretrain_hint` trains the hints first, alone, for ``hint_epochs``
  (default: half the fine-tune's epochs), and :func:`build_hint` returns plain KD hooks.
- ``at``: task term + attention transfer (p = 2) over ``pairs`` [``pairs`` (required),
  ``weight`` = 1000 (beta), ``kd`` = false].
- ``rkd``: task term + relational KD on the logits, or on ``pairs`` of embeddings
  [``pairs``, ``distance_weight`` = 25, ``angle_weight`` = 50, ``kd`` = false].

The task term is cross-entropy, or ``KDLoss(spec.temperature, spec.alpha)`` with ``kd: true``.

>>> import torch
>>> from torch import nn
>>> from slimkit.distill.spec import DISTILL_METHODS, DistillSpec
>>> student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
>>> hooks = DISTILL_METHODS.get("kd")(DistillSpec(method="kd"), student, teacher, None)
>>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
>>> hooks.loss(student(x), y, x).shape
torch.Size([])
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.distill.attention import ATLoss
from slimkit.distill.features import FeatureTap, parse_pairs
from slimkit.distill.hints import HintLoss
from slimkit.distill.losses import KDLoss
from slimkit.distill.relational import RKDLoss
from slimkit.distill.spec import DISTILL_METHODS, DISTILL_PRETRAINING, DistillSpec
from slimkit.exceptions import ConfigError
from slimkit.stages import StageContext
from slimkit.train import StepInfo, TrainHooks

#: Allowed ``options`` per method (anything else is an error).
OPTIONS: dict[str, frozenset[str]] = {
    "kd": frozenset({"cache"}),
    "hint": frozenset({"pairs", "weight", "kd", "two_stage", "hint_epochs"}),
    "at": frozenset({"pairs", "weight", "kd"}),
    "rkd": frozenset({"pairs", "distance_weight", "angle_weight", "kd"}),
}


def check_options(method: str, options: dict[str, Any]) -> None:
    """One-line ConfigError for an option the method does not know."""
    allowed = OPTIONS.get(method, frozenset())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"distill method {method!r} has no option(s) {unknown}; allowed: {sorted(allowed) or 'none'}"
        )


def _check_models(student: nn.Module, teacher: nn.Module) -> None:
    if student is teacher:
        raise ConfigError("the teacher is the student itself; distil from a copy (teacher: baseline) or a saved model")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ConfigError(f"student and teacher share {len(shared)} parameter tensors; give the student its own copy")


def _sample_keys(inputs: torch.Tensor) -> list[bytes]:
    flat = inputs.detach().to("cpu", torch.float32).contiguous().flatten(1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


class Teacher:
    """Runs the teacher in eval mode under no_grad: ``logits, feats = teacher(inputs)``.

    ``features`` are module names whose outputs are returned too. ``cache=True`` keeps the
    logits per input sample (keyed by a hash of its values) and skips the forward pass for
    a batch seen before; only valid without random augmentation, and only for logits.
    """

    def __init__(self, model: nn.Module, features: Sequence[str] = (), cache: bool = False) -> None:
        self.model = model
        self.features = list(features)
        self.cache: dict[bytes, torch.Tensor] | None = {} if cache and not self.features else None
        self.hits = 0
        self.misses = 0
        if self.features:  # fail early on a bad name
            FeatureTap(model, self.features, role="teacher").remove()

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        device = next((p.device for p in self.model.parameters()), inputs.device)
        if device != inputs.device:
            self.model.to(inputs.device)
        self.model.eval()
        if self.cache is not None:
            keys = _sample_keys(inputs)
            if all(k in self.cache for k in keys):
                self.hits += len(keys)
                return torch.stack([self.cache[k] for k in keys]).to(inputs.device), []
            logits = self.model(inputs)
            self.misses += len(keys)
            for key, row in zip(keys, logits.detach().cpu()):
                self.cache[key] = row
            return logits, []
        if not self.features:
            return self.model(inputs), []
        with FeatureTap(self.model, self.features, role="teacher") as tap:
            logits = self.model(inputs)
            feats = [f.detach() for f in tap.take()]
        return logits, feats


class StudentFeatures:
    """Forward hooks on the student kept for one training run; removed after the last step."""

    def __init__(self, student: nn.Module, names: Sequence[str]) -> None:
        self.student = student
        self.tap = FeatureTap(student, names, role="student")

    def take(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        if not self.tap.attached:  # hooks reused after their run ended: recompute once
            self.tap.attach()
            self.student(inputs)
        return self.tap.take()

    def after_step(self, model: nn.Module, info: StepInfo) -> None:
        if info.step >= info.total_steps:
            self.tap.remove()


def _task_loss(spec: DistillSpec, use_kd: bool, label_smoothing: float) -> Callable[..., torch.Tensor]:
    if use_kd:
        kd = KDLoss(spec.temperature, spec.alpha, label_smoothing)
        return lambda s, t, y: kd(s, t, y)
    return lambda s, t, y: F.cross_entropy(s, y, label_smoothing=label_smoothing)


def _label_smoothing(ctx: StageContext | None) -> float:
    cfg = getattr(ctx, "train_config", None)
    return float(getattr(cfg, "label_smoothing", 0.0) or 0.0)


def _probe_shapes(model: nn.Module, names: Sequence[str], inputs: torch.Tensor, role: str) -> list[tuple[int, ...]]:
    """Per-sample output shapes of named modules for one eval-mode forward pass."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FeatureTap(model, names, role=role) as tap:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(inputs.to(device))
            return [tuple(f.shape[1:]) for f in tap.take()]
    finally:
        model.train(was_training)


def _example_inputs(ctx: StageContext | None, method: str) -> torch.Tensor:
    x = getattr(ctx, "example_inputs", None)
    if x is None:
        raise ConfigError(f"distill method {method!r} needs ctx.example_inputs to size its regressors; pass a context")
    return x if x.shape[0] > 1 else torch.cat([x, x])


def _feature_hooks(spec: DistillSpec, student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]],
                   feature_loss: nn.Module, use_kd: bool, ctx: StageContext | None) -> TrainHooks:
    """Hooks for task term + feature_loss(student_feats, teacher_feats)."""
    students = StudentFeatures(student, [s for s, _ in pairs])
    runner = Teacher(teacher, [t for _, t in pairs])
    task = _task_loss(spec, use_kd, _label_smoothing(ctx))

    def loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        t_logits, t_feats = runner(inputs)
        return task(outputs, t_logits, targets) + feature_loss(students.take(inputs), t_feats)

    return TrainHooks(loss=loss, after_step=(students.after_step,), modules=(feature_loss,))


@DISTILL_METHODS.register("kd")
def build_kd(spec: DistillSpec, student: nn.Module, teacher: nn.Module, ctx: StageContext | None) -> TrainHooks:
    """Hinton KD: ``alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE``."""
    check_options("kd", spec.options)
    _check_models(student, teacher)
    kd = KDLoss(spec.temperature, spec.alpha, _label_smoothing(ctx))
    runner = Teacher(teacher, cache=bool(spec.options.get("cache", False)))

    def loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        teacher_logits, _ = runner(inputs)
        return kd(outputs, teacher_logits, targets)

    loss.teacher = runner  # type: ignore[attr-defined]  # exposes cache statistics
    return TrainHooks(loss=loss)


def _float_option(options: dict[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"distill option {key!r} must be a number, got {value!r}") from None
    if value < 0:
        raise ConfigError(f"distill option {key!r} must be >= 0, got {value!r}")
    return value


def _hint_loss(spec: DistillSpec, student: nn.Module, teacher: nn.Module,
               ctx: StageContext | None) -> tuple[list[tuple[str, str]], HintLoss]:
    """The checked (student, teacher) pairs and a FitNets hint loss sized for them."""
    check_options("hint", spec.options)
    _check_models(student, teacher)
    pairs = parse_pairs(spec.options.get("pairs"), "distill.options.pairs")
    x = _example_inputs(ctx, "hint")
    s_shapes = _probe_shapes(student, [s for s, _ in pairs], x, "student")
    t_shapes = _probe_shapes(teacher, [t for _, t in pairs], x, "teacher")
    return pairs, HintLoss(s_shapes, t_shapes)


@DISTILL_METHODS.register("hint")
def build_hint(spec: DistillSpec, student: nn.Module, teacher: nn.Module, ctx: StageContext | None) -> TrainHooks:
    """FitNets hooks: task term + ``weight`` x L2 between regressed student and teacher feature maps.

    With ``two_stage`` these are the hooks of the second stage, plain KD; the first stage
    (hints alone) is :func:`pretrain_hint`. Builds only: nothing is trained here.
    """
    opts = spec.options
    if opts.get("two_stage"):
        check_options("hint", opts)
        _check_models(student, teacher)
        return build_kd(spec.model_copy(update={"method": "kd", "options": {}}), student, teacher, ctx)
    pairs, hint = _hint_loss(spec, student, teacher, ctx)
    weighted = _Weighted(hint, _float_option(opts, "weight", 1.0))
    return _feature_hooks(spec, student, teacher, pairs, weighted, bool(opts.get("kd", False)), ctx)


class _Weighted(nn.Module):
    """``weight * loss(...)``, keeping the inner loss's parameters trainable."""

    def __init__(self, inner: nn.Module, weight: float) -> None:
        super().__init__()
        self.inner = inner
        self.weight = float(weight)

    def forward(self, *args: Any) -> torch.Tensor:
        return self.weight * self.inner(*args)


@DISTILL_PRETRAINING.register("hint")
def pretrain_hint(spec: DistillSpec, student: nn.Module, teacher: nn.Module, ctx: StageContext | None) -> None:
    """Stage 1 of FitNets (``two_stage``): train ``student`` in place on the hint loss alone.

    Only the layers up to the guided ones get gradient. It trains through ``ctx.finetune``
    (the run's kept hooks in force; a dry run's context trains nothing) for ``hint_epochs``
    (default: half of ``ctx.train_config.epochs``, at least 1).
    """
    if ctx is None:
        raise ConfigError("hint option two_stage trains the student first; it needs a stage context "
                          "(slimkit.finetune.training_context(data, train_config))")
    pairs, hint = _hint_loss(spec, student, teacher, ctx)
    epochs = spec.options.get("hint_epochs")
    if epochs is None:
        epochs = max(1, ctx.train_config.epochs // 2)
    if not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"distill option 'hint_epochs' must be a non-negative integer, got {epochs!r}")
    students = StudentFeatures(student, [s for s, _ in pairs])
    runner = Teacher(teacher, [t for _, t in pairs])

    def loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        _, t_feats = runner(inputs)
        return hint(students.take(inputs), t_feats)

    hooks = TrainHooks(loss=loss, after_step=(students.after_step,), modules=(hint,))
    ctx.finetune(student, hooks, epochs=epochs, config=ctx.train_config)
    students.tap.remove()


@DISTILL_METHODS.register("at")
def build_at(spec: DistillSpec, student: nn.Module, teacher: nn.Module, ctx: StageContext | None) -> TrainHooks:
    """Attention transfer (p = 2) between paired feature maps, plus the task term."""
    opts = spec.options
    check_options("at", opts)
    _check_models(student, teacher)
    pairs = parse_pairs(opts.get("pairs"), "distill.options.pairs")
    at = ATLoss(p=2.0, beta=_float_option(opts, "weight", 1000.0))
    return _feature_hooks(spec, student, teacher, pairs, at, bool(opts.get("kd", False)), ctx)


@DISTILL_METHODS.register("rkd")
def build_rkd(spec: DistillSpec, student: nn.Module, teacher: nn.Module, ctx: StageContext | None) -> TrainHooks:
    """Relational KD (distance + angle) on the logits or on paired embeddings, plus the task term."""
    opts = spec.options
    check_options("rkd", opts)
    _check_models(student, teacher)
    rkd = RKDLoss(_float_option(opts, "distance_weight", 25.0), _float_option(opts, "angle_weight", 50.0))
    use_kd = bool(opts.get("kd", False))
    if opts.get("pairs") is not None:
        return _feature_hooks(spec, student, teacher, parse_pairs(opts["pairs"], "distill.options.pairs"), rkd,
                              use_kd, ctx)
    runner = Teacher(teacher)
    task = _task_loss(spec, use_kd, _label_smoothing(ctx))

    def loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        t_logits, _ = runner(inputs)
        return task(outputs, t_logits, targets) + rkd([outputs], [t_logits])

    return TrainHooks(loss=loss)


def resolve_teacher(spec: DistillSpec, ctx: StageContext | None) -> nn.Module:
    """``teacher: baseline`` -> ``ctx.baseline``; any other value is a model file saved by slimkit."""
    if spec.teacher == "baseline":
        if ctx is None or ctx.baseline is None:
            raise ConfigError("distill teacher 'baseline' needs a stage context with the pre-compression model")
        return ctx.baseline
    from slimkit.manifest import load_model

    return load_model(spec.teacher)


def _pretrains(spec: DistillSpec) -> bool:
    return bool(spec.options.get("two_stage")) and spec.method in DISTILL_PRETRAINING


def build_hooks(spec: DistillSpec | dict, student: nn.Module, teacher: nn.Module | None = None,
                ctx: StageContext | None = None) -> TrainHooks:
    """Hooks for ``spec`` (a DistillSpec or its dict); the teacher defaults to :func:`resolve_teacher`.

    Builds only; a two-stage spec (its first stage trains) is refused: use
    :func:`prepare_distillation`.
    """
    spec = DistillSpec.coerce(spec, where="distill")
    if _pretrains(spec):
        raise ConfigError(f"distill method {spec.method!r} with two_stage trains the student before its hooks "
                          "apply; call slimkit.distill.prepare_distillation instead of build_hooks")
    teacher = teacher if teacher is not None else resolve_teacher(spec, ctx)
    return DISTILL_METHODS.get(spec.method)(spec, student, teacher, ctx)


def prepare_distillation(spec: DistillSpec | dict, student: nn.Module, teacher: nn.Module | None = None,
                         ctx: StageContext | None = None) -> TrainHooks:
    """Ready ``student`` for distillation by ``spec``; returns the hooks its training uses.

    A two-stage method (``two_stage: true`` for ``hint`` or ``fsp``) first runs its
    registered pre-training, which trains ``student`` in place through ``ctx.finetune``;
    every other method only builds hooks. The teacher defaults to :func:`resolve_teacher`.
    """
    spec = DistillSpec.coerce(spec, where="distill")
    teacher = teacher if teacher is not None else resolve_teacher(spec, ctx)
    if _pretrains(spec):
        DISTILL_PRETRAINING.get(spec.method)(spec, student, teacher, ctx)
    return DISTILL_METHODS.get(spec.method)(spec, student, teacher, ctx)
