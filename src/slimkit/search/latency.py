"""Per-layer latency measured on the target engine, cached by layer shape, and the predictor built on it.

NetAdapt (Yang et al. 2018, "NetAdapt: Platform-Aware Neural Network Adaptation for Mobile
Applications") searches against *measured* latency through per-layer lookup tables; so
does this module. Every Conv2d/Linear of a candidate is described by its signature (type,
input shape, output channels, kernel, stride, padding, dilation, groups, bias); a layer of
that signature with random weights is run alone on the engine (``eager``, ``onnxruntime``,
``onnxruntime-int8``: quantized to int8 first) with a fixed thread count, batch 1, and its
median is stored in ``latency_table.json`` in the run directory under that signature, so a
shape is measured once per engine however many candidates contain it.

The additive prediction of a whole model is ``sum(max(layer - call overhead, 0)) + residual``: the
call overhead is the median of the engine running a 1 x 1 Linear (what running any
single-layer model costs beyond its arithmetic), the residual is calibrated once on the
baseline (its measured end-to-end median minus its sum: the layers the table does not hold,
batch norm, activations, additions, and the engine's own per-inference cost). The p99 is
predicted as the median times the baseline's measured p99 / median. Every candidate the search
then measures end to end recalibrates it (:meth:`LatencyPredictor.add_point`: a least-squares
line from the per-layer sum to the measured p99); the error of its predictions on candidates
not yet measured, calibrated and additive, is reported by the search (``search.json``,
``latency_predictor``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.atomic import atomic_write_bytes
from slimkit.global_state import num_threads
from slimkit.measure.realtime import engine_callable, realtime_stats, robust_p99_ms


def signature(module: nn.Module, in_shape: tuple[int, ...]) -> str:
    """The cache key of one layer: what its latency depends on."""
    if isinstance(module, nn.Conv2d):
        padding = module.padding if isinstance(module.padding, str) else list(module.padding)
        return (f"Conv2d|in={list(in_shape)}|out={module.out_channels}|k={list(module.kernel_size)}|"
                f"s={list(module.stride)}|p={padding}|d={list(module.dilation)}|g={module.groups}|"
                f"bias={module.bias is not None}")
    return f"Linear|in={list(in_shape)}|out={module.out_features}|bias={module.bias is not None}"


def _fresh(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                         module.dilation, module.groups, module.bias is not None)
    return nn.Linear(module.in_features, module.out_features, module.bias is not None)


def layer_inputs(model: nn.Module, example_inputs: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, input shape with batch 1) of every Conv2d/Linear called by one forward, in call order."""
    calls: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, n=name: calls.append((n, mod, (1, *args[0].shape[1:])))))
    _hooked_forward(model, example_inputs, handles)
    return calls


def _hooked_forward(model: nn.Module, example_inputs: torch.Tensor, handles: list) -> None:
    """One batch-1 forward of ``model`` in eval mode, then the hooks ``handles`` removed (also on an error)."""
    try:
        with torch.no_grad():
            model.eval()(example_inputs[:1])
    finally:
        for h in handles:
            h.remove()


class LatencyTable:
    """Per-layer medians (ms) on one engine, cached in ``path`` (JSON) by :func:`signature`."""

    def __init__(self, path: str | Path, engine: str, threads: int = 1, runs: int = 100) -> None:
        self.path, self.engine, self.threads, self.runs = Path(path), engine, threads, runs
        self.entries: dict[str, float] = {}
        self.measured = 0
        if self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
                self.entries = dict(stored.get(engine, {}).get(f"threads={threads}", {}))
            except (json.JSONDecodeError, AttributeError):
                self.entries = {}

    def _time(self, module: nn.Module, in_shape: tuple[int, ...]) -> float:
        module = module.eval()
        x = torch.randn(in_shape)
        if self.engine == "onnxruntime-int8":
            from slimkit.quantize import quantize_

            module = nn.Sequential(module)
            quantize_(module, x, {"bits": 8, "fold_bn": False}, calibration=[torch.randn(4, *in_shape[1:])])
        with num_threads(None), tempfile.TemporaryDirectory() as tmp:  # eager timing sets torch's count: put it back
            fn = engine_callable(module, x, self.engine, tmp, self.threads)
            return realtime_stats(fn, runs=self.runs, warmup=5).p50_ms

    def overhead_ms(self) -> float:
        """Median of the engine running a 1 x 1 Linear: the cost of a call beyond its arithmetic."""
        key = "overhead|Linear(1,1)"
        if key not in self.entries:
            self.entries[key] = self._time(nn.Linear(1, 1), (1, 1))
            self.measured += 1
            self.save()
        return self.entries[key]

    def layer_ms(self, module: nn.Module, in_shape: tuple[int, ...]) -> float:
        key = signature(module, in_shape)
        if key not in self.entries:
            self.entries[key] = self._time(_fresh(module), in_shape)
            self.measured += 1
        return self.entries[key]

    def model_sum_ms(self, model: nn.Module, example_inputs: torch.Tensor) -> float:
        """Sum over the model's Conv2d/Linear calls of (table median - call overhead, at least 0)."""
        overhead = self.overhead_ms()
        total = sum(max(self.layer_ms(m, shape) - overhead, 0.0) for _, m, shape in layer_inputs(model, example_inputs))
        self.save()
        return total

    def rows(self) -> list[dict[str, Any]]:
        """The table for reports: signature, median ms."""
        return [{"layer": k, "median_ms": round(v, 4)} for k, v in sorted(self.entries.items())]

    def save(self) -> None:
        stored: dict[str, Any] = {}
        if self.path.is_file():
            try:
                stored = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                stored = {}
        stored.setdefault(self.engine, {})[f"threads={self.threads}"] = self.entries
        atomic_write_bytes(self.path, json.dumps(stored, indent=1, sort_keys=True).encode())


def end_to_end(model: nn.Module, example_inputs: torch.Tensor, engine: str, threads: int = 1,
               blocks: int = 5, runs: int = 200) -> dict[str, float]:
    """Measured batch-1 ``{"median_ms", "p99_ms"}`` of the whole model on ``engine`` (p99: block median,
    :func:`slimkit.measure.realtime.robust_p99_ms`)."""
    with num_threads(None), tempfile.TemporaryDirectory() as tmp:
        fn = engine_callable(model.eval(), example_inputs[:1], engine, tmp, threads)
        median = realtime_stats(fn, runs=runs, warmup=10).p50_ms
        return {"median_ms": median, "p99_ms": robust_p99_ms(fn, blocks=blocks, runs=runs, warmup=0)}


def paired_p99_ratio(model: nn.Module, reference: nn.Module, example_inputs: torch.Tensor, engine: str,
                     threads: int = 1, blocks: int = 5, runs: int = 200) -> float:
    """``model``'s batch-1 p99 over ``reference``'s, timed in alternating blocks: the median over ``blocks`` of
    (model's block p99 / the reference's block p99 right before it).

    On a shared machine the load moves between minutes by more than a model's whole latency (a
    ResNet-20 read 0.7 ms in a quiet minute and 4.8 ms in a busy one); two models timed minutes
    apart are then not comparable, two blocks timed back to back mostly are.
    """
    with num_threads(None), tempfile.TemporaryDirectory() as tmp:
        for name in ("model", "reference"):
            (Path(tmp) / name).mkdir()
        fn = engine_callable(model.eval(), example_inputs[:1], engine, Path(tmp) / "model", threads)
        ref = engine_callable(reference.eval(), example_inputs[:1], engine, Path(tmp) / "reference", threads)
        ratios = []
        for block in range(blocks):
            warmup = 10 if block == 0 else 0
            base = realtime_stats(ref, runs=runs, warmup=warmup).p99_ms
            ratios.append(realtime_stats(fn, runs=runs, warmup=warmup).p99_ms / base)
        return float(np.median(ratios))


def layer_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of the Conv2d/Linear calls of one batch-1 forward (output elements times the weights
    each one reads), from one hooked forward: what :func:`slimkit.measure.count_macs` counts for those layers, in
    milliseconds rather than its ~0.7 s on MobileNetV2."""
    from slimkit.measure.macs import conv_macs, linear_macs

    total = 0

    def hook(module, args, output) -> None:
        nonlocal total
        total += (conv_macs if isinstance(module, nn.Conv2d) else linear_macs)(module, args, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    _hooked_forward(model, example_inputs, handles)
    return int(total)


def _fit_line(points: list[tuple[float, float]], proportional: float) -> tuple[float, float]:
    """Least-squares ``(slope, offset)`` of ``p99 = slope * x + offset`` through ``points``; a line not physical
    (slope or offset below 0) or points too close to fit one: ``p99 = k * x`` with ``k`` fitted (``proportional``
    when there is one point)."""
    xs = np.array([x for x, _ in points])
    ys = np.array([y for _, y in points])
    if len(points) > 1 and np.ptp(xs) > 0.01 * float(np.abs(xs).max()):
        slope, offset = np.polyfit(xs, ys, 1)
        if slope > 0 and offset >= 0:
            return float(slope), float(offset)
    if len(points) > 1 and float(xs @ xs) > 0:
        return float((xs @ ys) / (xs @ xs)), 0.0
    return proportional, 0.0


class LatencyPredictor:
    """Whole-model p99 (ms) from a :class:`LatencyTable`'s per-layer sum, calibrated on measured models.

    Before any candidate is measured the prediction is NetAdapt's additive one, calibrated on the
    measured baseline alone: ``p99 = (sum + residual) * tail`` (``residual``: the baseline's measured
    median minus its sum; ``tail``: its p99 / median). The sum is not the whole story (an engine
    reorders layouts between layers, fuses or does not, and its per-layer cost is not additive), so
    every model measured end to end afterwards (:meth:`add_point`) refits ``p99 = slope * sum +
    offset`` by least squares over all measured points, the baseline's included: the error of the
    predictions made *before* a model was measured (held out) is what the search reports.

    A second feature competes with the table's sum: the layers' MACs (:func:`layer_macs`),
    ``p99 = slope * MACs + offset``, proportional to the baseline's before a second point. On
    MobileNetV2 at 28 x 28 pixels on ONNX Runtime the sum missed pruned models by 18 % (a
    line fitted through 22 measured models) and the MACs by 8.6 %: run alone, a layer pays
    layout and call costs that it does not pay inside the whole graph. With ``feature="auto"``
    (:meth:`features`, :meth:`from_features`, :meth:`add_features_point`) each new
    measurement first scores both features' held-out predictions of it, and the feature with
    the lower mean held-out error so far predicts (the table while they tie).
    """

    def __init__(self, table: LatencyTable, baseline: nn.Module, example_inputs: torch.Tensor,
                 measured: dict[str, float], feature: str = "auto") -> None:
        if feature not in ("auto", "table", "macs"):
            from slimkit.exceptions import ConfigError

            raise ConfigError(f"latency predictor feature {feature!r}: use auto, table or macs")
        self.table, self.example, self.feature = table, example_inputs, feature
        self.base_sum = table.model_sum_ms(baseline, example_inputs)
        self.residual = measured["median_ms"] - self.base_sum
        self.tail = measured["p99_ms"] / measured["median_ms"] if measured["median_ms"] > 0 else 1.0
        self.slope, self.offset = self.tail, self.residual * self.tail  # the additive prediction
        self.points: list[tuple[float, float]] = [(self.base_sum, float(measured["p99_ms"]))]
        self.base_macs = float(layer_macs(baseline, example_inputs))
        self.macs_points: list[tuple[float, float]] = [(self.base_macs, float(measured["p99_ms"]))]
        self.macs_slope, self.macs_offset = float(measured["p99_ms"]) / max(self.base_macs, 1.0), 0.0
        self.held_out: dict[str, list[float]] = {"table": [], "macs": []}
        self.active = "macs" if feature == "macs" else "table"

    def features(self, model: nn.Module) -> tuple[float, float]:
        """(the table's per-layer sum in ms, the layers' MACs) of ``model``: what :meth:`from_features` reads."""
        return float(self.sum_ms(model)), float(layer_macs(model, self.example))

    def from_macs(self, macs: float) -> float:
        """The p99 (ms) the MACs line gives."""
        return max(self.macs_slope * macs + self.macs_offset, 1e-6)

    def from_features(self, features: tuple[float, float]) -> float:
        """The p99 (ms) predicted now, by the active feature (see the class docstring)."""
        return self.from_macs(features[1]) if self.active == "macs" else self.from_sum(features[0])

    def add_features_point(self, features: tuple[float, float], p99_ms: float) -> None:
        """Record a model measured end to end: score both features' held-out predictions of it, refit both lines,
        and (``auto``) make the feature with the lower mean held-out error the active one."""
        for name, predicted in (("table", self.from_sum(features[0])), ("macs", self.from_macs(features[1]))):
            self.held_out[name].append(abs(predicted - p99_ms) / p99_ms if p99_ms > 0 else 0.0)
        self.add_point(features[0], p99_ms)
        self.macs_points.append((float(features[1]), float(p99_ms)))
        self.macs_slope, self.macs_offset = _fit_line(self.macs_points, self.macs_slope)
        if self.feature == "auto":
            self.active = "macs" if np.mean(self.held_out["macs"]) < np.mean(self.held_out["table"]) else "table"

    def feature_errors(self) -> dict[str, Any]:
        """Mean held-out error (percent) of each feature's predictions, and the feature active at the end."""
        return {"feature": self.feature, "active_feature": self.active,
                **{f"{name}_mean_abs_error_pct": round(100 * float(np.mean(v)), 2) if v else None
                   for name, v in self.held_out.items()},
                "macs_slope_ms_per_mmac": self.macs_slope * 1e6, "macs_offset_ms": self.macs_offset}

    def sum_ms(self, model: nn.Module) -> float:
        """The table's per-layer sum of ``model`` (ms; what the prediction is a function of)."""
        return self.table.model_sum_ms(model, self.example)

    def additive_ms(self, layer_sum: float) -> float:
        """The baseline-only (uncalibrated) p99 for a per-layer sum (ms)."""
        return max((layer_sum + self.residual) * self.tail, 1e-6)

    def from_sum(self, layer_sum: float) -> float:
        """The calibrated p99 for a per-layer sum (ms)."""
        return max(self.slope * layer_sum + self.offset, 1e-6)

    def add_point(self, layer_sum: float, p99_ms: float) -> None:
        """Record a model measured end to end (its sum, its p99) and refit slope and offset.

        With sums too close to fit a line (spread under 1 % of the largest), or a fit that is not
        physical (a slope or a fixed per-inference cost below 0: two noisy points can tilt a line
        until small models run in negative time), one multiplicative correction of the additive
        prediction is fitted instead.
        """
        self.points.append((float(layer_sum), float(p99_ms)))
        sums = np.array([s for s, _ in self.points])
        p99s = np.array([p for _, p in self.points])
        if np.ptp(sums) > 0.01 * float(np.abs(sums).max()):
            slope, offset = np.polyfit(sums, p99s, 1)
            if slope > 0 and offset >= 0:
                self.slope, self.offset = float(slope), float(offset)
                return
        additive = np.array([self.additive_ms(s) for s in sums])
        factor = float((additive @ p99s) / (additive @ additive))
        self.slope, self.offset = self.tail * factor, self.residual * self.tail * factor

    def median_ms(self, model: nn.Module) -> float:
        return max(self.table.model_sum_ms(model, self.example) + self.residual, 1e-6)

    def p99_ms(self, model: nn.Module) -> float:
        return self.from_sum(self.sum_ms(model))


def predictor_error(points: list[dict[str, float]]) -> dict[str, Any]:
    """Relative error of predicted vs measured (``{"predicted", "measured"}`` points), percent."""
    if not points:
        return {"points": 0}
    errors = np.array([abs(p["predicted"] - p["measured"]) / p["measured"] for p in points if p["measured"] > 0])
    return {"points": len(points), "mean_abs_error_pct": round(100 * float(errors.mean()), 2),
            "max_abs_error_pct": round(100 * float(errors.max()), 2), "pairs": points}


MetricFn = Callable[[nn.Module], float]
