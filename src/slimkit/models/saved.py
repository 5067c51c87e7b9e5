"""Opening what slimkit wrote, with the data it was trained on: what ``eval``, ``profile`` and
``decode`` share.

A model file slimkit wrote (``model.pt``, ``models/NN-<stage>.pt``, a ``.slim``
container) records its source and its data spec (:mod:`slimkit.manifest`), so it opens
with no other information; a plain state dict needs its model source (``--model``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from slimkit.exceptions import ConfigError


def parse_model_args(pairs: list[str] | None) -> dict[str, Any]:
    """``["width=8", "widths=[4, 8]"]`` -> ``{"width": 8, "widths": [4, 8]}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--model-arg {pair!r}: expected KEY=VALUE with KEY a keyword argument, e.g. width=8")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--model-arg {pair!r}: the value {value!r} is not valid YAML; quote it") from None
    return out


def open_model(path: str | os.PathLike, source: str | None = None, model_args: dict[str, Any] | None = None,
               num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The model in ``path``, in eval mode.

    Without ``source``: a model file slimkit wrote (``.pt`` or ``.slim``), rebuilt from its
    recorded source. With ``source`` (a model spelling): that model built for
    ``num_classes`` / ``in_channels`` with the state dict or checkpoint in ``path`` loaded.
    """
    from slimkit.manifest import load_model

    if source is None:
        return load_model(path)
    from slimkit.models import create_model
    from slimkit.models.weights import load_weights

    model = create_model(source, num_classes=num_classes, in_channels=in_channels, **(model_args or {}))
    return load_weights(model, path, source).eval()


def model_data(model: nn.Module, what: str, data: str | None = None, data_dir: str | None = None,
               image_size: int | None = None) -> Any:
    """The :class:`~slimkit.data.DataBundle` to evaluate ``model`` on, checked against it.

    Each of ``data``, ``data_dir`` and ``image_size`` defaults to what the model recorded
    (``digits`` for a model that recorded nothing). A model that does not fit the data
    (input shape, classes, normalisation) raises one ConfigError line naming both.
    """
    from slimkit.data import load_data
    from slimkit.manifest import check_data_fits, data_spec_of

    spec = data_spec_of(model) or {}
    name = data or spec.get("dataset") or "digits"
    same = data is None or data == spec.get("dataset")
    size = image_size if image_size is not None else (spec.get("image_size") if same else None)
    root = data_dir if data_dir is not None else spec.get("data_dir")
    if data is None and spec.get("dataset", "").startswith("imagefolder:"):
        folder = spec["dataset"].partition(":")[2]
        if not Path(folder).is_dir():
            raise ConfigError(f"{what} was trained on the image folder {folder}, which is not there any more; "
                              "pass --data imagefolder:PATH")
    bundle = load_data(name, data_dir=root, image_size=size)
    check_data_fits(model, bundle, what)
    return bundle


def decoded_path(slim_file: str | os.PathLike) -> Path:
    """Where ``slimkit decode FILE`` writes without ``-o``: ``model.slim`` -> ``model.decoded.pt``."""
    path = Path(slim_file)
    return path.with_name(f"{path.stem}.decoded.pt")
