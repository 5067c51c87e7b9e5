"""Plain CNNs (no shortcuts): the student and teacher-assistant family of TAKD.

Mirzadeh et al. 2020 (*Improved Knowledge Distillation via Teacher Assistant*) distil a
10-layer plain CNN into a 2-layer one through 8-, 6- and 4-layer assistants. ``plaincnn-<d>``
(d = 1..10) is that family: ``d`` blocks of 3x3 conv -> BN -> ReLU, a 2x2 max-pool after
every second block (and after the last), average pooling to 4x4 (so the classifier still
sees where strokes are, at any input size) and one Linear.
Default widths double every two blocks from 16 (16, 16, 32, 32, 64, 64, ...); the
``widths`` keyword narrows or widens them. :func:`plain_cnn` also accepts a name that lists
widths, ``plaincnn-8-16`` (two blocks of 8 and 16 channels), and builds it as the registered
``plaincnn-2`` with those widths, so that :func:`slimkit.manifest.load_model` rebuilds it
(the depth comes from the zoo name, the widths from the saved manifest).

>>> import torch
>>> model = plain_cnn("plaincnn-4-8", num_classes=10, in_channels=1)
>>> model(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
[4, 8]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.models import MODELS, create_model

MAX_DEPTH = 10
POOL = 4  # side of the pooled map the classifier reads
PREFIX = "plaincnn-"


def default_widths(depth: int) -> tuple[int, ...]:
    """Channel counts of ``plaincnn-<depth>``: 16, 16, 32, 32, 64, 64, ... (doubling every two blocks)."""
    return tuple(16 * 2 ** (i // 2) for i in range(depth))


class PlainCNN(nn.Module):
    """``features`` (conv3x3-BN-ReLU blocks, max-pool after every second), 4x4 pool, ``classifier``.

    Input ``[N, in_channels, H, W]`` (any H, W >= 2 ** pools), output ``[N, num_classes]``.
    Blocks are named ``features.block<i>`` so feature pairs read well (``features.block2``).
    """

    def __init__(self, widths: Sequence[int], num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or any(w < 1 for w in widths):
            raise ConfigError(f"plaincnn widths must be positive integers, got {widths!r}")
        self.features = nn.Sequential()
        channels = in_channels
        for i, width in enumerate(widths, start=1):
            block = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
            if i % 2 == 0 or i == len(widths):
                block.append(nn.MaxPool2d(2, ceil_mode=True))
            self.features.add_module(f"block{i}", block)
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(POOL)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels * POOL * POOL, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


def _register(depth: int) -> None:
    def build(num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] | None = None,
              **kwargs: Any) -> nn.Module:
        if kwargs:
            raise ConfigError(f"plaincnn-{depth} takes only 'widths', got {sorted(kwargs)}")
        widths = tuple(widths) if widths is not None else default_widths(depth)
        if len(widths) != depth:
            raise ConfigError(f"plaincnn-{depth} needs {depth} widths, got {len(widths)} ({widths!r})")
        return PlainCNN(widths, num_classes=num_classes, in_channels=in_channels)

    build.__doc__ = f"Plain CNN with {depth} conv blocks (TAKD family), widths {default_widths(depth)}."
    MODELS.register(f"plaincnn-{depth}", build)


for _depth in range(1, MAX_DEPTH + 1):
    _register(_depth)


def parse_plain_name(name: str) -> tuple[int, ...] | None:
    """Widths named by ``plaincnn-<d>`` or ``plaincnn-<w1>-<w2>...``; None for any other name.

    >>> parse_plain_name("plaincnn-2"), parse_plain_name("plaincnn-4-8"), parse_plain_name("lenet5")
    ((16, 16), (4, 8), None)
    """
    key = str(name).lower()
    if not key.startswith(PREFIX):
        return None
    parts = key[len(PREFIX):].split("-")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(
            f"bad plain CNN name {name!r}: use plaincnn-<depth 1..{MAX_DEPTH}> or plaincnn-<w1>-<w2>-... "
            "(channel widths, e.g. plaincnn-8-16)"
        )
    if len(parts) == 1:
        depth = int(parts[0])
        if depth > MAX_DEPTH:
            raise ConfigError(f"plaincnn depth must be 1..{MAX_DEPTH}, got {depth} in {name!r}")
        return default_widths(depth)
    if len(parts) > MAX_DEPTH:
        raise ConfigError(f"plaincnn has at most {MAX_DEPTH} blocks, got {len(parts)} widths in {name!r}")
    return tuple(int(p) for p in parts)


def plain_name(widths: Sequence[int]) -> str:
    """The name :func:`plain_cnn` understands for these widths (``plaincnn-8-16``)."""
    widths = tuple(int(w) for w in widths)
    if len(widths) == 1:
        raise ConfigError("a one-block plain CNN has no widths name; use create_model('plaincnn-1', widths=(w,))")
    return PREFIX + "-".join(str(w) for w in widths)


def plain_cnn(name: str, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Build ``plaincnn-<d>`` or ``plaincnn-<w1>-<w2>...`` through the zoo (so it saves and loads)."""
    widths = parse_plain_name(name)
    if widths is None:
        raise ConfigError(f"{name!r} is not a plain CNN name (plaincnn-<depth> or plaincnn-<w1>-<w2>...)")
    return create_model(f"plaincnn-{len(widths)}", num_classes=num_classes, in_channels=in_channels, widths=widths)
