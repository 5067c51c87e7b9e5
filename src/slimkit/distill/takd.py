"""Teacher-assistant knowledge distillation (Mirzadeh et al. 2020, *Improved Knowledge
Distillation via Teacher Assistant*).

When the gap between teacher and student is large, KD works better through one or more
intermediate "assistants": the teacher teaches the assistant, which then teaches the
student. :func:`takd_chain` trains such a chain with any distillation method;
:func:`size_assistant` picks an assistant automatically: a plain CNN (the paper's family,
:mod:`slimkit.models.plain`) of the student's layout, widened until its parameter count
is the geometric mean of the teacher's and the student's (with several assistants, the
counts are spaced geometrically between the two).

>>> from slimkit.models import create_model
>>> teacher = create_model("lenet5", num_classes=10, in_channels=1)
>>> size_assistant(teacher, "plaincnn-4-8", num_classes=10, in_channels=1)
'plaincnn-30-61'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.distill.spec import DistillSpec
from slimkit.exceptions import ConfigError
from slimkit.measure.size import count_params  # the one parameter counter (also imported from here)
from slimkit.stages import StageContext
from slimkit.train import TrainConfig, evaluate


def build_student(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A fresh zoo model: any registered name, or ``plaincnn-<w1>-<w2>...`` with explicit widths."""
    from slimkit.models import create_model
    from slimkit.models.plain import parse_plain_name, plain_cnn

    if parse_plain_name(name) is not None:
        return plain_cnn(name, num_classes=num_classes, in_channels=in_channels)
    return create_model(name, num_classes=num_classes, in_channels=in_channels)


def _plain_depth(model: nn.Module) -> int | None:
    from slimkit.models.plain import PlainCNN

    if isinstance(model, PlainCNN):
        return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))
    return None


def _widths_for(base: tuple[int, ...], target_params: float, num_classes: int, in_channels: int) -> tuple[int, ...]:
    """``base`` scaled by one factor so the plain CNN's parameter count is closest to the target."""
    from slimkit.models.plain import PlainCNN

    def params(m: float) -> int:
        widths = tuple(max(1, round(w * m)) for w in base)
        return count_params(PlainCNN(widths, num_classes=num_classes, in_channels=in_channels))

    lo, hi = 1e-3, 1.0
    while params(hi) < target_params and hi < 1e4:
        hi *= 2
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if params(mid) < target_params else (lo, mid)
    best = min((lo, hi), key=lambda m: abs(math.log(params(m) / target_params)))
    return tuple(max(1, round(w * best)) for w in base)


def size_assistants(teacher: nn.Module, student: str, num_classes: int, in_channels: int,
                    count: int = 1) -> list[str]:
    """``count`` plain-CNN assistant names between ``teacher`` and the plain student, teacher side first.

    Assistant i of k has about ``P_t^(1 - i/(k+1)) * P_s^(i/(k+1))`` parameters (geometric
    spacing). Its depth is the student's, or halfway to the teacher's when the teacher is
    a plain CNN too.
    """
    from slimkit.models.plain import default_widths, parse_plain_name, plain_name

    widths = parse_plain_name(student)
    if widths is None:
        raise ConfigError(
            f"automatic assistants are plain CNNs sized from a plain CNN student; got student {student!r}; "
            "name the assistants explicitly (assistants: [<zoo name>, ...]) or use a plaincnn-<widths> student"
        )
    if count < 1:
        raise ConfigError(f"number of assistants must be >= 1, got {count!r}")
    p_t = count_params(teacher)
    p_s = count_params(build_student(student, num_classes, in_channels))
    if p_t <= p_s:
        raise ConfigError(f"the teacher ({p_t} params) is not larger than the student {student!r} ({p_s} params)")
    d_t, d_s = _plain_depth(teacher), len(widths)
    names = []
    for i in range(1, count + 1):
        frac = i / (count + 1)
        target = p_t ** (1 - frac) * p_s**frac
        depth = d_s if d_t is None else max(2, round(d_t + (d_s - d_t) * frac))
        base = widths if depth == d_s else tuple(w * widths[0] / default_widths(d_s)[0]
                                                 for w in default_widths(depth))
        if len(base) == 1:
            base = (base[0], base[0])
        names.append(plain_name(_widths_for(tuple(base), target, num_classes, in_channels)))
    return names


def size_assistant(teacher: nn.Module, student: str, num_classes: int, in_channels: int) -> str:
    """One assistant between ``teacher`` and ``student`` (see :func:`size_assistants`)."""
    return size_assistants(teacher, student, num_classes, in_channels, 1)[0]


@dataclass
class ChainMember:
    """One model of a TAKD chain with its figures."""

    role: str  # teacher | assistant | student
    name: str
    model: nn.Module = field(repr=False)
    accuracy: float | None = None
    params: int = 0
    macs: int | None = None

    def row(self) -> dict[str, Any]:
        return {"role": self.role, "name": self.name, "accuracy": self.accuracy, "params": self.params,
                "macs": self.macs}


def _macs(model: nn.Module, example_inputs: torch.Tensor | None) -> int | None:
    if example_inputs is None:
        return None
    try:
        from slimkit.measure import count_macs
    except ImportError:  # measurement package not available
        return None
    return int(count_macs(model, example_inputs))


def takd_chain(teacher: nn.Module, names: list[str], data: Any, train_config: TrainConfig | dict,
               spec: DistillSpec | dict | None = None, *, teacher_name: str = "teacher",
               example_inputs: torch.Tensor | None = None, progress: bool = False,
               checkpoint_dir: Any = None, ctx: StageContext | None = None) -> list[ChainMember]:
    """Train ``names`` (assistants, then the student) in turn, each taught by the previous one.

    ``data`` is a bundle with ``.train``, ``.test``, ``.num_classes``, ``.in_channels``
    (and ``.input_shape`` when ``example_inputs`` is not given); ``spec`` (default plain KD,
    T = 4, alpha = 0.9) is the distillation used at every link, with ``train_config``.
    Every link trains through the ``finetune`` of a real :class:`~slimkit.stages.StageContext`
    and is scored by its ``evaluate``: ``ctx``'s when given (the ``takd`` stage passes its own,
    so a dry run trains nothing), else a :func:`slimkit.finetune.training_context` over
    ``data``, checkpointed to ``checkpoint_dir`` when given. Each new model is built from
    ``train_config.seed + i`` so a chain is reproducible. Returns the chain, teacher first,
    with test accuracy, parameters and MACs of every member.
    """
    import dataclasses
    from pathlib import Path

    from slimkit.distill.methods import prepare_distillation
    from slimkit.finetune import training_context

    if not names:
        raise ConfigError("a TAKD chain needs at least the student's name")
    cfg = TrainConfig.coerce(train_config, where="train")
    spec = DistillSpec.coerce(spec or {}, where="distill")
    score = ctx.evaluate if ctx is not None else (lambda m: evaluate(m, data.test))
    chain = [ChainMember("teacher", teacher_name, teacher, score(teacher), count_params(teacher),
                         _macs(teacher, example_inputs))]
    for i, name in enumerate(names):
        torch.manual_seed(cfg.seed + i)
        student = build_student(name, data.num_classes, data.in_channels)
        role = "student" if i == len(names) - 1 else "assistant"
        if ctx is not None:
            link = dataclasses.replace(ctx, train_config=cfg, baseline=chain[-1].model)
        else:
            stem = Path(checkpoint_dir) / f"takd-{i:02d}" if checkpoint_dir is not None else None
            link = training_context(data, cfg, example_inputs=example_inputs, baseline=chain[-1].model,
                                    checkpoint_stem=stem, progress=progress, desc=f"takd {role} {name}")
        hooks = prepare_distillation(spec, student, chain[-1].model, link)
        link.finetune(student, hooks, config=cfg)
        student.eval()
        chain.append(ChainMember(role, name, student, score(student), count_params(student),
                                 _macs(student, example_inputs)))
    return chain
