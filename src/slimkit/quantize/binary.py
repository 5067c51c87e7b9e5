"""Binary networks: ``binarize_(model, example_inputs, config)`` with modes ``bwn`` and ``xnor`` (Rastegari 2016).

- ``bwn``: weights ``alpha * sign(W)``, ``alpha`` = mean |W| per output channel
  (XNOR-Net's Binary-Weight-Network).
- ``xnor``: binary weights and binary inputs ``sign(x - t)``, with a learned per-channel
  threshold ``t`` (initialised at 0; ReLU outputs are never negative, so a threshold is what
  makes their sign informative). The layer computes ``alpha * conv(sign(x - t), sign(W)) + b``;
  in eval mode with ``use_kernel`` the convolution runs through the bit-packed
  :func:`slimkit.kernels.xnor_conv2d` and gives the same result.

Gradients use the straight-through estimator with clipping (gradient 1 where |v| <= 1,
else 0; Hubara 2016) on latent real weights, which the optimizer keeps updating. The first
and last layers stay full precision by default. Binary layers are stored at 1 bit per
weight plus their fp32 scales.

>>> import torch
>>> from torch import nn
>>> m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
>>> report = binarize_(m, torch.zeros(1, 1, 8, 8), {"mode": "bwn"})
>>> report.changed, report.kept_full_precision
(['2'], ['0', '4'])
>>> report.before.bytes - report.after.bytes  # 576 fp32 weights -> 72 B of signs + 8 fp32 alphas
2200
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimkit.config import Config
from slimkit.exceptions import ConfigError
from slimkit.manifest import register_module_spec
from slimkit.measure.storage import own_tensor_bytes, register_storage_rule
from slimkit.reports import ModelSize, Report
from slimkit.selection import matches, replace_module

_SUPPORTED = (nn.Conv2d, nn.Linear)


class BinarizeConfig(Config):
    """``mode``: bwn | xnor. ``layers``/``ignore``: globs over Conv2d/Linear names.
    ``keep_first_last``: leave the first and last weighted layers in full precision."""

    mode: Literal["bwn", "xnor"] = "bwn"
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    keep_first_last: bool = True
    clip: float = Field(1.0, gt=0, description="STE passes gradients where |value| <= clip")


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1; backward: straight-through, zero where |x| > clip."""

    @staticmethod
    def forward(ctx, x, clip):
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def sign_ste(x: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    return _SignSTE.apply(x, clip)


class BinaryMixin:
    def _init_binary(self, mode: str, clip: float, in_channels: int) -> None:
        self.mode, self.clip = mode, float(clip)
        self.use_kernel = False
        if mode == "xnor":
            self.threshold = nn.Parameter(torch.zeros(in_channels))

    def binary_args(self) -> dict:
        return {"mode": self.mode, "clip": self.clip}

    def alpha(self) -> torch.Tensor:
        """Per-output-channel scale: mean |W| (detached from nothing: it trains with W)."""
        return self.weight.abs().flatten(1).mean(dim=1)

    def binary_weight(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return sign_ste(self.weight, self.clip) * self.alpha().reshape(shape)

    def binary_input(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return sign_ste(x - self.threshold.reshape(shape), self.clip)


class BinaryConv2d(BinaryMixin, nn.Conv2d):
    """Conv2d with binary weights (bwn) or binary weights and inputs (xnor)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", mode="bwn", clip=1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
        self._init_binary(mode, clip, in_channels)

    def forward(self, x):
        if self.mode == "bwn":
            return self._conv_forward(x, self.binary_weight(), self.bias)
        if self.use_kernel and not self.training and self._kernel_ok():
            from slimkit.kernels import xnor_conv2d

            shifted = x - self.threshold.reshape(1, -1, 1, 1)
            y = xnor_conv2d(shifted, self.weight, self.stride, self.padding) * self.alpha().reshape(1, -1, 1, 1)
            return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)
        sign_w = sign_ste(self.weight, self.clip)
        y = self._conv_forward(self.binary_input(x), sign_w, None) * self.alpha().reshape(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)

    def _kernel_ok(self) -> bool:
        return self.groups == 1 and tuple(self.dilation) == (1, 1) and self.padding_mode == "zeros" \
            and not isinstance(self.padding, str)


class BinaryLinear(BinaryMixin, nn.Linear):
    """Linear with binary weights (bwn) or binary weights and inputs (xnor)."""

    def __init__(self, in_features, out_features, bias=True, mode="bwn", clip=1.0):
        super().__init__(in_features, out_features, bias)
        self._init_binary(mode, clip, in_features)

    def forward(self, x):
        if self.mode == "bwn":
            return F.linear(x, self.binary_weight(), self.bias)
        y = F.linear(self.binary_input(x), sign_ste(self.weight, self.clip)) * self.alpha()
        return y if self.bias is None else y + self.bias


def _conv_spec(m):
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=tuple(m.kernel_size),
                stride=tuple(m.stride), padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
                dilation=tuple(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)


register_module_spec(BinaryConv2d, lambda m: {**_conv_spec(m), **m.binary_args()})
register_module_spec(BinaryLinear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                                  bias=m.bias is not None, **m.binary_args()))
BINARY_LAYERS = (BinaryConv2d, BinaryLinear)


def binary_layer_bytes(layer: BinaryMixin) -> int:
    """Bytes of a binary layer's own tensors as stored: 1 bit per weight (rounded up to a byte) + one
    fp32 alpha per output channel, its other tensors (bias, xnor threshold) at fp32. Its storage rule."""
    weight = layer.weight
    return own_tensor_bytes(layer) - 4 * weight.numel() + (weight.numel() + 7) // 8 + 4 * weight.shape[0]


register_storage_rule(BinaryMixin, binary_layer_bytes)


def binary_layers(model: nn.Module) -> dict[str, BinaryMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BINARY_LAYERS)}


@dataclass(kw_only=True)
class BinarizeReport(Report):
    """What :func:`binarize_` did: ``layers`` name -> ``{"type", "weights"}`` (names also in ``changed``),
    ``kept_full_precision``: the first and last weighted layers left alone (also in ``skipped``)."""

    verb: str = "binarize_"
    mode: str
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept_full_precision: list[str] = field(default_factory=list)


def binarize_(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
              config: BinarizeConfig | dict | None = None) -> BinarizeReport:
    """Replace the selected Conv2d/Linear layers by binary ones, in place; returns a :class:`BinarizeReport`.

    ``example_inputs``: a tensor or a tuple of tensors the model accepts (the report's sizes).
    A layer named exactly in ``layers`` that is not a Conv2d or Linear raises ConfigError.
    """
    config = BinarizeConfig.coerce(config, where="binarize")
    named = dict(model.named_modules())
    for pattern in config.layers:
        module = named.get(pattern)
        if module is not None and pattern and not isinstance(module, _SUPPORTED):
            raise ConfigError(
                f"binarize.layers: {pattern!r} is a {type(module).__name__}; only Conv2d and Linear layers can be "
                "binarized; remove it from layers"
            )
    weighted = [n for n, m in model.named_modules() if n and isinstance(m, _SUPPORTED)]
    keep = [weighted[0], weighted[-1]] if config.keep_first_last and len(weighted) >= 2 else []
    chosen = [n for n in weighted if matches(n, config.layers) and not matches(n, config.ignore) and n not in keep]
    if not chosen:
        raise ConfigError(
            f"binarize.layers: no Conv2d/Linear matches layers={list(config.layers)} minus ignore="
            f"{list(config.ignore)} (first/last kept: {keep}); fix the patterns or set keep_first_last: false"
        )
    report = BinarizeReport(mode=config.mode, kept_full_precision=keep, before=ModelSize.of(model, example_inputs),
                            skipped={n: "first/last weighted layer kept in full precision (keep_first_last)"
                                     for n in keep})
    for name in chosen:
        old = named[name]
        if isinstance(old, nn.Conv2d):
            new = BinaryConv2d(**_conv_spec(old), mode=config.mode, clip=config.clip)
        else:
            new = BinaryLinear(old.in_features, old.out_features, old.bias is not None, mode=config.mode,
                               clip=config.clip)
        new.load_state_dict(old.state_dict(), strict=False)
        new.train(old.training)
        replace_module(model, name, new)
        report.changed.append(name)
        report.layers[name] = {"type": type(old).__name__, "weights": old.weight.numel()}
    report.after = ModelSize.of(model, example_inputs)
    return report


def use_kernel_(model: nn.Module, enabled: bool = True) -> int:
    """Route eval-mode xnor convolutions through the bit-packed kernel; returns how many layers."""
    count = 0
    for layer in binary_layers(model).values():
        if isinstance(layer, BinaryConv2d) and layer.mode == "xnor":
            layer.use_kernel = enabled
            count += 1
    return count
