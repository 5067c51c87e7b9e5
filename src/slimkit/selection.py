"""Choosing layers by qualified name: glob patterns in, module names out.

Transforms address layers by their names (``features.3.conv``), never by module objects,
so selections can live in YAML. A selection that matches nothing is an error.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from torch import nn

from slimkit.exceptions import ConfigError


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True when ``name`` matches any glob in ``patterns``."""
    return (not isinstance(patterns, str) and "*" in patterns) or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_modules(
    model: nn.Module,
    types: tuple[type[nn.Module], ...],
    layers: Sequence[str] = ("*",),
    ignore: Sequence[str] = (),
    what: str = "layers",
) -> dict[str, nn.Module]:
    """Modules of ``types`` whose names match ``layers`` and none of ``ignore``, in order.

    Raises ConfigError naming the patterns when nothing matches.
    """
    chosen = {
        name: module
        for name, module in model.named_modules()
        if name and isinstance(module, types) and matches(name, layers) and not matches(name, ignore)
    }
    if not chosen:
        kinds = "/".join(t.__name__ for t in types)
        raise ConfigError(
            f"{what}: no {kinds} module matches layers={list(layers)} minus ignore={list(ignore)}; "
            "list the model's modules with `slimkit profile --layers` and fix the patterns"
        )
    return chosen


def classifier_name(model: nn.Module, modules: Mapping[str, nn.Module] | None = None) -> str:
    """Qualified name of the last Linear (or last Conv when there is no Linear) module; ``modules``:
    ``dict(model.named_modules())`` when the caller has it."""
    last_linear = last_conv = ""
    for name, module in (model.named_modules() if modules is None else modules.items()):
        if isinstance(module, nn.Linear):
            last_linear = name
        elif isinstance(module, nn.Conv2d):
            last_conv = name
    return last_linear or last_conv


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``root``'s submodule ``name`` (a qualified name, e.g. ``features.3``) is."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)
