"""slimkit.export: the earlier name of :mod:`slimkit.deploy`, kept as re-exports for scripts that
import it (``export_onnx``, ``OnnxRunner``, ``compare_engines``, ``choose_engine``). New code
imports :mod:`slimkit.deploy`.
"""

from slimkit.deploy.compare import choose_engine, compare_engines
from slimkit.deploy.onnx import export_onnx
from slimkit.deploy.runners import OnnxRunner

__all__ = ["OnnxRunner", "choose_engine", "compare_engines", "export_onnx"]
