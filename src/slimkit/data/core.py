"""The dataset registry, the bundle every loader returns, and the one entry point.

A loader is a function registered in ``DATASETS`` under a lowercase name. It receives a
:class:`LoadRequest` (where the files are, whether it may download, the split seed, the
image size) and returns a :class:`DataBundle`. ``load_data`` parses the name (a name may
carry an argument after a colon, as ``imagefolder:/data/flowers``), validates the
arguments and calls the loader.

>>> from slimkit.data import load_data, example_inputs
>>> bundle = load_data("digits")
>>> bundle.input_shape, bundle.num_classes, len(bundle.train), len(bundle.test)
((1, 28, 28), 10, 1437, 360)
>>> example_inputs(bundle, batch_size=4).shape
torch.Size([4, 1, 28, 28])
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from slimkit.exceptions import ConfigError
from slimkit.registry import Registry

__all__ = ["DATASETS", "DataBundle", "LoadRequest", "example_inputs", "list_datasets", "load_data"]

#: Default root of downloaded datasets (relative to the working directory), as torchvision's ``root``.
DEFAULT_DATA_DIR = "data"


@dataclass(frozen=True)
class DataBundle:
    """A train/test pair of datasets and what a model needs to know about them.

    ``train`` and ``test`` yield ``(image, label)``: ``image`` a float32 tensor of shape
    ``input_shape`` = (C, H, W), already normalized; ``label`` an int64 scalar tensor or an
    int in ``[0, num_classes)``. ``mean``/``std`` are the per-channel normalization that was
    applied (a deployed model must see inputs normalized the same way).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    input_shape: tuple[int, int, int]
    classes: list[str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class LoadRequest:
    """What ``load_data`` hands a loader: the parsed name and the validated arguments."""

    name: str  # the registered name, e.g. "imagefolder"
    arg: str | None  # the part after the colon, e.g. a path for "imagefolder:<path>"
    data_dir: Path
    download: bool
    seed: int
    image_size: int | None
    augment: bool


Loader = Callable[[LoadRequest], DataBundle]

DATASETS: Registry[Loader] = Registry(
    "dataset",
    lazy_modules=("slimkit.data.digits", "slimkit.data.vision", "slimkit.data.folder"),
)


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching a glob (``imagefolder`` is used as ``imagefolder:<path>``).

    >>> list_datasets("cifar*")
    ['cifar10', 'cifar100']
    """
    return DATASETS.names(pattern)


def load_data(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    *,
    augment: bool = False,
) -> DataBundle:
    """Load a dataset by name and return its train/test :class:`DataBundle`.

    ``name``: a registered name (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``,
    ``cifar100``) or ``imagefolder:<path>``. ``data_dir``: root under which torchvision
    datasets live (default ``./data``). ``download``: fetch missing files (only when True; a
    missing dataset otherwise raises :class:`~slimkit.exceptions.DataNotFoundError`).
    ``seed``: the train/test split seed where the loader splits (``digits``).
    ``image_size``: resize images to ``image_size x image_size`` (e.g. 224 for CIFAR on
    ImageNet-shaped models). ``augment``: random crop + horizontal flip on the training set
    of the natural-image datasets (CIFAR, image folders); ignored by digit datasets.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"dataset name must be a non-empty string, got {name!r}; known: {', '.join(list_datasets())}")
    base, sep, arg = name.strip().partition(":")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size must be a positive int or None, got {image_size!r}; pass e.g. image_size=224")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    loader = DATASETS.get(base)
    request = LoadRequest(
        name=base.lower(),
        arg=arg if sep else None,
        data_dir=Path(DEFAULT_DATA_DIR if data_dir is None else data_dir).expanduser(),
        download=bool(download),
        seed=seed,
        image_size=image_size,
        augment=bool(augment),
    )
    return loader(request)


def no_argument(request: LoadRequest) -> None:
    """Reject ``name:arg`` for loaders that take no argument."""
    if request.arg is not None:
        raise ConfigError(
            f"dataset {request.name!r} takes no argument after ':', got {request.name}:{request.arg}; "
            f"use {request.name!r} (only imagefolder:<path> takes one)"
        )


def example_inputs(bundle: DataBundle, batch_size: int = 1) -> torch.Tensor:
    """A batch ``[batch_size, *bundle.input_shape]`` of the first test images (cycled if fewer).

    Used to trace a model (MACs, ONNX export, channel graphs); zeros when the test set is empty.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(bundle.test)
    if n == 0:
        return torch.zeros(batch_size, *bundle.input_shape)
    images = [torch.as_tensor(bundle.test[i % n][0], dtype=torch.float32) for i in range(batch_size)]
    return torch.stack(images)
