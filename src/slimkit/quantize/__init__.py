"""Quantization: k-means weight sharing, uniform int8/low-bit (PTQ and QAT), binary networks, HashedNets.

Every verb is ``verb_(model, example_inputs, config, **data) -> Report`` (:mod:`slimkit.reports`):

- :func:`share_weights_`: per-layer 1-D k-means on the non-zero weights (Deep Compression).
- :func:`quantize_`: uniform fake quantization with calibrated observers (``calibration=``),
  deployed as real integers through :mod:`slimkit.export` (ONNX Runtime, PyTorch x86 int8);
  :func:`prepare_qat_` is its starting point for quantization-aware training.
- :func:`binarize_`: BWN and XNOR networks, evaluated through :func:`slimkit.kernels.xnor_conv2d`.
- :func:`hash_weights_`: HashedNets (Chen 2015).

Bit planning is public too: :func:`slimkit.quantize.sensitivity.layer_sensitivity` then
:func:`~slimkit.quantize.sensitivity.choose_bits` (a :class:`~slimkit.quantize.sensitivity.BitPlan`),
applied by ``quantize_`` with ``overrides=plan.overrides()``. Stored bytes of every layer class
here are :func:`slimkit.measure.storage.stored_bytes` rules, registered where the class is defined.
"""

from slimkit.quantize.binary import BinarizeConfig, BinarizeReport, binarize_
from slimkit.quantize.hashed import HashConfig, HashReport, hash_weights_
from slimkit.quantize.qat import QATConfig, QATReport, prepare_qat_
from slimkit.quantize.sharing import ShareConfig, ShareReport, share_weights_, sharing_hooks
from slimkit.quantize.uniform import QuantConfig, QuantReport, quantize_

__all__ = ["BinarizeConfig", "BinarizeReport", "HashConfig", "HashReport", "QATConfig", "QATReport",
           "QuantConfig", "QuantReport", "ShareConfig", "ShareReport", "binarize_", "hash_weights_",
           "prepare_qat_", "quantize_", "share_weights_", "sharing_hooks"]
