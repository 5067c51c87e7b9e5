"""What ``slimkit stages`` and ``slimkit models`` print: the registries, described from their own entries.

A stage kind is listed with its config fields (type, default, description) read from its
pydantic config class, so the listing cannot drift from what a recipe accepts:

>>> from slimkit.stages import STAGES
>>> print(describe_stage(STAGES.get("sparse-train")).splitlines()[0])
sparse-train: Sparse training: the stage's fine-tune runs with an L1-on-gamma or group-lasso penalty.
>>> "lam: float = 1e-05" in describe_stage(STAGES.get("sparse-train"))
True
"""

from __future__ import annotations

import inspect
from typing import Any

from pydantic_core import PydanticUndefined

#: square input sizes a zoo model is tried at (on the meta device: no memory, no compute) to say what it accepts
_SIZES = (16, 28, 32, 224)


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if getattr(annotation, "__args__", None) is None else None
    text = text or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        return repr(field.default_factory())
    if field.default is PydanticUndefined:
        return "(required)"
    value = field.default
    if hasattr(value, "model_dump"):
        return repr(value.model_dump())
    return repr(value)


def describe_stage(spec: Any) -> str:
    """A stage kind as text: ``kind: what it does`` and one line per config field with its default."""
    lines = [f"{spec.name}: {spec.doc}"]
    fields = spec.config_cls.model_fields
    if not fields:
        lines.append("  (no settings)")
    for name, field in fields.items():
        line = f"  {name}: {_type_name(field.annotation)} = {_default(field)}"
        if field.description:
            line += f"  # {field.description}"
        lines.append(line)
    return "\n".join(lines)


def _builder_defaults(builder: Any) -> dict[str, Any]:
    params = inspect.signature(builder).parameters
    return {k: params[k].default for k in ("num_classes", "in_channels")
            if k in params and params[k].default is not inspect.Parameter.empty}


def _input_text(model: Any, channels: int) -> str:
    import torch

    model.eval()
    fits = []
    with torch.no_grad():
        for size in _SIZES:
            try:
                model(torch.zeros(1, channels, size, size, device="meta"))
                fits.append(size)
            except Exception:  # noqa: BLE001 - any failure means "does not take this size"
                continue
    if not fits:
        return f"[N, {channels}, H, W]"
    if len(fits) == 1:
        return f"[N, {channels}, {fits[0]}, {fits[0]}] only"
    if fits[-1] == _SIZES[-1] and fits == list(_SIZES[_SIZES.index(fits[0]):]):
        return f"[N, {channels}, H, W], H and W >= {fits[0]}"
    return f"[N, {channels}, H, W] with H = W in {fits}"


def describe_models(names: list[str]) -> str:
    """One line per zoo model: parameters at its builder's defaults, and the input it accepts."""
    import torch

    from slimkit.models import MODELS

    rows = []
    for name in names:
        builder = MODELS.get(name)
        defaults = _builder_defaults(builder)
        channels = int(defaults.get("in_channels", 3))
        with torch.device("meta"):
            model = builder(**defaults)
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, f"{params:,}", str(defaults.get("num_classes", "")), _input_text(model, channels)))
    head = ("model", "params", "classes", "input (channels and classes adapt to the data)")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = [f"{head[0]:<{widths[0]}}  {head[1]:>{widths[1]}}  {head[2]:>{widths[2]}}  {head[3]}"]
    lines += [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
    lines += ["", "Besides the zoo, --model and recipe model: take torchvision:NAME, timm:NAME, "
              "path/to/file.py:callable and package.module:callable."]
    return "\n".join(lines)
