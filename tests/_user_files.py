"""What a user brings, written as real files for the tests: a model defined in their own .py file and an
image folder of real PNGs (not collected as a test module)."""

from __future__ import annotations

import textwrap

import numpy as np

#: A user's model file: a CNN class taking ``num_classes`` and ``in_channels`` like zoo builders.
MYNET = textwrap.dedent("""
    import torch
    from torch import nn


    class MyNet(nn.Module):
        def __init__(self, num_classes, in_channels=3, width=8):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
            )
            self.head = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))
""")


def make_image_folder(root, classes=("disc", "stripe"), train=4, test=2, size=20):
    """Real PNGs in root/train/<class>/ and root/test/<class>/, each class with its own pattern."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[:, c::len(classes), c % 3] = 250
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
