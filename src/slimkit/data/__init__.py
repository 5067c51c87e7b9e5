"""Datasets by name: ``load_data(name) -> DataBundle`` with train/test splits and their shapes.

Registered names: ``digits`` (the embedded default, scikit-learn's handwritten digits
upsampled to 28x28, no network), ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``
(torchvision, downloaded only when asked) and ``imagefolder:<path>`` (your own images).

>>> from slimkit.data import list_datasets
>>> list_datasets()
['cifar10', 'cifar100', 'digits', 'fashion-mnist', 'imagefolder', 'mnist']
"""

from slimkit.data.core import DATASETS, DataBundle, LoadRequest, example_inputs, list_datasets, load_data

__all__ = ["DATASETS", "DataBundle", "LoadRequest", "example_inputs", "list_datasets", "load_data"]
