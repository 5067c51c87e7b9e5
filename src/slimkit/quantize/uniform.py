"""Uniform (linear) quantization: ``quantize_(model, example_inputs, config, calibration=...)`` post-training.

Folds batch norm into the preceding convolutions, replaces the selected ``Conv2d`` and
``Linear`` layers by fake-quantized ones (:mod:`slimkit.quantize.fake`), derives each
weight grid with an observer (per channel or per tensor, symmetric or asymmetric, 2-8 bits,
per-layer bit widths by name glob) and calibrates the input-activation grids on a few
batches (Krishnamoorthi 2018; Jacob et al. 2018). The model stays a float model that
*simulates* the integers (``phase: simulated``); :func:`slimkit.export.export_onnx` turns it
into an ONNX QDQ model that ONNX Runtime executes in int8.

>>> import torch
>>> from torch import nn
>>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
>>> x = torch.randn(16, 1, 8, 8)
>>> report = quantize_(m, x, {"bits": 8, "overrides": {"4": 4}, "reduce_range": False}, calibration=[x])
>>> report.layers["0"]["bits"], report.layers["4"]["bits"], report.folded_bn, report.changed
(8, 4, ['0'], ['0', '4'])
>>> report.after.bytes < report.before.bytes / 3  # bit-packed codes + float16 scales
True
>>> x3 = torch.randn(4, 3)
>>> quantize_(nn.Sequential(nn.Linear(3, 2)), x3, {"reduce_range": True}, calibration=[x3]).layers["0"]["bits"]
7
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit.config import Config
from slimkit.exceptions import ConfigError
from slimkit.quantize.fake import QuantConv2d, QuantLinear, QuantMixin, quant_layers
from slimkit.quantize.fold import fold_bn_
from slimkit.quantize.observers import make_observer
from slimkit.reports import ModelSize, Report
from slimkit.selection import matches, replace_module, select_modules

ObserverName = Literal["minmax", "ema", "percentile", "mse"]


class QuantConfig(Config):
    """Post-training uniform quantization.

    ``bits``: weight bits (2-8); ``overrides``: ``{glob: bits}`` per-layer widths, first
    matching glob wins (mixed precision). ``act_bits``: input-activation bits (8 runs as real
    int8 in ONNX Runtime; lower is simulated; null disables). ``observer`` calibrates
    activations, ``weight_observer`` chooses weight grids. ``reduce_range``: 8-bit symmetric
    weights use the 7-bit range ``[-63, 63]`` (still stored as int8) so that int8 kernels
    without VNNI cannot saturate (:mod:`slimkit.quantize.cpu`); ``auto`` decides for the CPU
    quantizing. ``scale_dtype``: weight scales are rounded up to float16 and stored in 2 bytes
    (``float32``: kept exact, 4 bytes).
    """

    bits: int = Field(8, ge=2, le=8, description="weight bit width")
    act_bits: int | None = Field(8, ge=2, le=8, description="activation bit width (null: float activations)")
    per_channel: bool = True
    symmetric: bool = True
    act_symmetric: bool = False
    observer: ObserverName = "minmax"
    weight_observer: ObserverName = "minmax"
    percentile: float = Field(99.99, gt=50, le=100)
    calibration_batches: int = Field(8, ge=1)
    calibration_batch_size: int = Field(64, ge=1)
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    overrides: dict[str, int] = Field(default_factory=dict, description="glob -> weight bits")
    fold_bn: bool = True
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="8-bit symmetric weights on a 7-bit grid (auto: where int8 pair sums saturate)")
    scale_dtype: Literal["float16", "float32"] = Field("float16", description="how weight scales are stored")

    @field_validator("reduce_range", mode="before")
    @classmethod
    def _check_reduce_range(cls, value):
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError("must be true, false or auto")

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, value: dict[str, int]) -> dict[str, int]:
        for glob, bits in value.items():
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"bits for {glob!r} must be an integer in [2, 8], got {bits!r}")
        return value


def bits_for(name: str, config: QuantConfig) -> int:
    """Weight bits of layer ``name``: the first matching override, else ``config.bits``."""
    for glob, bits in config.overrides.items():
        if matches(name, (glob,)):
            return bits
    return config.bits


def _observer_options(name: str, config: QuantConfig) -> dict:
    return {"percentile": config.percentile} if name == "percentile" else {}


def calibration_batches(source, config: QuantConfig) -> Iterable[torch.Tensor]:
    """Input tensors from a Dataset (first samples, in order), a DataLoader, or an iterable of tensors."""
    if isinstance(source, Dataset):
        source = DataLoader(source, batch_size=config.calibration_batch_size, shuffle=False)
    for index, batch in enumerate(source):
        if index >= config.calibration_batches:
            break
        yield batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def calibrate_(model: nn.Module, *, calibration: Iterable[torch.Tensor], observer: str = "minmax", **options) -> int:
    """Run the ``calibration`` batches through ``model`` (eval) and set every quantized layer's
    activation grid with a fresh ``observer``; returns how many batches ran (ConfigError on none)."""
    layers = quant_layers(model)
    for layer in layers.values():
        layer.calibrating = True
        layer.act_observer = make_observer(observer, **options) if layer.act_bits else None
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for inputs in calibration:
            model(inputs)
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        for layer in layers.values():
            layer.calibrating, layer.act_observer = False, None
        raise ConfigError("calibration data gave no batches; pass a non-empty dataset or list of input tensors")
    for layer in layers.values():
        layer.finish_calibration()
    return seen


def resolve_reduce_range(config: QuantConfig) -> tuple[bool, str]:
    """(whether 8-bit symmetric weights use the 7-bit range, why) for ``config.reduce_range``."""
    if config.reduce_range != "auto":
        return bool(config.reduce_range), f"reduce_range: {str(config.reduce_range).lower()} (set in the config)"
    from slimkit.quantize.cpu import int8_dot_saturates

    saturates, why = int8_dot_saturates()
    return saturates, f"reduce_range: auto -> {str(saturates).lower()}: {why}"


@dataclass(kw_only=True)
class QuantReport(Report):
    """What :func:`quantize_` did. ``layers``: name -> ``{"type", "bits", "act_bits", "per_channel",
    "symmetric", "act_symmetric", "half_scales"}`` of each quantized layer (its name also in
    ``changed``); ``folded_bn``: the convolutions a BatchNorm was folded into; ``reduce_range`` and
    why; ``calibration_batches``: how many batches calibrated the activation grids (0: none)."""

    verb: str = "quantize_"
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    folded_bn: list[str] = field(default_factory=list)
    reduce_range: bool = False
    reduce_range_reason: str = ""
    calibration_batches: int = 0


def quantize_(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
              config: QuantConfig | dict | None = None, *, calibration=None) -> QuantReport:
    """Quantize ``model`` in place (simulated integers); returns a :class:`QuantReport`.

    ``example_inputs``: a tensor or a tuple of tensors the model accepts (the report's sizes are
    measured on it). ``calibration``: a Dataset, DataLoader or iterable of input tensors (needed
    when ``act_bits`` is set). Layers: Conv2d (any groups) and Linear selected by ``layers`` /
    ``ignore`` globs; already-quantized layers are skipped. Stored bytes: packed codes + scales
    (:func:`slimkit.quantize.fake.layer_stored_bytes`).
    """
    config = QuantConfig.coerce(config, where="quantize")
    if config.act_bits and calibration is None:
        raise ConfigError("quantize_: act_bits is set but no calibration data was given; pass calibration=dataset "
                          "or set act_bits: null")
    before = ModelSize.of(model, example_inputs)
    folded = fold_bn_(model) if config.fold_bn else []
    chosen = select_modules(model, (nn.Conv2d, nn.Linear), config.layers, config.ignore, what="quantize.layers")
    reduce, why = resolve_reduce_range(config)
    report = QuantReport(before=before, folded_bn=folded, reduce_range=reduce, reduce_range_reason=why)
    for name, module in chosen.items():
        if isinstance(module, QuantMixin):
            report.skipped[name] = "already quantized"
            continue
        bits = bits_for(name, config)
        if reduce and bits == 8 and config.symmetric:
            bits = 7
        quant = dict(bits=bits, act_bits=config.act_bits, per_channel=config.per_channel,
                     symmetric=config.symmetric, act_symmetric=config.act_symmetric,
                     half_scales=config.scale_dtype == "float16")
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        new = cls.from_float(module, **quant)
        new.set_weight_qparams(config.weight_observer, **_observer_options(config.weight_observer, config))
        replace_module(model, name, new)
        report.changed.append(name)
        report.layers[name] = {"type": type(module).__name__, **quant}
    if config.act_bits:
        report.calibration_batches = calibrate_(
            model, calibration=calibration_batches(calibration, config), observer=config.observer,
            **_observer_options(config.observer, config))
    report.after = ModelSize.of(model, example_inputs)
    return report
