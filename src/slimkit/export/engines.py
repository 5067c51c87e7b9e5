"""Running a quantized model for real and choosing the engine that deploys it.

For a model quantized by :func:`slimkit.quantize.quantize_` (and its float original),
:func:`compare_engines` measures, on the same inputs and one thread:

- ``onnxruntime-int8``: the QDQ export carrying slimkit's grids (accuracy as executed,
  file size, batch-1 latency) next to ``onnxruntime-fp32`` (the float model in the same engine);
- ``torch-x86-int8``: PyTorch's own x86 int8 path (torch.ao FX, fbgemm/x86 kernels; it
  calibrates its own grids on the same batches) next to ``torch-fp32`` eager;
- ``torch-fakequant``: the simulation itself (reference for the agreement figure).

:func:`choose_engine` picks the fastest integer engine whose accuracy meets the target and
says why (on CPUs without VNNI, ONNX Runtime int8 can be slower than its own fp32).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.export.onnx import OnnxRunner, export_onnx, file_bytes, median_ms


def _torch_accuracy(model: nn.Module, dataset) -> tuple[float, torch.Tensor]:
    from slimkit.train import predict

    logits, labels = predict(model, dataset)
    return 100.0 * float((logits.argmax(1) == labels).float().mean()), logits.argmax(1)


def torch_x86_int8(float_model: nn.Module, calibration: list[torch.Tensor], example: torch.Tensor) -> nn.Module:
    """PyTorch's x86 int8 model of ``float_model`` (FX graph mode, per-channel weights)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    model = copy.deepcopy(float_model).eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,))
        except Exception:  # data-dependent control flow (e.g. LeNet-5's FitSize): keep such
            # parameter-free custom modules as opaque leaves (they run in float between int8 layers)
            from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

            opaque = sorted({type(m) for m in model.modules() if m is not model and next(m.parameters(), None) is None
                             and not type(m).__module__.startswith("torch.")}, key=lambda c: c.__name__)
            if not opaque:
                raise
            custom = PrepareCustomConfig().set_non_traceable_module_classes(opaque)
            prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (example,), prepare_custom_config=custom)
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        return convert_fx(prepared)


def compare_engines(qmodel: nn.Module, float_model: nn.Module, test_data, example: torch.Tensor,
                    out_dir: str | Path, calibration: list[torch.Tensor] | None = None,
                    engines: tuple[str, ...] = ("onnxruntime", "torch")) -> dict[str, Any]:
    """Accuracy, size and batch-1 latency of each engine; see the module docstring."""
    out_dir = Path(out_dir)
    example = example[:1]
    results: dict[str, Any] = {}
    sim_acc, sim_pred = _torch_accuracy(qmodel, test_data)
    results["torch-fakequant"] = {"accuracy": sim_acc, "integer": False}
    if "onnxruntime" in engines:
        try:
            results.update(_onnxruntime_results(qmodel, float_model, test_data, example, out_dir, sim_pred))
        except Exception as err:  # an op ONNX cannot export: report it and let the other engines decide
            results["onnxruntime-int8"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    if "torch" in engines:
        results["torch-fp32"] = {"accuracy": _torch_accuracy(float_model, test_data)[0],
                                 "latency_ms": median_ms(lambda: _no_grad(float_model, example)), "integer": False}
        try:
            qx86 = torch_x86_int8(float_model, calibration or [example], example)
            results["torch-x86-int8"] = {"accuracy": _torch_accuracy(qx86, test_data)[0],
                                         "latency_ms": median_ms(lambda: _no_grad(qx86, example)), "integer": True,
                                         "grids": "torch's own observers (same calibration batches)"}
        except Exception as err:  # FX cannot trace some models; say so instead of failing the stage
            results["torch-x86-int8"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return results


def _onnxruntime_results(qmodel: nn.Module, float_model: nn.Module, test_data, example: torch.Tensor,
                         out_dir: Path, sim_pred: torch.Tensor) -> dict[str, Any]:
    fp32_path = export_onnx(float_model, example, out_dir / "model.fp32.onnx")
    int8_path = export_onnx(qmodel, example, out_dir / "model.int8.onnx")
    fp32, int8 = OnnxRunner(fp32_path), OnnxRunner(int8_path)
    logits, labels = int8.predict(test_data)
    return {
        "onnxruntime-fp32": {"accuracy": fp32.evaluate(test_data), "latency_ms": fp32.latency_ms(example),
                             "file_bytes": file_bytes(fp32_path), "integer": False},
        "onnxruntime-int8": {
            "accuracy": 100.0 * float((logits.argmax(1) == labels).float().mean()),
            "latency_ms": int8.latency_ms(example), "file_bytes": file_bytes(int8_path), "integer": True,
            "agreement_with_fakequant": float((logits.argmax(1) == sim_pred).float().mean()),
            "path": str(int8_path),
        },
    }


@torch.no_grad()
def _no_grad(model: nn.Module, x: torch.Tensor):
    return model(x)


def choose_engine(results: dict[str, Any], min_accuracy: float) -> tuple[str | None, str]:
    """(engine, reason): the fastest integer engine with accuracy >= ``min_accuracy``."""
    ok = {k: v for k, v in results.items() if v.get("integer") and "latency_ms" in v and v["accuracy"] >= min_accuracy}
    if not ok:
        tried = {k: round(v["accuracy"], 2) for k, v in results.items() if v.get("integer") and "accuracy" in v}
        return None, f"no integer engine reached {min_accuracy:.2f}% (got {tried})"
    best = min(ok, key=lambda k: ok[k]["latency_ms"])
    reason = f"{best}: fastest integer engine meeting {min_accuracy:.2f}% ({ok[best]['latency_ms']:.3f} ms"
    fp32_name = "onnxruntime-fp32" if best.startswith("onnxruntime") else "torch-fp32"
    if fp32_name in results:
        ratio = results[fp32_name]["latency_ms"] / ok[best]["latency_ms"]
        reason += f", {ratio:.2f}x vs {fp32_name}"
    others = [f"{k} {v['latency_ms']:.3f} ms" for k, v in ok.items() if k != best]
    return best, reason + (f"; also met the target: {', '.join(others)})" if others else ")")
