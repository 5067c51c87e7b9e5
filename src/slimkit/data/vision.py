"""``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` through torchvision's dataset classes.

Files are read from ``<data_dir>/MNIST/raw``, ``<data_dir>/FashionMNIST/raw``,
``<data_dir>/cifar-10-batches-py`` and ``<data_dir>/cifar-100-python`` (torchvision's
layout). Nothing is downloaded unless ``download=True``; a missing or damaged dataset raises
:class:`~slimkit.exceptions.DataNotFoundError` with one line naming the directory and the
fix, never torchvision's own message. MNIST files dropped in ``raw/`` still gzip'd
(``train-images-idx3-ubyte.gz``, as distributed) are decompressed beside themselves first,
as torchvision's own download would do.

Images are normalized with the standard per-dataset mean/std; ``image_size`` resizes
(bilinear, antialiased) before normalization; ``augment`` adds the usual CIFAR training
augmentation (random crop with 1/8 padding, horizontal flip) to the training split.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from slimkit.data.core import DATASETS, DataBundle, LoadRequest, no_argument
from slimkit.exceptions import DataNotFoundError


@dataclass(frozen=True)
class _Spec:
    name: str  # slimkit name
    cls_name: str  # torchvision.datasets class
    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int  # native side in pixels
    natural: bool  # natural images: crop/flip augmentation makes sense


SPECS = {
    "mnist": _Spec("mnist", "MNIST", (0.1307,), (0.3081,), 28, False),
    "fashion-mnist": _Spec("fashion-mnist", "FashionMNIST", (0.2860,), (0.3530,), 28, False),
    "cifar10": _Spec("cifar10", "CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, True),
    "cifar100": _Spec("cifar100", "CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, True),
}


def _expected(cls: type, root: Path) -> tuple[Path, list[str]]:
    """The directory torchvision reads and the file names it requires there."""
    if hasattr(cls, "resources"):  # MNIST family: uncompressed IDX files in <root>/<Class>/raw
        folder = root / cls.__name__ / "raw"
        return folder, [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    folder = root / cls.base_folder  # CIFAR family: pickled batches
    return folder, [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _gunzip_mnist(folder: Path, files: list[str]) -> None:
    """Decompress ``<file>.gz`` next to itself where only the gzip'd IDX file is present."""
    for name in files:
        target, packed = folder / name, folder / f"{name}.gz"
        if not target.exists() and packed.is_file():
            tmp = folder / f".{name}.{os.getpid()}.tmp"  # per process: DDP ranks may unpack at once
            with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)  # atomic: an interrupted run leaves no half file under the real name


def _not_found(spec: _Spec, folder: Path, files: list[str]) -> DataNotFoundError:
    """One-line diagnosis of why torchvision refused the directory."""
    where = os.path.abspath(folder)
    fix = "put the dataset there, pass --download (download=True), or point --data-dir (data_dir=) at its root"
    if not folder.is_dir():
        return DataNotFoundError(f"{spec.name}: no directory {where}; {fix}")
    missing = [f for f in files if not (folder / f).is_file()]
    if len(missing) == len(files):
        return DataNotFoundError(f"{spec.name}: no files under {where} (expected {', '.join(files)}); {fix}")
    if missing:
        return DataNotFoundError(f"{spec.name}: missing {', '.join(missing)} under {where}; {fix}")
    return DataNotFoundError(
        f"{spec.name}: the files under {where} fail torchvision's md5 check (damaged or not the official release); "
        "replace them or pass --download (download=True) to fetch them again"
    )


def _transforms(spec: _Spec, image_size: int | None, augment: bool):
    from torchvision import transforms as T

    size = image_size or spec.size
    resize = [T.Resize((size, size))] if image_size and image_size != spec.size else []
    tail = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    train = list(resize)
    if augment and spec.natural:
        train += [T.RandomCrop(size, padding=max(1, size // 8)), T.RandomHorizontalFlip()]
    return T.Compose(train + tail), T.Compose(resize + tail), size


def _load(request: LoadRequest) -> DataBundle:
    no_argument(request)
    import torchvision.datasets

    spec = SPECS[request.name]
    cls = getattr(torchvision.datasets, spec.cls_name)
    root = request.data_dir
    folder, files = _expected(cls, root)
    if hasattr(cls, "resources") and folder.is_dir():
        _gunzip_mnist(folder, files)
    train_tf, test_tf, size = _transforms(spec, request.image_size, request.augment)
    try:
        train = cls(str(root), train=True, transform=train_tf, download=request.download)
        test = cls(str(root), train=False, transform=test_tf, download=False)
    except (RuntimeError, OSError) as err:
        if request.download:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataNotFoundError(
                f"{spec.name}: download into {os.path.abspath(root)} failed ({first}); "
                f"check the network or place the files under {os.path.abspath(folder)}"
            ) from None
        raise _not_found(spec, folder, files) from None
    channels = len(spec.mean)
    return DataBundle(
        name=spec.name,
        train=train,
        test=test,
        num_classes=len(train.classes),
        in_channels=channels,
        input_shape=(channels, size, size),
        classes=list(train.classes),
        mean=spec.mean,
        std=spec.std,
    )


for _name in SPECS:
    DATASETS.register(_name, _load)
