"""Deployable file formats: what ``slimkit export --format`` writes and which engine runs it.

- ``onnx`` (``.onnx``): the float model, ONNX opset 13; runs in ``onnxruntime-fp32``.
- ``int8-onnx`` (``.int8.onnx``): QDQ int8 with slimkit's grids, the model's own if it is
  quantized, else calibrated post-training quantization (:func:`slimkit.quantize.quantize_`);
  runs in ``onnxruntime-int8``.
- ``slim`` (``.slim``): the compressed container, decoded exactly by slimkit; runs as
  ``slimkit-decoded`` (PyTorch eager on the decoded model).
- ``executorch`` (``.pte``) / ``executorch-int8`` (``.int8.pte``): an XNNPACK-delegated
  ExecuTorch program, fp32 or after the XNNPACK quantizer; runs in ``executorch-fp32`` /
  ``executorch-int8`` (optional extra ``slimkit[executorch]``).

:func:`export_model` writes one (atomically) and returns an :class:`~slimkit.deploy.results.Exported`;
:func:`check_export` runs it on a test set beside the PyTorch model and returns a
:class:`~slimkit.deploy.results.CheckResult`. A format is one registration in :data:`FORMATS`.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimkit.deploy.results import CheckResult, Exported
from slimkit.deploy.runners import OnnxRunner, Runner, TorchRunner
from slimkit.exceptions import ConfigError
from slimkit.registry import Registry


@dataclass(frozen=True)
class ExportRequest:
    """What a format's writer gets: the PyTorch model (float or fake-quant; not changed), one input
    ``[1, C, H, W]``, the output path, calibration batches (training inputs) and, where a run already
    wrote a file of this format for this model, its path (reused instead of made again)."""

    model: nn.Module
    example: torch.Tensor
    path: Path
    calibration: list[torch.Tensor] = field(default_factory=list)
    existing: Path | None = None


@dataclass(frozen=True)
class ExportFormat:
    """A registered format: file suffix, the engine that runs it, ``write(request) -> how`` (a phrase
    saying how the file was made) and ``open(path) -> Runner``."""

    name: str
    suffix: str
    engine: str
    write: Callable[[ExportRequest], str]
    open: Callable[[Path], Runner]
    needs_calibration: bool = False
    doc: str = ""


FORMATS: Registry[ExportFormat] = Registry("export format")


def register_format(name: str, suffix: str, engine: str, open: Callable[[Path], Runner],
                    needs_calibration: bool = False):
    """Decorator: register ``write(ExportRequest) -> how`` as export format ``name``."""

    def add(write: Callable[[ExportRequest], str]) -> Callable[[ExportRequest], str]:
        doc = (write.__doc__ or "").strip().split("\n")[0]
        FORMATS.register(name, ExportFormat(name, suffix, engine, write, open, needs_calibration, doc))
        return write

    return add


def default_path(source: str | os.PathLike, fmt: str) -> Path:
    """Where ``export`` writes by default: beside ``source`` with the format's suffix
    (``runs/x/model.pt`` -> ``runs/x/model.int8.onnx``)."""
    source = Path(source)
    stem = source.name[: -len(source.suffix)] if source.suffix else source.name
    return source.with_name(stem + FORMATS.get(fmt).suffix)


def export_model(model: nn.Module, fmt: str, path: str | os.PathLike, example: torch.Tensor,
                 calibration: list[torch.Tensor] | None = None, existing: str | os.PathLike | None = None) -> Exported:
    """Write ``model`` as format ``fmt`` at ``path`` (atomically); ``model`` is not changed.

    ``example``: one input ``[1, C, H, W]``; ``calibration``: input batches for formats that
    quantize (required by ``int8-onnx`` on a float model and ``executorch-int8``).
    """
    spec = FORMATS.get(fmt)
    path = Path(path)
    request = ExportRequest(model, example[:1], path, list(calibration or []),
                            Path(existing) if existing else None)
    how = spec.write(request)
    return Exported(spec.name, str(path), path.stat().st_size, spec.engine, how)


def check_export(exported: Exported, model: nn.Module, test_data, dataset: str, example: torch.Tensor) -> CheckResult:
    """Run the written file in its engine on ``test_data`` beside ``model`` (PyTorch): accuracy of
    both, top-1 agreement, the largest logit difference and the engine's batch-1 latency."""
    runner = FORMATS.get(exported.format).open(Path(exported.path))
    logits, labels = runner.predict(test_data)
    ref_logits, _ = TorchRunner(model).predict(test_data)
    return CheckResult(
        engine=exported.engine, dataset=dataset, samples=len(labels),
        accuracy=100.0 * float((logits.argmax(1) == labels).float().mean()),
        reference_accuracy=100.0 * float((ref_logits.argmax(1) == labels).float().mean()),
        agreement=float((logits.argmax(1) == ref_logits.argmax(1)).float().mean()),
        max_abs_diff=float((logits - ref_logits).abs().max()), latency_ms=runner.latency_ms(example[:1]))


def _copy_existing(request: ExportRequest) -> bool:
    """Reuse a file the run already wrote for this model (copied atomically unless it is the target)."""
    if request.existing is None or not request.existing.is_file():
        return False
    if request.existing.resolve() != request.path.resolve():
        from slimkit.atomic import atomic_open

        with open(request.existing, "rb") as src, atomic_open(request.path) as dst:
            shutil.copyfileobj(src, dst)
    return True


def _quantized(model: nn.Module) -> bool:
    from slimkit.deploy.onnx import is_quantized

    return is_quantized(model)


# --- built-in formats ----------------------------------------------------------------------------
@register_format("onnx", ".onnx", "onnxruntime-fp32", open=OnnxRunner)
def _write_onnx(request: ExportRequest) -> str:
    """The float model as ONNX (opset 13, dynamic batch)."""
    from slimkit.deploy.onnx import export_onnx

    if _quantized(request.model):
        raise ConfigError("the model is quantized (slimkit fake-quant layers); its deployable ONNX is "
                          "--format int8-onnx")
    export_onnx(request.model, request.example, request.path)
    return "fp32 ONNX opset 13"


@register_format("int8-onnx", ".int8.onnx", "onnxruntime-int8", open=OnnxRunner, needs_calibration=True)
def _write_int8_onnx(request: ExportRequest) -> str:
    """int8 QDQ ONNX with slimkit's grids (post-training quantization of a float model)."""
    from slimkit.deploy.onnx import export_onnx

    if _quantized(request.model):
        if _copy_existing(request):
            return f"the run's own int8 export ({request.existing})"
        export_onnx(request.model, request.example, request.path)
        return "QDQ export of the model's own int8 grids"
    from slimkit.quantize.uniform import QuantConfig, quantize_

    if not request.calibration:
        raise ConfigError("int8-onnx of a float model needs calibration batches (training inputs)")
    config = QuantConfig()
    quantized = copy.deepcopy(request.model)
    report = quantize_(quantized, request.example, config, calibration=request.calibration)
    export_onnx(quantized, request.example, request.path)
    images = sum(len(b) for b in request.calibration)
    bits = "7-bit (reduce_range)" if report.reduce_range else "8-bit"
    return (f"calibrated int8 PTQ (slimkit quantize_: per-channel symmetric {bits} weights, minmax activations "
            f"on {images} training images), QDQ ONNX")


def _open_slim(path: Path) -> Runner:
    from slimkit.encode.container import load

    return _Decoded(load(path), path)


class _Decoded(TorchRunner):
    def __init__(self, model: nn.Module, path: Path) -> None:
        super().__init__(model)
        self.path = path


@register_format("slim", ".slim", "slimkit-decoded", open=_open_slim)
def _write_slim(request: ExportRequest) -> str:
    """The .slim container (Huffman-coded shared weights, bit-packed quantized/binary layers)."""
    from slimkit.deploy.slim import write_slim

    how = ".slim container, decoded exactly by slimkit (slimkit decode / slimkit.encode.load)"
    if _same_slim(request) and _copy_existing(request):
        return f"the run's own {how} ({request.existing})"
    write_slim(request.model, request.path)
    return how


def _same_slim(request: ExportRequest) -> bool:
    """Whether the run's .slim file decodes to exactly this model's tensors (else it is written anew)."""
    if request.existing is None or not request.existing.is_file():
        return False
    from slimkit.encode.container import read_state

    try:
        _, state = read_state(request.existing)
    except Exception:  # damaged or from another slimkit: write a fresh one
        return False
    want = request.model.state_dict()
    return set(state) == set(want) and all(torch.equal(state[k].to(want[k].dtype), want[k].cpu()) for k in want)


def _open_pte(path: Path) -> Runner:
    from slimkit.deploy.executorch import PteRunner

    return PteRunner(path)


@register_format("executorch", ".pte", "executorch-fp32", open=_open_pte)
def _write_pte(request: ExportRequest) -> str:
    """An XNNPACK-delegated ExecuTorch program of the float model (batch 1)."""
    from slimkit.deploy.executorch import export_pte

    export_pte(request.model, request.example, request.path)
    return "ExecuTorch program, fp32, XNNPACK delegate, batch 1"


@register_format("executorch-int8", ".int8.pte", "executorch-int8", open=_open_pte, needs_calibration=True)
def _write_pte_int8(request: ExportRequest) -> str:
    """The same after the XNNPACK quantizer (int8 weights and activations, its own grids)."""
    from slimkit.deploy.executorch import CALIBRATION_SAMPLES, export_pte

    if not request.calibration:
        raise ConfigError("executorch-int8 needs calibration batches (training inputs)")
    export_pte(request.model, request.example, request.path, int8=True, calibration=request.calibration)
    images = min(CALIBRATION_SAMPLES, sum(len(b) for b in request.calibration))
    return f"ExecuTorch program, XNNPACK quantizer int8 (per-channel, {images} calibration images), batch 1"
