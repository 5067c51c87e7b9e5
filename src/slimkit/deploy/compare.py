"""Running a quantized model for real and choosing the engine that deploys it.

For a model quantized by :func:`slimkit.quantize.quantize_` (and its float original),
:func:`compare_engines` runs every registered engine of the requested families
(:mod:`slimkit.deploy.engines`) on the same inputs and one thread:

- ``onnxruntime-int8``: the QDQ export carrying slimkit's grids (accuracy as executed,
  file size, batch-1 latency) next to ``onnxruntime-fp32`` (the float model in the same engine);
- ``torch-x86-int8``: PyTorch's own x86 int8 path (torch.ao FX, fbgemm/x86 kernels; it
  calibrates its own grids on the same batches) next to ``torch-fp32`` eager;
- ``executorch-*`` (with ``slimkit[executorch]``): the XNNPACK-delegated ``.pte``;
- ``torch-fakequant``: the simulation itself (reference for the agreement figure).

:func:`choose_engine` picks the fastest integer engine whose accuracy meets the target and
says why (on CPUs without VNNI, ONNX Runtime int8 can be slower than its own fp32).
:func:`vs_dense` compares the chosen engine with the dense fp32 baseline in that engine's
float path: what a pruned-then-quantized model buys in total.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.deploy.engines import ENGINES, EngineInput, engines_of
from slimkit.deploy.results import DenseComparison, EngineChoice, EngineComparison, EngineResult
from slimkit.deploy.runners import TorchRunner, agreement
from slimkit.deploy.timing import file_bytes

REFERENCE = "torch-fakequant"


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def compare_engines(qmodel: nn.Module, float_model: nn.Module, test_data, example: torch.Tensor,
                    out_dir: str | Path, calibration: list[torch.Tensor] | None = None,
                    engines: tuple[str, ...] = ("onnxruntime", "torch")) -> EngineComparison:
    """Accuracy, size and batch-1 latency of each engine of the ``engines`` families; see the module
    docstring. An engine that cannot run (an op it cannot export, a package not installed) gets a
    result with ``error`` set; the others still run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = example[:1]
    sim_logits, labels = TorchRunner(qmodel).predict(test_data)
    results = {REFERENCE: EngineResult(REFERENCE, integer=False, accuracy=_accuracy(sim_logits, labels))}
    inp = EngineInput(qmodel, float_model, example, out_dir, list(calibration or [example]))
    for spec in engines_of(tuple(engines)):
        missing = spec.missing()
        if missing:
            results[spec.name] = EngineResult(spec.name, integer=spec.integer, error=missing)
            continue
        try:
            runner = spec.build(inp)
            logits, _ = runner.predict(test_data)
            results[spec.name] = EngineResult(
                spec.name, integer=spec.integer, accuracy=_accuracy(logits, labels),
                latency_ms=runner.latency_ms(example),
                file_bytes=file_bytes(runner.path) if runner.path is not None else None,
                agreement_with_fakequant=agreement(logits, sim_logits) if spec.integer else None,
                path=str(runner.path) if runner.path is not None else None, grids=spec.grids)
        except Exception as err:  # report it and let the other engines decide
            results[spec.name] = EngineResult(spec.name, integer=spec.integer, error=_reason(err))
    return EngineComparison(results)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def choose_engine(results: EngineComparison | Mapping[str, Any], min_accuracy: float) -> EngineChoice:
    """(engine, reason): the fastest integer engine with accuracy >= ``min_accuracy``.

    ``results`` is an :class:`EngineComparison` or its ``to_dict()`` form.
    """
    if not isinstance(results, EngineComparison):
        results = EngineComparison.from_dict(results)
    ok = {k: r for k, r in results.results.items()
          if r.integer and r.ran and r.latency_ms is not None and r.accuracy >= min_accuracy}
    if not ok:
        tried = {k: round(r.accuracy, 2) for k, r in results.results.items() if r.integer and r.ran}
        return EngineChoice(None, f"no integer engine reached {min_accuracy:.2f}% (got {tried})")
    best = min(ok, key=lambda k: ok[k].latency_ms)
    reason = f"{best}: fastest integer engine meeting {min_accuracy:.2f}% ({ok[best].latency_ms:.3f} ms"
    partner = _fp32_of(best)
    fp32 = results.get(partner) if partner else None
    if fp32 is not None and fp32.latency_ms is not None:
        reason += f", {fp32.latency_ms / ok[best].latency_ms:.2f}x vs {partner}"
    others = [f"{k} {r.latency_ms:.3f} ms" for k, r in ok.items() if k != best]
    return EngineChoice(best, reason + (f"; also met the target: {', '.join(others)})" if others else ")"))


def _fp32_of(engine: str) -> str | None:
    return ENGINES.get(engine).fp32 if engine in ENGINES else None


def vs_dense(results: EngineComparison, engine: str | None, dense: nn.Module | None, example: torch.Tensor,
             out_dir: str | Path, deployed_bytes: int, reuse_fp32: bool = False) -> DenseComparison:
    """The deployed model (``engine``'s result) against ``dense`` run by the same engine's fp32 path.

    ``reuse_fp32``: the float model the engines compared *is* ``dense`` (the first stage's input
    is the baseline), so its fp32 timing is reused instead of measured again.
    """
    from slimkit.measure import state_dict_bytes

    chosen = results.get(engine) if engine else None
    if chosen is None or dense is None or chosen.latency_ms is None:
        return DenseComparison(skipped="no integer engine was chosen")
    fp32_name = _fp32_of(engine)
    if fp32_name is None:
        return DenseComparison(skipped=f"{engine} has no fp32 path registered")
    measured = results.get(fp32_name)
    example = example[:1]
    try:
        if reuse_fp32 and measured is not None and measured.latency_ms is not None:
            dense_ms = measured.latency_ms
        else:
            spec = ENGINES.get(fp32_name)
            runner = spec.build(EngineInput(dense.eval(), dense.eval(), example, Path(out_dir) / "dense-baseline"))
            dense_ms = runner.latency_ms(example)
    except Exception as err:  # the dense model may hold ops the engine cannot export
        return DenseComparison(skipped=_reason(err))
    dense_bytes = state_dict_bytes(dense)
    return DenseComparison(dense_engine=fp32_name, dense_fp32_ms=dense_ms, deployed_engine=engine,
                           deployed_ms=chosen.latency_ms, speedup=dense_ms / chosen.latency_ms,
                           dense_fp32_bytes=dense_bytes, deployed_bytes=deployed_bytes,
                           size_ratio=dense_bytes / deployed_bytes)
