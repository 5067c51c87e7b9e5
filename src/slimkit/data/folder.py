"""``imagefolder:<path>``: your own images, one sub-folder per class (torchvision ``ImageFolder``).

Layout: ``<path>/train/<class>/*.png|jpg...`` and ``<path>/test/<class>/...`` (or ``val``
instead of ``test``). Images are read as RGB, resized to ``image_size`` x ``image_size``
(default 32) and normalized with the ImageNet mean/std (the statistics torchvision's
pretrained models expect). Both splits must have the same class folders, so that a label
means the same class in both.
"""

from __future__ import annotations

import os
from pathlib import Path

from slimkit.data.core import DATASETS, DataBundle, LoadRequest
from slimkit.exceptions import ConfigError, CorruptFileError, DataNotFoundError

DEFAULT_SIZE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _split(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(f"{os.path.abspath(root / n)}" for n in names)
    raise DataNotFoundError(f"imagefolder: no directory {wanted}; create it with one sub-folder of images per class")


def _load_rgb(path: str):
    """The image at ``path`` as RGB; CorruptFileError (one line naming the file) when it cannot be decoded.

    Images are read when a batch needs them, so a damaged file stops training at that batch
    with this message rather than with PIL's traceback.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated data, bad headers
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CorruptFileError(f"imagefolder: {os.path.abspath(path)} is not a readable image ({reason}); "
                               "replace or delete it") from None


def _folder(path: Path, transform):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path), transform=transform, loader=_load_rgb)
    except FileNotFoundError as err:  # no class folder, or class folders without any image file
        first = (str(err).strip().splitlines() or ["no images"])[0].rstrip(".")
        raise DataNotFoundError(
            f"imagefolder: no usable images under {os.path.abspath(path)} ({first}); "
            "put images (.png, .jpg, ...) in one sub-folder per class"
        ) from None


@DATASETS.register("imagefolder")
def load_image_folder(request: LoadRequest) -> DataBundle:
    """``imagefolder:<path>`` -> RGB images resized to ``image_size`` (default 32), classes from folder names."""
    from torchvision import transforms as T

    if not request.arg:
        raise ConfigError(
            "imagefolder needs a path: use 'imagefolder:<path>' with <path>/train and <path>/test (or val)"
        )
    root = Path(request.arg).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(
            f"imagefolder: no directory {os.path.abspath(root)}; pass the folder that holds train/ and test/ (or val/)"
        )
    size = request.image_size or DEFAULT_SIZE
    resize = [T.Resize((size, size))]
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    augment = [T.RandomCrop(size, padding=max(1, size // 8)), T.RandomHorizontalFlip()] if request.augment else []
    train = _folder(_split(root, ("train",)), T.Compose(resize + augment + tail))
    test = _folder(_split(root, ("test", "val")), T.Compose(resize + tail))
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise ConfigError(
            f"imagefolder: class folders differ between {train.root} and {test.root} "
            f"(only in train: {only_train}, only in test: {only_test}); use the same class folders in both"
        )
    return DataBundle(
        name=f"imagefolder:{request.arg}",
        train=train,
        test=test,
        num_classes=len(train.classes),
        in_channels=3,
        input_shape=(3, size, size),
        classes=list(train.classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
