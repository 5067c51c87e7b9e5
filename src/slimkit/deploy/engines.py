"""The engine registry: engine name -> a factory that builds a :class:`~slimkit.deploy.runners.Runner`.

An engine runs either the model slimkit holds (``runs="model"``: e.g. the fake-quant model
exported as int8 QDQ ONNX) or its float original (``runs="float"``: fp32 engines, and integer
engines that quantize the float model with their own observers, like PyTorch's x86 int8
path). ``family`` is the name a recipe lists in ``engines:`` (``onnxruntime``, ``torch``,
``executorch``); ``fp32`` names the engine's float path, which times the dense baseline for
``vs_dense_fp32``. Adding an engine is one decorated factory in a module listed in
:data:`ENGINE_MODULES`:

>>> from slimkit.deploy.engines import ENGINES
>>> [n for n in ENGINES.names() if ENGINES.get(n).family == "onnxruntime"]
['onnxruntime-fp32', 'onnxruntime-int8']
>>> ENGINES.get("onnxruntime-int8").fp32
'onnxruntime-fp32'
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from slimkit.deploy.runners import OnnxRunner, Runner, TorchRunner
from slimkit.global_state import quantized_engine
from slimkit.registry import Registry

#: Modules that register engines; imported the first time the registry is read.
ENGINE_MODULES = ("slimkit.deploy.executorch", "slimkit.deploy.compressed")


@dataclass(frozen=True)
class EngineInput:
    """What an engine factory may use: the model slimkit holds (fake-quant for integer stages),
    its float original, one batch-1 example ``[1, C, H, W]``, a directory for the files it writes,
    and calibration batches (for engines that calibrate their own grids)."""

    model: nn.Module
    float_model: nn.Module
    example: torch.Tensor
    out_dir: Path
    calibration: list[torch.Tensor] = field(default_factory=list)


Factory = Callable[[EngineInput], Runner]


@dataclass(frozen=True)
class EngineSpec:
    """A registered engine (see the module docstring)."""

    name: str
    family: str
    integer: bool
    runs: Literal["model", "float"]
    build: Factory
    fp32: str | None = None
    requires: tuple[str, ...] = ()
    extra: str | None = None
    grids: str | None = None
    doc: str = ""

    def missing(self) -> str | None:
        """Why the engine cannot run here (a package not installed), or None."""
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if not absent:
            return None
        hint = f"pip install 'slimkit[{self.extra}]'" if self.extra else f"pip install {' '.join(absent)}"
        return f"{self.name} needs the {', '.join(absent)} package ({hint})"


ENGINES: Registry[EngineSpec] = Registry("engine", lazy_modules=ENGINE_MODULES)


def register_engine(name: str, *, family: str, integer: bool, runs: Literal["model", "float"] = "model",
                    fp32: str | None = None, requires: tuple[str, ...] = (), extra: str | None = None,
                    grids: str | None = None):
    """Decorator: register ``factory(EngineInput) -> Runner`` as engine ``name``."""

    def add(factory: Factory) -> Factory:
        doc = (factory.__doc__ or "").strip().split("\n")[0]
        ENGINES.register(name, EngineSpec(name, family, integer, runs, factory, fp32, requires, extra, grids, doc))
        return factory

    return add


def families() -> list[str]:
    """Every engine family a recipe's ``engines:`` may list."""
    return sorted({ENGINES.get(n).family for n in ENGINES.names()})


def engines_of(family_names: tuple[str, ...]) -> list[EngineSpec]:
    """The registered engines of the given families, family by family in the order given."""
    from slimkit.exceptions import UnknownNameError

    known = families()
    out = []
    for family in family_names:
        if family not in known:
            family_registry: Registry[str] = Registry("engine family")
            for name in known:
                family_registry.register(name, name)
            raise UnknownNameError(family_registry.unknown_message(family))
        out += [ENGINES.get(n) for n in ENGINES.names() if ENGINES.get(n).family == family]
    # fp32 before int8 inside a family, as the report lists them
    return sorted(out, key=lambda s: (family_names.index(s.family), s.integer))


# --- built-in engines ---------------------------------------------------------------------------
@register_engine("onnxruntime-fp32", family="onnxruntime", integer=False, runs="float")
def _onnxruntime_fp32(inp: EngineInput) -> Runner:
    """The float model exported to ONNX, run by ONNX Runtime on one thread."""
    from slimkit.deploy.onnx import export_onnx

    return OnnxRunner(export_onnx(inp.float_model, inp.example, inp.out_dir / "model.fp32.onnx"))


@register_engine("onnxruntime-int8", family="onnxruntime", integer=True, fp32="onnxruntime-fp32",
                 grids="slimkit's (QDQ export of the quantized model)")
def _onnxruntime_int8(inp: EngineInput) -> Runner:
    """The quantized model exported as int8 QDQ ONNX with slimkit's grids, run by ONNX Runtime."""
    from slimkit.deploy.onnx import export_onnx, is_quantized
    from slimkit.exceptions import UnsupportedModelError

    if not is_quantized(inp.model):
        raise UnsupportedModelError("onnxruntime-int8 runs a quantized model; quantize it first (int8 stage)")
    return OnnxRunner(export_onnx(inp.model, inp.example, inp.out_dir / "model.int8.onnx"))


@register_engine("torch-fp32", family="torch", integer=False, runs="float")
def _torch_fp32(inp: EngineInput) -> Runner:
    """The float model in PyTorch eager mode, one thread."""
    return TorchRunner(inp.float_model)


@register_engine("torch-x86-int8", family="torch", integer=True, runs="float", fp32="torch-fp32",
                 grids="torch's own observers (same calibration batches)")
def _torch_x86_int8(inp: EngineInput) -> Runner:
    """PyTorch's own x86 int8 path (torch.ao FX, fbgemm/x86 kernels) on the float model."""
    return TorchRunner(torch_x86_int8(inp.float_model, inp.calibration or [inp.example], inp.example))


@quantized_engine("x86")  # prepared, calibrated and converted on x86; the caller's engine is restored
def torch_x86_int8(float_model: nn.Module, calibration: list[torch.Tensor], example: torch.Tensor) -> nn.Module:
    """PyTorch's x86 int8 model of ``float_model`` (FX graph mode, per-channel weights).

    The graph is :func:`slimkit.tracing.trace_model`'s (the tracing helper every graph path
    uses): a model whose forward branches on shapes is quantized from its meta-traced graph
    (the branches taken at the example's shape); a submodule fx cannot trace is kept whole
    (``non_traceable_module_names``: it runs in float between int8 layers).
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from slimkit.exceptions import UnsupportedModelError
    from slimkit.tracing import trace_model

    model = copy.deepcopy(float_model).eval()
    traced = trace_model(model, example)
    if traced.graph_module is None:
        raise UnsupportedModelError(f"torch-x86-int8: {type(float_model).__name__} cannot be traced by torch.fx "
                                    f"({traced.error}); deploy it with onnxruntime instead")
    if traced.method == "meta":
        model = traced.graph_module  # prepare_fx traces the generated forward: no shape branches left
    custom = PrepareCustomConfig().set_non_traceable_module_names(list(traced.opaque))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,), prepare_custom_config=custom)
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        return convert_fx(prepared)
