"""slimkit.export: ONNX export and ONNX Runtime execution, and the int8 engine choice.

Heavy imports (onnx, onnxruntime) happen inside the functions.
"""

from slimkit.export.engines import choose_engine, compare_engines
from slimkit.export.onnx import OnnxRunner, export_onnx

__all__ = ["OnnxRunner", "choose_engine", "compare_engines", "export_onnx"]
