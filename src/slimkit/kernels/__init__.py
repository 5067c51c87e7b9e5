"""slimkit.kernels: reference and fast convolution kernels (compiled lazily on first use)."""

from slimkit.kernels.xnor import PackedWeight, xnor_conv2d

__all__ = ["PackedWeight", "xnor_conv2d"]
