"""The geometry of one convolution call (ConvCase) and the argument checks every algorithm shares (one-line errors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimkit.exceptions import ConfigError


def pair(value, what: str) -> tuple[int, int]:
    """``value`` (int or 2-sequence of non-negative ints) as a pair; ConfigError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        out = (int(value[0]), int(value[1]))
    else:
        raise ConfigError(f"conv2d: {what} must be an int or a pair of ints, got {value!r}")
    if min(out) < 0 or (what == "stride" and min(out) < 1):
        raise ConfigError(f"conv2d: {what} must be {'>= 1' if what == 'stride' else '>= 0'}, got {value!r}")
    return out


@dataclass(frozen=True)
class ConvCase:
    """The geometry of one call: shapes in elements, stride/padding as (h, w) pairs."""

    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]

    @property
    def out_h(self) -> int:
        return (self.h + 2 * self.padding[0] - self.kh) // self.stride[0] + 1

    @property
    def out_w(self) -> int:
        return (self.w + 2 * self.padding[1] - self.kw) // self.stride[1] + 1

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the direct algorithm."""
        return self.n * self.o * self.out_h * self.out_w * self.c * self.kh * self.kw


def check(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> ConvCase:
    """Validate a conv2d call (fp32, 4-D, groups 1, matching channels) and return its geometry."""
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        raise ConfigError(f"conv2d: input must be a 4-D [N, C, H, W] tensor, got {_shape(input)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ConfigError(f"conv2d: weight must be a 4-D [O, C, kh, kw] tensor, got {_shape(weight)}")
    if input.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ConfigError(f"conv2d: slimkit kernels compute in float32; got input {input.dtype}, weight {weight.dtype}")
    if input.device.type != "cpu" or weight.device.type != "cpu":
        raise ConfigError(f"conv2d: slimkit kernels run on the CPU; got a tensor on {input.device}/{weight.device}")
    if input.shape[1] != weight.shape[1]:
        raise ConfigError(f"conv2d: input has {input.shape[1]} channels but the weight expects {weight.shape[1]} "
                          "(grouped convolution is not supported by slimkit kernels: use F.conv2d)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ConfigError(f"conv2d: bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    case = ConvCase(input.shape[0], input.shape[1], input.shape[2], input.shape[3], weight.shape[0], weight.shape[2],
                    weight.shape[3], pair(stride, "stride"), pair(padding, "padding"))
    if case.out_h < 1 or case.out_w < 1:
        raise ConfigError(f"conv2d: input {case.h}x{case.w} with padding {case.padding} is smaller than the "
                          f"kernel {case.kh}x{case.kw}")
    return case


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
