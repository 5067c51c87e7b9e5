"""torchvision's lightweight and classic ImageNet models, built without weights.

Each builder calls torchvision's own constructor with ``weights=None`` and ``num_classes``
(never downloading anything), then, when ``in_channels != 3``, replaces the first
convolution by one with the same output channels, kernel, stride, padding, dilation and
bias that reads ``in_channels`` channels. Extra keyword arguments go to torchvision
(e.g. ``width_mult`` for MobileNet V2, ``dropout``).

Registered names: mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small,
shufflenet_v2_x0_5, shufflenet_v2_x1_0, squeezenet1_0, squeezenet1_1, resnet18, resnet50.

>>> import torch
>>> from slimkit.models import create_model
>>> model = create_model("mobilenet_v3_small", num_classes=10, in_channels=1)
>>> model.features[0][0]
Conv2d(1, 16, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)
>>> model(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimkit.exceptions import UnsupportedModelError
from slimkit.models import MODELS

TORCHVISION_MODELS: tuple[str, ...] = (
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "squeezenet1_0",
    "squeezenet1_1",
    "resnet18",
    "resnet50",
)


def adapt_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first ``nn.Conv2d`` of ``model`` (in ``named_modules`` order) to read ``in_channels`` channels.

    The new conv keeps out_channels, kernel, stride, padding, dilation, groups (must be 1)
    and bias, and is freshly initialised. Mutates and returns ``model``; a no-op when the
    channel count already matches.
    """
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no Conv2d to adapt to in_channels={in_channels}")
    name, module = first
    if module.in_channels == in_channels:
        return model
    if module.groups != 1:
        raise UnsupportedModelError(
            f"first conv {name!r} is grouped (groups={module.groups}); cannot adapt it to in_channels={in_channels}"
        )
    new = nn.Conv2d(
        in_channels, module.out_channels, module.kernel_size, stride=module.stride, padding=module.padding,
        dilation=module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode,
    )
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model


def _torchvision_builder(tv_name: str) -> Any:
    def build(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        from torchvision import models as tvm  # imported lazily: keeps `import slimkit.models` light

        model = tvm.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
        if tv_name.startswith("mobilenet_v3"):
            # torchvision's BN momentum 0.01 suits ImageNet-length schedules; after the few hundred steps
            # of a CPU recipe the running statistics still lag the weights and eval accuracy is at chance
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.momentum = 0.1
        return adapt_in_channels(model, in_channels)

    build.__name__ = tv_name
    build.__doc__ = f"torchvision's {tv_name} (weights=None), first conv adapted to in_channels."
    return build


for _name in TORCHVISION_MODELS:
    MODELS.register(_name, _torchvision_builder(_name))
