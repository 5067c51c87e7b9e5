"""Uniform (linear) quantization: ``quantize_(model, config, calibration)`` post-training.

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
>>> report = quantize_(m, {"bits": 8, "overrides": {"4": 4}, "reduce_range": False}, calibration=[x])
>>> report["layers"]["0"]["bits"], report["layers"]["4"]["bits"], report["folded_bn"]
(8, 4, ['0'])
>>> quantize_(nn.Sequential(nn.Linear(3, 2)), {"reduce_range": True}, [torch.randn(4, 3)])["layers"]["0"]["bits"]
7
>>> stored_bytes(m) < 4 * sum(p.numel() for p in m.parameters())
True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit.config import Config
from slimkit.quantize.fake import QuantConv2d, QuantLinear, QuantMixin, quant_layers
from slimkit.quantize.fold import fold_bn_
from slimkit.quantize.observers import is_fp16_exact, make_observer
from slimkit.quantize.packing import packed_nbytes, storage_bits
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
def calibrate_(model: nn.Module, batches: Iterable[torch.Tensor], observer: str = "minmax", **options) -> int:
    """Run ``batches`` through ``model`` (eval) and set every quantized layer's activation grid."""
    layers = quant_layers(model)
    for layer in layers.values():
        layer.calibrating = True
        layer.act_observer = make_observer(observer, **options) if layer.act_bits else None
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for inputs in batches:
            model(inputs)
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        for layer in layers.values():
            layer.calibrating, layer.act_observer = False, None
        from slimkit.exceptions import ConfigError

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


def quantize_(model: nn.Module, config: QuantConfig | dict | None = None, calibration=None) -> dict:
    """Quantize ``model`` in place (simulated integers); returns a report of what changed.

    ``calibration``: a Dataset, DataLoader or iterable of input tensors (needed when
    ``act_bits`` is set). Layers: Conv2d (any groups) and Linear selected by ``layers`` /
    ``ignore`` globs. The report lists each layer's bits and grid, the folded BNs and the
    skipped layers.
    """
    config = QuantConfig.coerce(config, where="quantize")
    folded = fold_bn_(model) if config.fold_bn else []
    chosen = select_modules(model, (nn.Conv2d, nn.Linear), config.layers, config.ignore, what="quantize.layers")
    reduce, why = resolve_reduce_range(config)
    report: dict = {"folded_bn": folded, "layers": {}, "skipped": {}, "reduce_range": reduce,
                    "reduce_range_reason": why}
    for name, module in chosen.items():
        if isinstance(module, QuantMixin):
            report["skipped"][name] = "already quantized"
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
        report["layers"][name] = {"type": type(module).__name__, **quant}
    if config.act_bits:
        if calibration is None:
            from slimkit.exceptions import ConfigError

            raise ConfigError("quantize_: act_bits is set but no calibration data was given; pass calibration=dataset "
                              "or set act_bits: null")
        report["calibration_batches"] = calibrate_(
            model, calibration_batches(calibration, config), config.observer,
            **_observer_options(config.observer, config))
    return report


def scale_nbytes(scale: torch.Tensor) -> int:
    """Stored bytes of a weight grid's scales: 2 each when all are exact float16 values, else 4."""
    return (2 if is_fp16_exact(scale) else 4) * scale.numel()


def layer_stored_bytes(layer: QuantMixin) -> int:
    """Bytes of one quantized layer as stored: packed codes + scales (float16 when exact, else
    float32) (+ uint8 zero points when asymmetric) + fp32 bias + the activation grid (scale, zero point)."""
    size = packed_nbytes(layer.weight.numel(), layer.bits)
    size += scale_nbytes(layer.w_scale) + (0 if layer.symmetric else layer.w_zero.numel())
    if layer.bias is not None:
        size += 4 * layer.bias.numel()
    if layer.act_bits:
        size += 5
    return size


def stored_bytes(model: nn.Module) -> int:
    """Bytes of ``model`` stored with quantized layers bit-packed and every other tensor as is."""
    layers = quant_layers(model)
    total = sum(layer_stored_bytes(layer) for layer in layers.values())
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in layers:
            continue
        total += tensor.numel() * tensor.element_size()
    return total


def packed_layers(model: nn.Module) -> dict[str, dict]:
    """What a container stores for each quantized layer: bit-packed unsigned codes and grids.

    ``{name: {"bits", "storage_bits", "shape", "codes" (bytes), "scale", "zero_point",
    "signed"}}``; decode with :func:`slimkit.quantize.packing.unpack_bits` and
    :func:`~slimkit.quantize.packing.from_unsigned` when ``signed``.
    """
    from slimkit.quantize.packing import pack_bits, to_unsigned

    out = {}
    for name, layer in quant_layers(model).items():
        q, scale, zero = layer.quantized_weight()
        width = storage_bits(layer.bits)
        codes = q.numpy()
        codes = to_unsigned(codes, width) if layer.symmetric else codes.astype("uint8")
        out[name] = {"bits": layer.bits, "storage_bits": width, "shape": tuple(q.shape),
                     "codes": pack_bits(codes, width), "scale": scale, "zero_point": zero,
                     "signed": layer.symmetric}
    return out
