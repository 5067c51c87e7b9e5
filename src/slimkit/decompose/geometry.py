"""Geometry shared by the factorizations: numeric padding, plain conv builders, float64 weights.

One module for what :mod:`slimkit.decompose.methods` and :mod:`slimkit.decompose.cp` both
need, so neither reaches into the other. A conv weight is ``W[N, C, kh, kw]``.

>>> from torch import nn
>>> conv_padding(nn.Conv2d(3, 8, 3, padding="same")), conv_padding(nn.Conv2d(3, 8, (2, 2), padding="same"))
((1, 1), None)
>>> vert, horiz = split_geometry(nn.Conv2d(3, 8, 3, stride=2, padding=1))
>>> vert["stride"], horiz["stride"]
((2, 1), (1, 2))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Numeric (ph, pw) of a conv; None when a ``"same"`` padding would be asymmetric."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(t % 2 for t in total):
        return None
    return (total[0] // 2, total[1] // 2)


def make_conv(cin: int, cout: int, kernel, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
              bias: bool = False, padding_mode: str = "zeros", **factory: Any) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` (no bias unless asked: only a chain's last layer carries one).

    ``factory``: ``device`` / ``dtype``, e.g. ``device="meta"`` for cost-only skeletons.
    """
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias, padding_mode=padding_mode, **factory)


def split_geometry(conv: nn.Conv2d) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Stride, padding and dilation of a kxk conv split into its kx1 (vertical) and 1xk (horizontal) parts."""
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv_padding(conv), conv.dilation
    return (dict(stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1)),
            dict(stride=(1, sw), padding=(0, pw), dilation=(1, dw)))


def weight64(module: nn.Module) -> torch.Tensor:
    """A float64 CPU copy of ``module.weight`` (factorizations run in float64)."""
    return module.weight.detach().to(torch.float64, copy=True).cpu()
