"""The model zoo and every other model source, made by one factory (:func:`create_model`).

>>> from slimkit.models import create_model
>>> model = create_model("lenet5", num_classes=10, in_channels=1)
>>> sum(p.numel() for p in model.parameters())
431080
>>> arch_of(model)
{'name': 'lenet5', 'num_classes': 10, 'in_channels': 1}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.registry import Registry

#: name -> builder(num_classes, in_channels) returning an nn.Module.
MODELS: Registry[Callable[..., nn.Module]] = Registry(
    "model", lazy_modules=("slimkit.models.classic", "slimkit.models.cifar", "slimkit.models.torchvision_zoo",
                      "slimkit.models.plain", "slimkit.models.literature")
)

_ARCH_ATTR = "slimkit_arch"


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build the model that ``name`` spells, for ``num_classes`` outputs and ``in_channels`` inputs.

    ``name``: a zoo name, ``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:callable`` or
    ``package.module:callable`` (:mod:`slimkit.models.sources`); ``kwargs`` go to the builder
    (the recipe's ``model_args``). No pretrained weights are fetched. The model remembers how
    it was built (:func:`arch_of`) so saved files can rebuild it from the same spelling.
    """
    from slimkit.models.sources import build_from_source, parse_source

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer, got {in_channels!r}")
    source = parse_source(name)
    if source.kind == "zoo":
        model = MODELS.get(source.name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
    else:
        model = build_from_source(source, num_classes, in_channels, kwargs)
    arch: dict[str, Any] = {"name": source.spelling, "num_classes": num_classes, "in_channels": in_channels}
    if kwargs:
        arch["args"] = dict(kwargs)
    setattr(model, _ARCH_ATTR, arch)
    return model


def arch_of(model: nn.Module) -> dict[str, Any] | None:
    """How ``model`` was built by :func:`create_model` (``name``: the source spelling, ``num_classes``,
    ``in_channels``, ``args`` when it had keyword arguments), or None for a model from elsewhere."""
    arch = getattr(model, _ARCH_ATTR, None)
    return dict(arch) if arch else None


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob, e.g. ``list_models("resnet*")``."""
    return MODELS.names(pattern)
