"""Re-exports of :mod:`slimkit.deploy.onnx`, :mod:`slimkit.deploy.runners` and :mod:`slimkit.deploy.timing`."""

from slimkit.deploy.onnx import OPSET, export_onnx, is_quantized
from slimkit.deploy.runners import OnnxRunner
from slimkit.deploy.timing import file_bytes, median_ms

__all__ = ["OPSET", "OnnxRunner", "export_onnx", "file_bytes", "is_quantized", "median_ms"]
