"""slimkit.data: the embedded digits set, and the torchvision/image-folder loaders on tiny files
written here in the real on-disk formats (IDX for MNIST, pickled batches for CIFAR, PNG folders).

No network: nothing here downloads. The CIFAR tests patch only the md5 tables of torchvision's
CIFAR classes (``train_list``/``test_list``/``meta``) to the checksums of the generated files,
because torchvision refuses any file whose md5 differs from the official release; the loading
path itself (integrity check, unpickling, HWC reshaping, transforms) runs unmodified.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tvd

from slimkit.data import DATASETS, DataBundle, example_inputs, list_datasets, load_data
from slimkit.exceptions import ConfigError, DataNotFoundError, UnknownNameError

# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_sizes():
    b = load_data("digits")
    assert isinstance(b, DataBundle)
    assert (b.name, b.num_classes, b.in_channels, b.input_shape) == ("digits", 10, 1, (1, 28, 28))
    assert (len(b.train), len(b.test)) == (1437, 360)
    assert b.classes == [str(i) for i in range(10)]
    x, y = b.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0


def test_digits_deterministic_and_cache_safe():
    a, b = load_data("digits"), load_data("digits", seed=0)
    for ta, tb in zip(a.train.tensors + a.test.tensors, b.train.tensors + b.test.tensors):
        assert torch.equal(ta, tb)
    a.train.tensors[0].zero_()  # editing one bundle in place must not change the next one
    c = load_data("digits")
    assert torch.equal(c.train.tensors[0], b.train.tensors[0])
    other = load_data("digits", seed=1)
    assert not torch.equal(other.test.tensors[1], b.test.tensors[1])
    assert (len(other.train), len(other.test)) == (1437, 360)


@pytest.mark.parametrize("seed", [0, 3])
def test_digits_stratified(seed):
    b = load_data("digits", seed=seed)
    y_train, y_test = b.train.tensors[1], b.test.tensors[1]
    n_train, n_test = torch.bincount(y_train, minlength=10), torch.bincount(y_test, minlength=10)
    assert bool((n_train > 0).all()) and bool((n_test > 0).all())
    total = n_train + n_test
    assert int(total.sum()) == 1797
    assert torch.all((n_test.float() - 0.2 * total.float()).abs() <= 1.0)  # 80/20 within each class


def test_digits_normalized_with_train_statistics():
    b = load_data("digits")
    x = b.train.tensors[0]
    assert abs(float(x.mean())) < 1e-5
    assert abs(float(x.std()) - 1.0) < 1e-5
    # the test split uses the train statistics: close to, but not exactly, 0/1
    assert abs(float(b.test.tensors[0].mean())) < 0.1
    # undoing the normalization gives the bilinear upsampling of the original 0..16 images, in split order
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    raw = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)
    up = torch.nn.functional.interpolate(raw, size=(28, 28), mode="bilinear", align_corners=False)
    train_idx, test_idx = train_test_split(range(1797), test_size=0.2, stratify=digits.target, random_state=0)
    torch.testing.assert_close(x * b.std[0] + b.mean[0], up[train_idx], atol=1e-5, rtol=0)
    torch.testing.assert_close(b.test.tensors[0] * b.std[0] + b.mean[0], up[test_idx], atol=1e-5, rtol=0)
    assert torch.equal(b.test.tensors[1], torch.from_numpy(digits.target[test_idx]).long())


def test_digits_image_size():
    b = load_data("digits", image_size=16)
    assert b.input_shape == (1, 16, 16) and b.train[0][0].shape == (1, 16, 16)


# ----------------------------------------------------------------------------- registry and arguments


def test_list_and_unknown_names():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion-mnist", "imagefolder", "mnist"]
    assert list_datasets("*mnist") == ["fashion-mnist", "mnist"]
    assert "digits" in DATASETS
    with pytest.raises(UnknownNameError, match=r"unknown dataset 'cifar-10'; did you mean 'cifar10'"):
        load_data("cifar-10")
    assert load_data("DIGITS").name == "digits"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "digits", "image_size": 0}, "image_size must be a positive int"),
        ({"name": "digits", "image_size": 2.5}, "image_size must be a positive int"),
        ({"name": "digits", "seed": "0"}, "seed must be an int"),
        ({"name": ""}, "dataset name must be a non-empty string"),
        ({"name": "mnist:foo"}, "takes no argument"),
        ({"name": "imagefolder"}, "imagefolder needs a path"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_data(**kwargs)
    assert "\n" not in str(info.value)


def test_example_inputs():
    b = load_data("digits")
    x = example_inputs(b)
    assert x.shape == (1, 1, 28, 28) and torch.equal(x[0], b.test[0][0])
    assert example_inputs(b, batch_size=5).shape == (5, 1, 28, 28)
    tiny = DataBundle("t", b.train, torch.utils.data.Subset(b.test, [0, 1]), 10, 1, (1, 28, 28))
    x = example_inputs(tiny, batch_size=3)  # cycles through the two test images
    assert torch.equal(x[2], x[0])
    empty = DataBundle("e", b.train, torch.utils.data.Subset(b.test, []), 10, 1, (1, 28, 28))
    assert torch.equal(example_inputs(empty, 2), torch.zeros(2, 1, 28, 28))
    with pytest.raises(ConfigError, match="batch_size"):
        example_inputs(b, 0)


# ----------------------------------------------------------------------------- MNIST family (IDX files)


def _idx(array: np.ndarray) -> bytes:
    """IDX (a.k.a. SN3 / "Pascal Vincent") encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian dims."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root: Path, cls_dir: str, n_train: int = 12, n_test: int = 5, gz: bool = False):
    raw = root / cls_dir / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    for name, array in arrays.items():
        if gz:
            with gzip.open(raw / f"{name}.gz", "wb") as f:
                f.write(_idx(array))
        else:
            (raw / name).write_bytes(_idx(array))
    return arrays


MNIST_CASES = [("mnist", "MNIST", (0.1307, 0.3081)), ("fashion-mnist", "FashionMNIST", (0.2860, 0.3530))]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("name, cls_dir, stats", MNIST_CASES)
def test_mnist_family_from_idx_files(tmp_path, name, cls_dir, stats, gz):
    arrays = _write_mnist(tmp_path, cls_dir, gz=gz)
    b = load_data(name, data_dir=tmp_path)
    assert (b.num_classes, b.in_channels, b.input_shape) == (10, 1, (1, 28, 28))
    assert (len(b.train), len(b.test)) == (12, 5)
    x, y = b.test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and int(y) == 3
    mean, std = stats
    expected = (torch.from_numpy(arrays["t10k-images-idx3-ubyte"][3]).float() / 255 - mean) / std
    torch.testing.assert_close(x[0], expected)
    expected_classes = tvd.MNIST.classes if name == "mnist" else tvd.FashionMNIST.classes
    assert b.classes == expected_classes


def test_mnist_image_size(tmp_path):
    _write_mnist(tmp_path, "MNIST")
    b = load_data("mnist", data_dir=tmp_path, image_size=32, augment=True)  # augment: no-op for digit images
    assert b.input_shape == (1, 32, 32)
    assert b.train[0][0].shape == (1, 32, 32) and example_inputs(b, 2).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("name, cls_dir, _stats", MNIST_CASES)
def test_mnist_family_missing(tmp_path, name, cls_dir, _stats):
    with pytest.raises(DataNotFoundError) as info:
        load_data(name, data_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / cls_dir / "raw") in msg and "--download" in msg
    assert "Dataset not found" not in msg  # torchvision's message does not leak
    (tmp_path / cls_dir / "raw").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no files under"):
        load_data(name, data_dir=tmp_path)
    _write_mnist(tmp_path / "other", cls_dir)
    for f in (tmp_path / "other" / cls_dir / "raw").iterdir():
        if "t10k" not in f.name:
            f.rename(tmp_path / cls_dir / "raw" / f.name)
    with pytest.raises(DataNotFoundError, match=r"missing t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte under"):
        load_data(name, data_dir=tmp_path)


def test_download_only_when_asked(tmp_path, monkeypatch):
    """download=True reaches torchvision's download(); download=False never does. (download() is replaced by a
    local writer of the real files: the network is never used.)"""
    calls = []

    def fake_download(self):
        calls.append(self.root)
        _write_mnist(Path(self.root), "MNIST")

    monkeypatch.setattr(tvd.MNIST, "download", fake_download)
    with pytest.raises(DataNotFoundError):
        load_data("mnist", data_dir=tmp_path)
    assert calls == []
    b = load_data("mnist", data_dir=tmp_path, download=True)
    assert calls == [str(tmp_path)] and len(b.train) == 12

    def failing_download(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x, got:\nHTTP 503\n")

    monkeypatch.setattr(tvd.FashionMNIST, "download", failing_download)
    with pytest.raises(DataNotFoundError, match="fashion-mnist: download into .* failed") as info:
        load_data("fashion-mnist", data_dir=tmp_path, download=True)
    assert "\n" not in str(info.value)


def test_default_data_dir_is_cwd_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "data" / "MNIST" / "raw")):
        load_data("mnist")
    _write_mnist(tmp_path / "data", "MNIST")
    assert len(load_data("mnist").test) == 5


# ----------------------------------------------------------------------------- CIFAR (pickled batches)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar(root: Path, hundred: bool, per_file: int = 3):
    """Write the real CIFAR layout with ``per_file`` images per batch; return (data, labels) of the test batch."""
    rng = np.random.default_rng(1)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    n_classes = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    train_files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    test_file = "test" if hundred else "test_batch"
    out = None
    for k, name in enumerate([*train_files, test_file]):
        data = rng.integers(0, 256, size=(per_file, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G, B (32x32 each)
        labels = [(k * per_file + i) % n_classes for i in range(per_file)]
        entry = {"batch_label": name, "data": data, label_key: labels, "filenames": [f"{name}_{i}.png" for i in labels]}
        if hundred:
            entry["coarse_labels"] = [lab // 5 for lab in labels]
        _pickle(folder / name, entry)
        out = (data, labels)
    if hundred:
        meta_name = "meta"
        meta = {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"c{i}" for i in range(20)],
        }
    else:
        meta_name = "batches.meta"
        meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_file, "num_vis": 3072}
    _pickle(folder / meta_name, meta)
    return folder, train_files, test_file, meta_name, out


def _patch_md5(monkeypatch, cls, folder: Path, train_files, test_file, meta_name):
    """Point torchvision's md5 tables at the generated files (the only thing patched; see module docstring)."""
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f in train_files])
    monkeypatch.setattr(cls, "test_list", [[test_file, _md5(folder / test_file)]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / meta_name)})


CIFAR_CASES = [
    ("cifar10", tvd.CIFAR10, False, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ("cifar100", tvd.CIFAR100, True, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
]


@pytest.mark.parametrize("name, cls, hundred, mean, std", CIFAR_CASES)
def test_cifar_from_pickled_batches(tmp_path, monkeypatch, name, cls, hundred, mean, std):
    folder, train_files, test_file, meta_name, (data, labels) = _write_cifar(tmp_path, hundred)
    # the real md5 table rejects the generated files: the loader reports it in one line
    with pytest.raises(DataNotFoundError, match="fail torchvision's md5 check") as info:
        load_data(name, data_dir=tmp_path)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)

    _patch_md5(monkeypatch, cls, folder, train_files, test_file, meta_name)
    b = load_data(name, data_dir=tmp_path)
    n_classes = 100 if hundred else 10
    assert (b.num_classes, b.in_channels, b.input_shape) == (n_classes, 3, (3, 32, 32))
    assert (len(b.train), len(b.test)) == (3 * len(train_files), 3)
    assert b.classes[1] == ("fine1" if hundred else "class1")
    x, y = b.test[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == labels[2]
    planes = torch.from_numpy(data[2].reshape(3, 32, 32)).float() / 255  # channel-major rows -> CHW
    expected = (planes - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(x, expected)

    big = load_data(name, data_dir=tmp_path, image_size=64, augment=True)
    assert big.input_shape == (3, 64, 64)
    assert big.train[0][0].shape == (3, 64, 64) and big.test[0][0].shape == (3, 64, 64)
    # the test split is never augmented: resizing is deterministic
    assert torch.equal(big.test[1][0], big.test[1][0])
    aug = load_data(name, data_dir=tmp_path, augment=True)
    draws = torch.stack([aug.train[0][0] for _ in range(8)])
    assert not all(torch.equal(draws[0], d) for d in draws[1:])  # random crop/flip on the train split


@pytest.mark.parametrize("name, cls, hundred, mean, std", CIFAR_CASES)
def test_cifar_missing(tmp_path, name, cls, hundred, mean, std):
    base = "cifar-100-python" if hundred else "cifar-10-batches-py"
    with pytest.raises(DataNotFoundError, match=f"{name}: no directory .*{base}; put the dataset there") as info:
        load_data(name, data_dir=tmp_path)
    assert "\n" not in str(info.value) and "corrupted" not in str(info.value)
    folder, *_ = _write_cifar(tmp_path, hundred)
    (folder / ("test" if hundred else "test_batch")).unlink()
    with pytest.raises(DataNotFoundError, match="missing test"):
        load_data(name, data_dir=tmp_path)


# ----------------------------------------------------------------------------- image folders


def _write_folder(root: Path, split: str, classes: dict[str, int], mode: str = "RGB"):
    rng = np.random.default_rng(2)
    for cls_name, n in classes.items():
        d = root / split / cls_name
        d.mkdir(parents=True)
        for i in range(n):
            h, w = 20 + i, 30
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(d / f"{i}.png")


@pytest.mark.parametrize("test_split, image_size", [("test", None), ("val", 24)])
def test_imagefolder(tmp_path, test_split, image_size):
    _write_folder(tmp_path, "train", {"cat": 3, "dog": 2})
    _write_folder(tmp_path, test_split, {"cat": 1, "dog": 2}, mode="L")  # greyscale files are read as RGB
    b = load_data(f"imagefolder:{tmp_path}", image_size=image_size)
    side = image_size or 32
    assert (b.num_classes, b.in_channels, b.input_shape, b.classes) == (2, 3, (3, side, side), ["cat", "dog"])
    assert (len(b.train), len(b.test)) == (5, 3)
    x, y = b.test[2]
    assert x.shape == (3, side, side) and x.dtype == torch.float32 and y == 1
    # greyscale read as RGB: the three channels are equal before the per-channel normalization
    restored = x * torch.tensor(b.std)[:, None, None] + torch.tensor(b.mean)[:, None, None]
    torch.testing.assert_close(restored[0], restored[1], atol=1e-5, rtol=0)
    assert example_inputs(b, 2).shape == (2, 3, side, side)
    aug = load_data(f"imagefolder:{tmp_path}", image_size=image_size, augment=True)
    assert aug.train[0][0].shape == (3, side, side)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match=f"no directory {tmp_path / 'nope'}"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")
    _write_folder(tmp_path, "train", {"cat": 1, "dog": 1})
    with pytest.raises(DataNotFoundError, match=r"no directory .*test or .*val") as info:
        load_data(f"imagefolder:{tmp_path}")
    assert "\n" not in str(info.value)
    (tmp_path / "test" / "cat").mkdir(parents=True)  # a class folder with no image
    with pytest.raises(DataNotFoundError, match=f"no usable images under {tmp_path / 'test'}") as info:
        load_data(f"imagefolder:{tmp_path}")
    assert "\n" not in str(info.value)
    _write_folder(tmp_path, "val", {"cat": 1, "bird": 1})
    (tmp_path / "test" / "cat").rmdir()
    (tmp_path / "test").rmdir()
    with pytest.raises(ConfigError, match=r"class folders differ .*only in train: \['dog'\], only in test: \['bird'\]"):
        load_data(f"imagefolder:{tmp_path}")
