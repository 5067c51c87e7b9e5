"""slimkit.deploy: making and running the deployable files, and choosing the engine.

- :mod:`~slimkit.deploy.onnx`: :func:`export_onnx` (fp32, or int8 QDQ with slimkit's grids);
- :mod:`~slimkit.deploy.runners`: :class:`OnnxRunner`, :class:`TorchRunner` (one model, one engine);
- :mod:`~slimkit.deploy.engines`: the engine registry (name -> runner factory,
  :func:`register_engine`), built-ins ``onnxruntime-fp32/int8``, ``torch-fp32``,
  ``torch-x86-int8``, and ``executorch-fp32/int8`` (:mod:`~slimkit.deploy.executorch`);
- :mod:`~slimkit.deploy.compare`: :func:`compare_engines`, :func:`choose_engine`, :func:`vs_dense`;
- :mod:`~slimkit.deploy.slim`: :func:`write_slim` (the ``.slim`` container);
- :mod:`~slimkit.deploy.formats`: :func:`export_model` / :func:`check_export` (``slimkit export``);
- :mod:`~slimkit.deploy.run`: a run directory's top-level deployables and the file to ship;
- :mod:`~slimkit.deploy.stages`: the ``int8``, ``qat`` and ``binarize`` recipe stages;
- :mod:`~slimkit.deploy.results`: the typed results all of these return.

Layering (tested): :mod:`slimkit.quantize` imports none of ``deploy``, ``export``, ``encode``;
``encode`` imports ``quantize``; ``deploy`` imports both; ``export`` is a re-export of ``deploy``.
Heavy imports (onnx, onnxruntime, executorch) happen inside the functions.
"""

from slimkit.deploy.compare import choose_engine, compare_engines, vs_dense
from slimkit.deploy.engines import ENGINES, EngineInput, EngineSpec, register_engine
from slimkit.deploy.formats import FORMATS, check_export, default_path, export_model, register_format
from slimkit.deploy.onnx import export_onnx, is_quantized
from slimkit.deploy.results import (
    CheckResult,
    DenseComparison,
    EngineChoice,
    EngineComparison,
    EngineResult,
    Exported,
    SlimFile,
)
from slimkit.deploy.run import Deployable, RunDeployables, publish_deployables
from slimkit.deploy.runners import OnnxRunner, Runner, TorchRunner
from slimkit.deploy.slim import write_slim
from slimkit.deploy.timing import file_bytes

__all__ = [
    "ENGINES", "FORMATS", "CheckResult", "DenseComparison", "Deployable", "EngineChoice", "EngineComparison",
    "EngineInput", "EngineResult", "EngineSpec", "Exported", "OnnxRunner", "RunDeployables", "Runner", "SlimFile",
    "TorchRunner", "check_export", "choose_engine", "compare_engines", "default_path", "export_model",
    "export_onnx", "file_bytes", "is_quantized", "publish_deployables", "register_engine",
    "register_format", "vs_dense", "write_slim",
]
