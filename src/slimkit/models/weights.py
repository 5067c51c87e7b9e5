"""Trained weights from a file: ``--weights FILE`` (recipe ``weights:``).

A weights file is a state dict (``torch.save(model.state_dict(), PATH)``), a checkpoint
dict that holds one (under ``state_dict``, ``model_state_dict``, ``model`` or
``state``), or a model file slimkit wrote. It is read with
``torch.load(weights_only=True)``: a file holding pickled code (a whole ``nn.Module``
saved with ``torch.save(model)``) or a TorchScript archive is refused with one line that
says what to pass instead; slimkit never unpickles code.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.exceptions import ConfigError

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "state")
_SAVE_HINT = "save the weights with torch.save(model.state_dict(), PATH) and pass that file"


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith(("/constants.pkl", "/code/__torch__.py")) or "/code/" in n for n in archive.namelist())


def read_weights_file(path: str | os.PathLike, what: str = "weights file") -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    if _is_torchscript(path):
        raise ConfigError(f"{path} is a TorchScript archive (torch.jit.save); slimkit needs weights, not compiled "
                          f"code: {_SAVE_HINT}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle damage surfaces as many types; a refused global as UnpicklingError
        if not isinstance(err, pickle.UnpicklingError) and "Weights only load failed" not in str(err):
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise ConfigError(f"{path} is not a readable PyTorch weights file ({type(err).__name__}: "
                              f"{reason})") from None
        # torch's message recommends weights_only=False, the unsafe option; name the object instead
        found = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"Unsupported class ([\w.]+)", str(err))
        holds = f" ({found.group(1)})" if found else ""
        raise ConfigError(f"{path} holds a pickled Python object{holds}, not plain tensors; slimkit never "
                          f"unpickles code: {_SAVE_HINT}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def state_dict_from(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside what a weights file held (see the module docstring)."""
    if isinstance(obj, dict) and obj.get("format") == "slimkit-model":
        obj = obj.get("state_dict")
    elif isinstance(obj, dict) and not _is_state_dict(obj):
        obj = next((obj[k] for k in _STATE_KEYS if _is_state_dict(obj.get(k))), obj)
    if not _is_state_dict(obj):
        kind = f"a dict with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, dict) else \
            f"a {type(obj).__name__}"
        raise ConfigError(f"{source} holds {kind}, not a state dict (name -> tensor) or a checkpoint with one "
                          f"under {'/'.join(_STATE_KEYS)}; {_SAVE_HINT}")
    if all(k.startswith("module.") for k in obj):  # saved from a DataParallel / DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _listed(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str, target: str) -> None:
    """Load ``state`` into ``model`` strictly; one ConfigError line listing missing, unexpected and
    wrongly shaped keys. Tensors are cast to the model's dtypes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_listed(unexpected)}")
        if shapes:
            parts.append(f"wrong shape (file vs model) {len(shapes)}: {_listed(shapes, 2)}")
        raise ConfigError(f"weights {source} do not fit {target}: {'; '.join(parts)}; pass the weights of this "
                          "architecture (same model source, model_args, classes and input channels)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def load_weights(model: nn.Module, path: str | os.PathLike, target: str | None = None) -> nn.Module:
    """Load the weights in ``path`` (state dict, checkpoint or slimkit model file) into ``model``.

    Mutates and returns ``model``. ``target`` names the model in errors (default: its class).
    """
    state = state_dict_from(read_weights_file(path), str(path))
    fit_state_dict(model, state, str(path), target or type(model).__name__)
    return model
