"""``digits``: scikit-learn's handwritten digits, the embedded default dataset (no network).

1797 grey images of 8x8 pixels with values 0..16 (shipped inside scikit-learn), scaled to
[0, 1], upsampled to 28x28 (bilinear, ``align_corners=False``) so that MNIST-shaped models
(LeNet-300-100, LeNet-5) run on them unchanged, split 80/20 stratified by class with
``random_state=seed``, and normalized by the training split's mean and std.
The tensors are built once per (seed, size) per process and cached; every call returns
fresh copies, so a caller that edits its tensors in place cannot corrupt the cache.

>>> from slimkit.data import load_data
>>> b = load_data("digits")
>>> x, y = b.train[0]
>>> x.shape, x.dtype, y.dtype
(torch.Size([1, 28, 28]), torch.float32, torch.int64)
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from slimkit.data.core import DATASETS, DataBundle, LoadRequest, no_argument

DIGITS_SIZE = 28  # default side after upsampling: the MNIST input shape
TEST_FRACTION = 0.2


@lru_cache(maxsize=8)
def _digits_tensors(seed: int, size: int) -> tuple[torch.Tensor, ...]:
    """(x_train [N,1,S,S], y_train [N], x_test, y_test, mean [], std []), normalized; cached."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target).long()
    index = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(index, test_size=TEST_FRACTION, stratify=labels.numpy(), random_state=seed)
    x_train, x_test = images[train_idx], images[test_idx]
    mean = x_train.mean()
    std = x_train.std()
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return x_train, labels[train_idx], x_test, labels[test_idx], mean, std


@DATASETS.register("digits")
def load_digits_bundle(request: LoadRequest) -> DataBundle:
    """scikit-learn digits upsampled to 28x28 (or ``image_size``): 1437 train / 360 test, 10 classes."""
    no_argument(request)
    size = request.image_size or DIGITS_SIZE
    x_train, y_train, x_test, y_test, mean, std = _digits_tensors(request.seed, size)
    return DataBundle(
        name="digits",
        train=TensorDataset(x_train.clone(), y_train.clone()),
        test=TensorDataset(x_test.clone(), y_test.clone()),
        num_classes=10,
        in_channels=1,
        input_shape=(1, size, size),
        classes=[str(d) for d in range(10)],
        mean=(float(mean),),
        std=(float(std),),
    )
