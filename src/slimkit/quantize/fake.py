"""Fake quantization with the straight-through estimator, as layers that train (QAT).

:class:`QuantConv2d` and :class:`QuantLinear` are drop-in subclasses of the torch layers
that keep latent float weights and, in ``forward``, (1) fake-quantize their input
activation on a per-tensor grid (``act_bits``, calibrated scale and zero point) and (2)
fake-quantize their weight on a per-channel or per-tensor grid (``bits``). Rounding uses
torch's ``fake_quantize_*`` kernels whose gradient is the clipped straight-through
estimator (1 inside the grid's range, 0 outside; Bengio 2013, Jacob 2018).

Modes: ``calibrating`` (observe activations, pass them through unquantized), training
(QAT: weight grid re-derived from the current weights each step, activation range tracked
by a moving average unless ``freeze_act``), eval (fixed grids). ``export_mode`` makes the
grids ONNX-expressible (weights pre-quantized, int8/uint8 ranges) for
:func:`slimkit.export.export_onnx`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.manifest import register_module_spec
from slimkit.measure.storage import register_storage_rule
from slimkit.quantize.observers import (
    Observer,
    is_fp16_exact,
    make_observer,
    qparams_from_range,
    qrange,
    round_up_fp16,
)
from slimkit.quantize.packing import packed_nbytes


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` (per tensor, or per channel along ``axis``) with an STE gradient."""
    if axis is None or scale.dim() == 0:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).float(), zero.reshape(()).int(), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zero.int(), axis, qmin, qmax)


class QuantMixin:
    """State shared by the quantized layers (see the module docstring)."""

    def _init_quant(self, channels: int, bits: int, act_bits: int | None, per_channel: bool, symmetric: bool,
                    act_symmetric: bool, half_scales: bool = True) -> None:
        self.bits, self.act_bits = int(bits), (int(act_bits) if act_bits else None)
        self.per_channel, self.symmetric, self.act_symmetric = bool(per_channel), bool(symmetric), bool(act_symmetric)
        self.half_scales = bool(half_scales)  # weight scales rounded up to float16 (stored in 2 bytes)
        shape = (channels,) if per_channel else ()
        self.register_buffer("w_scale", torch.ones(shape))
        self.register_buffer("w_zero", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("a_scale", torch.ones(()))
        self.register_buffer("a_zero", torch.zeros((), dtype=torch.int32))
        self.register_buffer("a_range", torch.zeros(2))  # moving [lo, hi] tracked in QAT
        self.calibrating = False
        self.freeze_act = False
        self.train_observer = "minmax"  # re-derives the weight grid at every training step (QAT)
        self.export_mode = False
        self.act_observer: Observer | None = None

    # --- grids ---------------------------------------------------------------------------
    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the integer model sees it: ``(q - zero) * scale``."""
        q, scale, zero = self.quantized_weight()
        shape = (-1,) + (1,) * (self.weight.dim() - 1) if self.per_channel else ()
        return ((q - zero.reshape(shape)) * scale.reshape(shape)).float()

    def quant_args(self) -> dict:
        return dict(bits=self.bits, act_bits=self.act_bits, per_channel=self.per_channel, symmetric=self.symmetric,
                    act_symmetric=self.act_symmetric, half_scales=self.half_scales)

    def w_range(self) -> tuple[int, int]:
        return qrange(self.bits, self.symmetric)

    def a_qrange(self) -> tuple[int, int]:
        return qrange(self.act_bits, self.act_symmetric)

    @torch.no_grad()
    def set_weight_qparams(self, observer: str = "minmax", **options) -> None:
        """Derive the weight grid from the current weights with the named observer."""
        obs = make_observer(observer, axis=0 if self.per_channel else None, **options)
        obs.update(self.grid_weight())
        scale, zero = obs.qparams(self.bits, self.symmetric)
        if self.half_scales:
            scale = round_up_fp16(scale)
        self.w_scale.copy_(scale.reshape(self.w_scale.shape))
        self.w_zero.copy_(zero.reshape(self.w_zero.shape))

    @torch.no_grad()
    def set_act_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        as_scalar = lambda v: torch.as_tensor(v).float().reshape(())  # noqa: E731
        self.a_range.copy_(torch.stack([as_scalar(lo), as_scalar(hi)]))
        scale, zero = qparams_from_range(self.a_range[0], self.a_range[1], self.act_bits, self.act_symmetric)
        self.a_scale.copy_(scale.reshape(()))
        self.a_zero.copy_(zero.reshape(()))

    def finish_calibration(self) -> None:
        if self.act_bits and self.act_observer is not None:
            lo, hi = self.act_observer.range(self.act_bits, self.act_symmetric)
            self.set_act_range(lo, hi)
        self.calibrating, self.act_observer = False, None

    @torch.no_grad()
    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(integer codes as int32 [same shape as weight], scale, zero point)."""
        qmin, qmax = self.w_range()
        shape = (-1,) + (1,) * (self.weight.dim() - 1) if self.per_channel else ()
        scale, zero = self.w_scale.reshape(shape), self.w_zero.reshape(shape)
        q = torch.clamp(torch.round(self.grid_weight() / scale) + zero, qmin, qmax).to(torch.int32)
        return q, self.w_scale.clone(), self.w_zero.clone()

    def grid_weight(self) -> torch.Tensor:
        """The weight the grid quantizes (the layer's own; a BN-carrying layer's folded one)."""
        return self.weight

    # --- forward pieces ------------------------------------------------------------------
    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_bits:
            return x
        if self.calibrating:
            if self.act_observer is not None:
                self.act_observer.update(x)
            return x
        if self.training and not self.freeze_act:
            with torch.no_grad():
                lo, hi = x.min(), x.max()
                if float(self.a_range[1] - self.a_range[0]) > 0:
                    lo, hi = 0.99 * self.a_range[0] + 0.01 * lo, 0.99 * self.a_range[1] + 0.01 * hi
                self.set_act_range(lo, hi)
        qmin, qmax = self.a_qrange()
        if self.export_mode:
            qmin, qmax = (-128, 127) if self.act_symmetric else (0, 255)
            return torch.fake_quantize_per_tensor_affine(x, float(self.a_scale), int(self.a_zero), qmin, qmax)
        return fake_quant(x, self.a_scale, self.a_zero, qmin, qmax)

    def _quant_weight(self) -> torch.Tensor:
        if self.calibrating:
            return self.grid_weight()
        if self.export_mode:
            # a plain tensor computed before tracing: exported as a constant, folded to int8 codes
            qmin, qmax = (-128, 127) if self.symmetric else (0, 255)
            # per-tensor grids export as per-channel ones with equal scales (same numbers), so
            # that the weight quantizer survives constant folding and is stored as int8 codes
            return torch.fake_quantize_per_channel_affine(self._export_weight, self.export_scale, self.export_zero,
                                                          0, qmin, qmax)
        if self.training:
            self.set_weight_qparams(self.train_observer)
        qmin, qmax = self.w_range()
        axis = 0 if self.per_channel else None
        return fake_quant(self.grid_weight(), self.w_scale, self.w_zero, qmin, qmax, axis=axis)


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input and weight (see :class:`QuantMixin`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", bits=8, act_bits=8, per_channel=True, symmetric=True, act_symmetric=False,
                 half_scales=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
        self._init_quant(out_channels, bits, act_bits, per_channel, symmetric, act_symmetric, half_scales)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant) -> QuantConv2d:
        args = conv_spec(conv)
        args.update(quant)
        new = cls(**args)
        new.load_state_dict(conv.state_dict(), strict=False)
        return new.train(conv.training)

    def forward(self, x):
        return self._conv_forward(self._quant_input(x), self._quant_weight(), self.bias)


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized input and weight (see :class:`QuantMixin`)."""

    def __init__(self, in_features, out_features, bias=True, bits=8, act_bits=8, per_channel=True, symmetric=True,
                 act_symmetric=False, half_scales=True):
        super().__init__(in_features, out_features, bias)
        self._init_quant(out_features, bits, act_bits, per_channel, symmetric, act_symmetric, half_scales)

    @classmethod
    def from_float(cls, linear: nn.Linear, **quant) -> QuantLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, **quant)
        new.load_state_dict(linear.state_dict(), strict=False)
        return new.train(linear.training)

    def forward(self, x):
        return F.linear(self._quant_input(x), self._quant_weight(), self.bias)


def conv_spec(m: nn.Conv2d) -> dict:
    """The constructor arguments of a Conv2d's geometry (channels, kernel, stride, padding, ...)."""
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=tuple(m.kernel_size),
                stride=tuple(m.stride), padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
                dilation=tuple(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)


QUANT_LAYERS = (QuantConv2d, QuantLinear)

register_module_spec(QuantConv2d, lambda m: {**conv_spec(m), **m.quant_args()})
register_module_spec(QuantLinear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                                 bias=m.bias is not None, **m.quant_args()))


def scale_nbytes(scale: torch.Tensor) -> int:
    """Stored bytes of a weight grid's scales: 2 each when all are exact float16 values, else 4."""
    return (2 if is_fp16_exact(scale) else 4) * scale.numel()


def layer_stored_bytes(layer: QuantMixin) -> int:
    """Bytes of one quantized layer's own tensors as stored: packed codes + scales (float16 when
    exact, else float32) (+ uint8 zero points when asymmetric) + fp32 bias + the activation grid
    (scale, zero point: 5 bytes). Its storage rule (:func:`slimkit.measure.storage.stored_bytes`);
    a BN-carrying layer's ``bn`` child counts on its own."""
    size = packed_nbytes(layer.weight.numel(), layer.bits)
    size += scale_nbytes(layer.w_scale) + (0 if layer.symmetric else layer.w_zero.numel())
    if layer.bias is not None:
        size += 4 * layer.bias.numel()
    if layer.act_bits:
        size += 5
    return size


register_storage_rule(QuantMixin, layer_stored_bytes)


def quant_layers(model: nn.Module) -> dict[str, QuantMixin]:
    """The fake-quantized layers of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def set_export_mode(model: nn.Module, enabled: bool) -> None:
    for m in quant_layers(model).values():
        m.export_mode = enabled
        m._export_weight = m.dequantized_weight().detach().clone() if enabled else None
        channels = m.weight.shape[0]
        if enabled:  # temporary buffers: exported as initializers, as the weight grid must be
            m.register_buffer("export_scale", m.w_scale.detach().float().expand(channels).clone())
            m.register_buffer("export_zero", m.w_zero.detach().int().expand(channels).clone())
        else:
            for name in ("export_scale", "export_zero"):
                m._buffers.pop(name, None)


def freeze_(model: nn.Module, act: bool = True) -> None:
    """Stop tracking activation ranges in training (late QAT), keeping the current grids."""
    for m in quant_layers(model).values():
        m.freeze_act = act
