"""Quantization: k-means weight sharing, uniform int8/low-bit (PTQ and QAT), binary networks.

- :func:`share_weights_`: per-layer 1-D k-means on the non-zero weights (Deep Compression).
- :func:`quantize_`: uniform fake quantization with calibrated observers, deployed as real
  integers through :mod:`slimkit.export` (ONNX Runtime, PyTorch x86 int8).
- :func:`binarize_`: BWN and XNOR networks, evaluated through :func:`slimkit.kernels.xnor_conv2d`.
"""

from slimkit.quantize.binary import BinarizeConfig, binarize_
from slimkit.quantize.sharing import ShareConfig, share_weights_, sharing_hooks
from slimkit.quantize.uniform import QuantConfig, quantize_

__all__ = ["BinarizeConfig", "QuantConfig", "ShareConfig", "binarize_", "quantize_", "share_weights_",
           "sharing_hooks"]
