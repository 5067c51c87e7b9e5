"""CIFAR-style baselines: VGG with batch norm, the He et al. CIFAR ResNets, and MobileNet V1.

All of them end in adaptive average pooling before the classifier, so they run at 28x28
(the embedded digits default), 32x32 (CIFAR) and 224x224 (ImageNet) alike.

- ``vgg11-cifar``, ``vgg16-cifar``: 3x3 conv + BN + ReLU stacks (configurations A and D of
  Simonyan & Zisserman 2015), max-pooling with ``ceil_mode=True`` so a 28x28 input still
  survives five halvings (28 -> 14 -> 7 -> 4 -> 2 -> 1), then global average pooling and the
  small CIFAR classifier of Li et al. 2017: Linear 512 -> 512, BN, ReLU, Linear 512 -> classes.
- ``resnet20-cifar``, ``resnet32-cifar``, ``resnet56-cifar``: He et al. 2016, section 4.2:
  a 3x3 stem of 16 channels, three stages of n basic blocks at 16/32/64 channels (n = 3, 5,
  9), global average pooling, one Linear. Shortcuts that change shape use **option B**
  (a 1x1 strided convolution + BN projection); identity shortcuts elsewhere. Option B adds
  a few parameters over option A's zero padding (resnet20: 272,474 vs 269,722 at 10 classes)
  but keeps every layer a plain module that channel pruning and ONNX understand.
- ``mobilenet-v1``: Howard et al. 2017, ImageNet layout (stride-2 stem, 13 depthwise-
  separable blocks), ``width_mult`` kwarg (the paper's alpha); 4,231,976 parameters and
  568.7M MACs at 224x224 with 1000 classes and alpha = 1, as in the paper's Table 1.

>>> import torch
>>> from slimkit.models import create_model
>>> model = create_model("resnet20-cifar", num_classes=10, in_channels=3)
>>> model(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.models import MODELS

# ---------------------------------------------------------------------------------- VGG

#: Channel counts per conv, "M" = 2x2 max-pool (Simonyan & Zisserman 2015, configs A and D).
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG with batch norm for small images: ``features`` (conv-BN-ReLU, max-pool), global pool, ``classifier``."""

    def __init__(self, config: Sequence[int | str], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                           nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(channels, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@MODELS.register("vgg11-cifar")
def vgg11_cifar(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """VGG-11 (config A) with BN, CIFAR classifier."""
    return VGG(VGG_CONFIGS["vgg11"], num_classes=num_classes, in_channels=in_channels, **kwargs)


@MODELS.register("vgg16-cifar")
def vgg16_cifar(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """VGG-16 (config D) with BN, CIFAR classifier (the model of Li 2017 and Network Slimming)."""
    return VGG(VGG_CONFIGS["vgg16"], num_classes=num_classes, in_channels=in_channels, **kwargs)


# ------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut; ``downsample`` (1x1 conv + BN, option B) when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet of depth 6n+2: stem 16, stages 16/32/64 (stride 1, 2, 2), pool, fc."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        planes = 16
        stages = []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _cifar_resnet(depth: int) -> Any:
    def build(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, **kwargs)

    build.__name__ = f"resnet{depth}_cifar"
    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016), option-B projection shortcuts."
    return build


for _depth in (20, 32, 56):
    MODELS.register(f"resnet{_depth}-cifar", _cifar_resnet(_depth))


# --------------------------------------------------------------------------- MobileNet V1

#: (output channels, stride) of the 13 depthwise-separable blocks (Howard 2017, Table 1).
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-ReLU (``dw``) followed by 1x1 pointwise conv-BN-ReLU (``pw``)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = _conv_bn_relu(cin, cin, 3, stride, groups=cin)
        self.pw = _conv_bn_relu(cin, cout, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class MobileNetV1(nn.Module):
    """MobileNet V1 (Howard et al. 2017) with width multiplier ``width_mult`` (alpha)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ConfigError(f"mobilenet-v1 width_mult must be > 0 (e.g. 1.0, 0.75, 0.5, 0.25), got {width_mult!r}")

        def width(c: int) -> int:
            return max(8, int(round(c * width_mult)))

        layers: list[nn.Module] = [_conv_bn_relu(in_channels, width(32), 3, 2)]
        cin = width(32)
        for cout, stride in MOBILENET_V1_BLOCKS:
            layers.append(DepthwiseSeparable(cin, width(cout), stride))
            cin = width(cout)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.flatten(self.avgpool(self.features(x)))))


@MODELS.register("mobilenet-v1")
def mobilenet_v1(num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """MobileNet V1; kwargs ``width_mult`` (default 1.0) and ``dropout`` (default 0)."""
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels, **kwargs)
