"""``slimkit export MODEL|RUN_DIR --format FORMAT [-o PATH] [--check]``, as a function.

``MODEL`` is a model file slimkit wrote (``model.pt``, ``models/NN-<stage>.pt``, a
``.slim``); ``RUN_DIR`` a run directory (its final ``model.pt``). The data the model
recorded (:mod:`slimkit.manifest`; ``digits`` when it recorded none) gives the input shape,
the calibration batches of int8 formats and, with ``check``, the test set the written file
runs on in its engine beside the PyTorch model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimkit.deploy.formats import FORMATS, check_export, default_path, export_model
from slimkit.deploy.results import CheckResult, Exported
from slimkit.exceptions import ConfigError


@dataclass(frozen=True)
class ExportOutcome:
    """What ``slimkit export`` did: the file written and, with ``--check``, how it ran."""

    exported: Exported
    check: CheckResult | None = None

    def lines(self) -> list[str]:
        e = self.exported
        out = [f"wrote {e.path} ({e.bytes:,} bytes, {e.format}; runs in {e.engine}): {e.how}"]
        if self.check is not None:
            out.append(self.check.line())
        return out


def resolve_target(target: str | os.PathLike) -> tuple[Path, Path | None]:
    """(model file, run directory or None) for a model file or a run directory."""
    path = Path(target)
    if path.is_dir():
        model = path / "model.pt"
        if not model.is_file():
            raise ConfigError(f"{path} is a directory without model.pt; give a finished run directory "
                              "(slimkit compress --out DIR writes DIR/model.pt) or a model file")
        return model, path
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give a model file slimkit wrote (model.pt, .slim) or a run "
                          "directory")
    run = path.parent if path.name == "model.pt" and (path.parent / "report.json").is_file() else None
    return path, run


def _recorded_shape(model: nn.Module) -> list[int] | None:
    from slimkit.manifest import data_spec_of

    spec = data_spec_of(model)
    return list(spec["input_shape"]) if spec and spec.get("input_shape") else None


def run_export(target: str | os.PathLike, fmt: str, output: str | os.PathLike | None = None, check: bool = False,
               data: str | None = None, data_dir: str | None = None, image_size: int | None = None) -> ExportOutcome:
    """Write ``target``'s model as ``fmt`` (default path: beside the model file, the format's suffix)."""
    from slimkit.manifest import load_model

    spec = FORMATS.get(fmt)
    model_path, run_dir = resolve_target(target)
    model = load_model(model_path)
    what = str(model_path)
    shape = _recorded_shape(model) if data is None and image_size is None else None
    bundle = None
    if check or spec.needs_calibration or shape is None:
        from slimkit.models.saved import model_data

        bundle = model_data(model, what, data, data_dir, image_size)
        shape = list(bundle.input_shape)
    example = torch.zeros(1, *shape)
    calibration: list[torch.Tensor] = []
    if spec.needs_calibration:
        from slimkit.quantize.uniform import QuantConfig, calibration_batches

        calibration = list(calibration_batches(bundle.train, QuantConfig()))
    path = Path(output) if output is not None else default_path(model_path, spec.name)
    if path.is_dir() or str(output or "").endswith(("/", os.sep)):  # -o DIR/: the default name inside it
        path = default_path(path / model_path.name, spec.name)
    existing = run_dir / f"model{spec.suffix}" if run_dir is not None else None
    try:
        exported = export_model(model, spec.name, path, example, calibration, existing)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}; pass -o with a writable path") from None
    result = check_export(exported, model, bundle.test, bundle.name, example) if check else None
    return ExportOutcome(exported, result)
