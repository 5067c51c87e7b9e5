"""The classic MNIST baselines of Deep Compression: LeNet-300-100 and LeNet-5 (Caffe variants).

Both are exactly the Caffe models used by Han, Mao & Dally (ICLR 2016), with layer names
that read well in reports (``conv1``, ``conv2``, ``fc1``, ``fc2``, ``fc3``). At the native
28x28x1 input and 10 classes:

- ``lenet-300-100``: 784-300-100-10 fully connected with ReLU, 266,610 parameters;
- ``lenet5``: conv 20 5x5 -> max-pool 2 -> conv 50 5x5 -> max-pool 2 -> fc 500 -> ReLU
  -> fc 10, 431,080 parameters (the Caffe LeNet has no ReLU after the convolutions).

Other input sizes work too: a :class:`FitSize` layer, an identity at the native size,
average-pools the feature map to the size the first fully connected layer was built for
(28x28 for LeNet-300-100, 4x4 after the convolutions of LeNet-5).

>>> import torch
>>> from slimkit.models import create_model
>>> model = create_model("lenet-300-100", num_classes=10, in_channels=1)
>>> sum(p.numel() for p in model.parameters())
266610
>>> model(torch.zeros(2, 1, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from slimkit.models import MODELS


class FitSize(nn.Module):
    """Identity when the input is already ``size`` x ``size``; adaptive average pooling to it otherwise.

    Lets a network whose first fully connected layer was sized for one input resolution
    accept another, without changing a single output at the native resolution.
    Input and output: ``[N, C, H, W]`` -> ``[N, C, size, size]``.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == self.size and x.shape[-1] == self.size:
            return x
        return F.adaptive_avg_pool2d(x, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun 1998; Caffe variant of Han 2015): input 28x28 flattened, 300 and 100 hidden, ReLU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.fit = FitSize(image_size)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.fit(x))  # [N, C*28*28]
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's MNIST example (the Deep Compression baseline).

    conv1 20@5x5 -> pool1 2x2 -> conv2 50@5x5 -> pool2 2x2 -> fc1 800->500 -> ReLU -> fc2 500->classes.
    Shapes at 28x28: [N,1,28,28] -> [N,20,24,24] -> [N,20,12,12] -> [N,50,8,8] -> [N,50,4,4] -> [N,800].
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool2 = nn.MaxPool2d(2)
        self.fit = FitSize(4)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.flatten(self.fit(x))
        return self.fc2(self.relu(self.fc1(x)))


@MODELS.register("lenet-300-100")
def lenet_300_100(num_classes: int = 10, in_channels: int = 1, **kwargs: Any) -> nn.Module:
    """LeNet-300-100; ``image_size`` (default 28) sets the resolution fc1 is built for."""
    return LeNet300100(num_classes=num_classes, in_channels=in_channels, **kwargs)


@MODELS.register("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, **kwargs: Any) -> nn.Module:
    """LeNet-5 (Caffe variant), 431,080 parameters at 1 input channel and 10 classes."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels, **kwargs)
