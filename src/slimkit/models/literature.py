"""Architectures the compression surveys discuss: Network in Network, Xception, a small Inception network.

- ``nin-cifar``: Lin, Chen & Yan 2014, *Network In Network* (ICLR), the CIFAR-10 model:
  three **mlpconv** layers (a k x k convolution followed by two 1x1 convolutions, the
  "micro network" shared over positions), each followed by pooling and dropout; the last
  mlpconv has one channel per class and **global average pooling** replaces the fully
  connected classifier. 966,986 parameters at 3 input channels and 10 classes; no batch
  norm in the paper (``batch_norm=True`` adds it after every convolution).
- ``xception``: Chollet 2017, *Xception: Deep Learning with Depthwise Separable
  Convolutions* (CVPR), the ImageNet layout: entry flow (two convs, three residual
  blocks of separable convolutions with strided max-pooling), middle flow (8 residual
  blocks of three 728-channel separable convolutions), exit flow (separable 728 -> 1024,
  then 1536 and 2048), global average pooling, one Linear. 22,855,952 parameters at
  1000 classes, as the Keras reference (trainable parameters).
- ``xception-cifar``: the same flows for 28-32 pixel inputs: stride-1, padded stem, widths
  scaled by ``width_mult`` (default 0.25) and ``middle_blocks`` (default 4) middle blocks.
- ``inception-cifar``: the small Inception network of Zhang, Bengio, Hardt, Recht &
  Vinyals 2017 (*Understanding Deep Learning Requires Rethinking Generalization*, Fig. 3):
  conv modules (conv-BN-ReLU), Inception modules (a 1x1 and a 3x3 conv module side by side,
  concatenated) and downsample modules (a strided 3x3 conv module beside a strided 3x3 max
  pool, concatenated); 96 -> 2 Inception -> down -> 4 Inception -> down -> 2 Inception ->
  global average pooling -> Linear. 1,651,114 parameters at 10 classes: the paper's
  1,649,402 plus one batch-norm scale per channel (1,712 channels; TensorFlow's batch norm,
  which the paper's count reflects, has no scale by default).

A separable convolution is a depthwise 3x3 conv followed by a pointwise 1x1 conv (no
non-linearity between, as in the paper). Every model ends in adaptive pooling, so it runs at
28x28 (digits), 32x32 (CIFAR) and larger.

>>> import torch
>>> from slimkit.models import create_model
>>> model = create_model("nin-cifar", num_classes=10, in_channels=3)
>>> sum(p.numel() for p in model.parameters()), model(torch.zeros(2, 3, 32, 32)).shape
(966986, torch.Size([2, 10]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.models import MODELS

# ------------------------------------------------------------------------------ Network in Network


def mlpconv(cin: int, widths: Sequence[int], kernel: int, batch_norm: bool = False) -> nn.Sequential:
    """A k x k conv, then 1x1 convs (``widths[1:]``), each with (BN and) ReLU: ``[N, cin] -> [N, widths[-1]]``."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        k = kernel if i == 0 else 1
        layers.append(nn.Conv2d(cin, width, k, padding=k // 2, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        cin = width
    return nn.Sequential(*layers)


class NiN(nn.Module):
    """Network in Network for CIFAR (Lin 2014): mlpconv x 3 with pooling/dropout, global average pooling.

    ``features``: block1 (5x5 192, 1x1 160, 1x1 96) -> max-pool 3/2 -> dropout; block2 (5x5 192,
    1x1 192, 1x1 192) -> avg-pool 3/2 -> dropout; block3 (3x3 192, 1x1 192, 1x1 classes);
    then ``avgpool`` (global) and ``flatten``: ``[N, classes]``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, batch_norm: bool = False,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.block1 = mlpconv(in_channels, (192, 160, 96), 5, batch_norm)
        self.pool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.drop1 = nn.Dropout(dropout)
        self.block2 = mlpconv(96, (192, 192, 192), 5, batch_norm)
        self.pool2 = nn.AvgPool2d(3, stride=2, ceil_mode=True, count_include_pad=False)
        self.drop2 = nn.Dropout(dropout)
        self.block3 = mlpconv(192, (192, 192, num_classes), 3, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.pool1(self.block1(x)))
        x = self.drop2(self.pool2(self.block2(x)))
        return self.flatten(self.avgpool(self.block3(x)))


@MODELS.register("nin-cifar")
def nin_cifar(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Network in Network (Lin 2014), CIFAR-10 layout; kwargs ``batch_norm`` (False), ``dropout`` (0.5)."""
    return NiN(num_classes=num_classes, in_channels=in_channels, **kwargs)


# ------------------------------------------------------------------------------ Xception


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 (``depthwise``) then pointwise 1x1 (``pointwise``), no bias: ``[N, cin] -> [N, cout]``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class XceptionBlock(nn.Module):
    """Residual block of ``len(widths)`` [ReLU] -> separable conv -> BN units, optional 3/2 max-pool.

    The shortcut is a strided 1x1 conv + BN when the block pools or changes width, else the
    identity. ``relu_first=False`` drops the first ReLU (the first entry-flow block).
    """

    def __init__(self, cin: int, widths: Sequence[int], stride: int, relu_first: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = cin
        for i, width in enumerate(widths):
            if i > 0 or relu_first:
                layers.append(nn.ReLU(inplace=False))  # not in place: the input feeds the shortcut too
            layers += [SeparableConv2d(channels, width), nn.BatchNorm2d(width)]
            channels = width
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
        self.body = nn.Sequential(*layers)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))


class Xception(nn.Module):
    """Xception (Chollet 2017): ``stem``, ``entry`` (3 blocks), ``middle`` (n blocks), ``exit``, pool, ``fc``.

    ``width_mult`` scales every width (the paper's model is 1.0); ``small_input`` uses a
    stride-1, padded stem for 28-32 pixel images.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 middle_blocks: int = 8, small_input: bool = False) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ConfigError(f"xception width_mult must be > 0 (e.g. 1.0, 0.5, 0.25), got {width_mult!r}")
        if not isinstance(middle_blocks, int) or middle_blocks < 0:
            raise ConfigError(f"xception middle_blocks must be a non-negative integer, got {middle_blocks!r}")

        def w(c: int) -> int:
            return max(8, int(round(c * width_mult)))

        pad, stride = (1, 1) if small_input else (0, 2)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w(32), 3, stride=stride, padding=pad, bias=False), nn.BatchNorm2d(w(32)),
            nn.ReLU(inplace=True),
            nn.Conv2d(w(32), w(64), 3, padding=pad, bias=False), nn.BatchNorm2d(w(64)), nn.ReLU(inplace=True),
        )
        self.entry = nn.Sequential(
            XceptionBlock(w(64), (w(128), w(128)), 2, relu_first=False),
            XceptionBlock(w(128), (w(256), w(256)), 2),
            XceptionBlock(w(256), (w(728), w(728)), 2),
        )
        self.middle = nn.Sequential(*(XceptionBlock(w(728), (w(728),) * 3, 1) for _ in range(middle_blocks)))
        self.exit = nn.Sequential(
            XceptionBlock(w(728), (w(728), w(1024)), 2),
            SeparableConv2d(w(1024), w(1536)), nn.BatchNorm2d(w(1536)), nn.ReLU(inplace=True),
            SeparableConv2d(w(1536), w(2048)), nn.BatchNorm2d(w(2048)), nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w(2048), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.exit(self.middle(self.entry(self.stem(x))))
        return self.fc(self.flatten(self.avgpool(x)))


@MODELS.register("xception")
def xception(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Xception (Chollet 2017), ImageNet layout; kwargs ``width_mult`` (1.0), ``middle_blocks`` (8)."""
    return Xception(num_classes=num_classes, in_channels=in_channels, **kwargs)


@MODELS.register("xception-cifar")
def xception_cifar(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Xception for 28-32 px inputs: stride-1 stem, ``width_mult`` 0.25, 4 middle blocks (kwargs override)."""
    kwargs = {"width_mult": 0.25, "middle_blocks": 4, **kwargs, "small_input": True}
    return Xception(num_classes=num_classes, in_channels=in_channels, **kwargs)


# ------------------------------------------------------------------------------ small Inception


def conv_module(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (``same`` padding) -> BN -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InceptionModule(nn.Module):
    """``cat(conv1x1(cin -> c1), conv3x3(cin -> c3))``: ``[N, cin, H, W] -> [N, c1 + c3, H, W]``."""

    def __init__(self, cin: int, c1: int, c3: int) -> None:
        super().__init__()
        self.branch1 = conv_module(cin, c1, 1)
        self.branch3 = conv_module(cin, c3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x)], dim=1)


class DownsampleModule(nn.Module):
    """``cat(conv3x3/2(cin -> c3), maxpool3x3/2)``: ``[N, cin, H, W] -> [N, c3 + cin, ceil(H/2), ceil(W/2)]``."""

    def __init__(self, cin: int, c3: int) -> None:
        super().__init__()
        self.conv = conv_module(cin, c3, 3, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.pool(x)], dim=1)


class SmallInception(nn.Module):
    """Zhang et al. 2017's small Inception: conv 96, Inception x 2, down 80, x 4, down 96, x 2, pool, fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_module(in_channels, 96, 3)]
        channels = 96
        plan: tuple[tuple[str, int, int], ...] = (
            ("inc", 32, 32), ("inc", 32, 48), ("down", 80, 0),
            ("inc", 112, 48), ("inc", 96, 64), ("inc", 80, 80), ("inc", 48, 96), ("down", 96, 0),
            ("inc", 176, 160), ("inc", 176, 160),
        )
        for kind, a, b in plan:
            if kind == "inc":
                layers.append(InceptionModule(channels, a, b))
                channels = a + b
            else:
                layers.append(DownsampleModule(channels, a))
                channels = a + channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))


@MODELS.register("inception-cifar")
def inception_cifar(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Small Inception network for CIFAR (Zhang et al. 2017, Fig. 3)."""
    if kwargs:
        raise ConfigError(f"inception-cifar takes no keyword arguments, got {sorted(kwargs)}")
    return SmallInception(num_classes=num_classes, in_channels=in_channels)
