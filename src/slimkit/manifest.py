"""Saving and loading models whose architecture a transform changed.

Pruning removes channels, decomposition replaces one conv by a chain, binarization swaps
layer classes: a plain ``state_dict`` of the original class no longer fits. A saved model
is therefore a *manifest* plus a state dict, in one file readable with
``torch.load(weights_only=True)`` (no pickled code):

- ``arch``: how to build the original skeleton (a zoo name with ``num_classes`` and
  ``in_channels``), or None when the caller supplies the skeleton;
- ``modules``: for every module, in ``named_modules`` order, its class and constructor
  arguments (for the layer types listed in :data:`MODULE_SPECS`), or just its class name;
- ``state_dict``: the weights and buffers (masks included).

Loading builds the skeleton, replaces every module whose recorded spec differs, adds the
buffers the transforms registered, and loads the state dict strictly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.atomic import atomic_open
from slimkit.exceptions import ConfigError, CorruptFileError

FORMAT = "slimkit-model"
VERSION = 1

SpecFn = Callable[[nn.Module], dict[str, Any]]

#: class -> function returning the keyword arguments that rebuild an equivalent module.
MODULE_SPECS: dict[type[nn.Module], SpecFn] = {}


def register_module_spec(cls: type[nn.Module], to_args: SpecFn | None = None) -> None:
    """Teach the manifest how to rebuild ``cls``: ``cls(**to_args(module))``.

    Without ``to_args`` the module must provide ``spec_args() -> dict``.
    """
    MODULE_SPECS[cls] = to_args or (lambda m: m.spec_args())


def _conv_args(m: nn.Conv2d) -> dict[str, Any]:
    return dict(
        in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=tuple(m.kernel_size),
        stride=tuple(m.stride), padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
        dilation=tuple(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
    )


def _bn_args(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


for _cls in (nn.Conv1d, nn.Conv2d):
    register_module_spec(_cls, _conv_args)
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d):
    register_module_spec(_cls, _bn_args)
register_module_spec(nn.Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                               bias=m.bias is not None))
register_module_spec(nn.GroupNorm, lambda m: dict(num_groups=m.num_groups, num_channels=m.num_channels,
                                                  eps=m.eps, affine=m.affine))
register_module_spec(nn.PReLU, lambda m: dict(num_parameters=m.num_parameters))
register_module_spec(nn.LayerNorm, lambda m: dict(normalized_shape=tuple(m.normalized_shape), eps=m.eps,
                                                  elementwise_affine=m.elementwise_affine,
                                                  bias=getattr(m, "bias", None) is not None))
register_module_spec(nn.Sequential, lambda m: {})
register_module_spec(nn.Identity, lambda m: {})


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_manifest(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per module (root excluded): name, class and, where known, its args."""
    entries = []
    for name, module in model.named_modules():
        if not name:
            continue
        spec_fn = MODULE_SPECS.get(type(module))
        entry: dict[str, Any] = {"name": name, "type": _qualname(type(module))}
        if spec_fn is not None:
            entry["args"] = spec_fn(module)
        entries.append(entry)
    return entries


def _class_for(qualname: str) -> type[nn.Module]:
    for cls in MODULE_SPECS:
        if _qualname(cls) == qualname:
            return cls
    raise CorruptFileError(
        f"saved model uses module class {qualname} that slimkit cannot rebuild; "
        "import the module that registers it (register_module_spec) before loading"
    )


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and leaf.isdigit() and int(leaf) == len(parent):
        parent.append(module)
    else:
        setattr(parent, leaf, module)


def rebuild(skeleton: nn.Module, entries: list[dict[str, Any]]) -> nn.Module:
    """Make ``skeleton``'s module tree match a manifest, replacing modules in place."""
    current = dict(skeleton.named_modules())
    for entry in entries:
        name, qualname = entry["name"], entry["type"]
        existing = current.get(name)
        same_class = existing is not None and _qualname(type(existing)) == qualname
        if same_class and ("args" not in entry or MODULE_SPECS[type(existing)](existing) == entry["args"]):
            continue
        if "args" not in entry:
            raise CorruptFileError(
                f"saved model has a {qualname} at {name!r} that the skeleton lacks; "
                "load with the model class that produced it (model=skeleton)"
            )
        module = _class_for(qualname)(**entry["args"])
        _set_module(skeleton, name, module)
        current = dict(skeleton.named_modules())
    return skeleton


def _add_missing_buffers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    have = model.state_dict()
    for key, tensor in state.items():
        if key in have:
            continue
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner.register_buffer(leaf, torch.empty_like(tensor))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (temporary file beside ``path``, then rename)."""
    with atomic_open(path) as handle:
        torch.save(obj, handle)
    return Path(path)


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (any architecture a transform produced) atomically to ``path``.

    ``extra`` is stored alongside (plain data only: str, numbers, lists, dicts, tensors).
    """
    from slimkit.models import arch_of

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch_of(model),
        "modules": module_manifest(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    return atomic_save(payload, path)


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The raw saved dict, validated; CorruptFileError for anything not a slimkit model."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip
        raise CorruptFileError(f"{path}: not a readable slimkit model file ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CorruptFileError(f"{path}: not a slimkit model file (no '{FORMAT}' header)")
    if payload.get("version", 0) > VERSION:
        raise CorruptFileError(f"{path}: format version {payload['version']} is newer than this slimkit ({VERSION})")
    return payload


def load_model(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_model`.

    Zoo models are rebuilt by name; any other model needs ``model=skeleton`` (an instance
    of the original, unpruned class). Returns the model in eval mode.
    """
    payload = read_payload(path)
    return restore(path, payload.get("arch"), payload["modules"], payload["state_dict"], model)


def restore(source: str | os.PathLike, arch: dict[str, Any] | None, modules: list[dict[str, Any]],
            state: dict[str, torch.Tensor], model: nn.Module | None = None) -> nn.Module:
    """Build the skeleton (by zoo name, or ``model``), apply the manifest, load ``state``.

    Shared by every slimkit file format; ``source`` names the file in error messages.
    Tensors stored in another dtype than the model's (e.g. decoded weights) are cast.
    """
    from slimkit.models import create_model

    if model is None:
        if not arch:
            raise ConfigError(f"{source}: the model is not from the zoo; pass model=<an instance of its class>")
        model = create_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"])
    rebuild(model, modules)
    _add_missing_buffers(model, state)
    expected = model.state_dict()
    state = {k: v.to(expected[k].dtype) if k in expected and expected[k].dtype != v.dtype else v
             for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).strip().splitlines()[0:2])
        raise CorruptFileError(f"{source}: weights do not fit the rebuilt model: {first}") from None
    return model.eval()
