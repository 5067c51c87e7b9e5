"""Re-exports of :mod:`slimkit.deploy.onnx`, :mod:`slimkit.deploy.runners` and :mod:`slimkit.deploy.timing`.

Timing is :mod:`slimkit.measure.latency` (``measure_latency`` for a model, ``time_callable``
for an engine's callable); the earlier ``median_ms`` here timed without eval mode,
inference mode or a fixed thread count and is gone.
"""

from slimkit.deploy.onnx import OPSET, export_onnx, is_quantized
from slimkit.deploy.runners import OnnxRunner
from slimkit.deploy.timing import file_bytes

__all__ = ["OPSET", "OnnxRunner", "export_onnx", "file_bytes", "is_quantized"]
