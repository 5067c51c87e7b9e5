"""Recipe stages of this package: ``int8`` (post-training), ``qat`` (quantization-aware
fine-tune) and ``binarize`` (BWN / XNOR).

``int8`` and ``qat`` report the *deployed* figures: the model is exported to ONNX QDQ with
slimkit's grids (``model.int8.onnx`` in the stage directory), executed by ONNX Runtime and
by PyTorch's x86 int8 path, and the fastest engine meeting the accuracy target (the
model's float accuracy minus ``max_drop`` points) is chosen; its accuracy and latency are
the stage's, the reason is in ``details.engine_reason``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimkit.measure import state_dict_bytes
from slimkit.quantize.binary import BinarizeConfig, binarize_, binary_layers, binary_stored_bytes, use_kernel_
from slimkit.quantize.uniform import QuantConfig, calibration_batches, quantize_, resolve_reduce_range, stored_bytes
from slimkit.stages import StageContext, StageOutput, register_stage
from slimkit.train import TrainHooks


class Int8StageConfig(QuantConfig):
    """QuantConfig plus deployment (engines to try, the accuracy target) and automatic widths.

    ``bits: auto`` measures each layer's sensitivity (accuracy drop and output KL divergence when
    only its weights are quantized at each of ``auto_bits``, on ``sensitivity_samples`` training
    samples; 8 is measured at 7 where ``reduce_range`` applies) and picks widths greedily so that
    the stored model fits ``size_budget_bytes`` or the stage's input fp32 bytes / ``size_ratio``
    (exactly one of the two). Layers matched by ``overrides`` stay
    pinned. ``sensitivity: true`` adds the table without choosing widths.
    """

    bits: Annotated[int, Field(ge=2, le=8)] | Literal["auto"] = Field(8, description="weight bits, or auto")
    engines: tuple[str, ...] = ("onnxruntime", "torch")
    max_drop: float = Field(1.0, ge=0, description="accuracy target: float accuracy minus this many points")
    sensitivity: bool = False
    auto_bits: tuple[int, ...] = (8, 4, 2)
    size_budget_bytes: int | None = Field(None, gt=0)
    size_ratio: float | None = Field(None, gt=1)
    sensitivity_samples: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _check_auto(self):
        if any(not 2 <= b <= 8 for b in self.auto_bits) or not self.auto_bits:
            raise ValueError(f"auto_bits must be integers in [2, 8], got {list(self.auto_bits)}")
        budgets = (self.size_budget_bytes is not None) + (self.size_ratio is not None)
        if self.bits == "auto" and budgets != 1:
            raise ValueError("bits: auto needs exactly one of size_budget_bytes or size_ratio")
        if self.bits != "auto" and budgets:
            raise ValueError("size_budget_bytes / size_ratio only apply with bits: auto")
        return self

    def quant_config(self) -> QuantConfig:
        """The plain QuantConfig (``bits: auto`` becomes the widest of ``auto_bits``)."""
        fields = self.model_dump(include=set(QuantConfig.model_fields))
        if fields["bits"] == "auto":
            fields["bits"] = max(self.auto_bits)
        return QuantConfig(**fields)


class QATStageConfig(Int8StageConfig):
    """Int8StageConfig plus how QAT trains: ``keep_bn`` trains with batch norm (folded weights
    fake-quantized, :mod:`slimkit.quantize.qat`) and folds it at the end; BN statistics
    freeze after ``freeze_bn_after`` and activation ranges after ``freeze_after`` (fractions of
    the fine-tune's steps). ``train_observer`` re-derives the weight grids at every step."""

    freeze_after: float = Field(0.5, ge=0, le=1)
    keep_bn: bool = True
    freeze_bn_after: float = Field(0.5, ge=0, le=1)
    train_observer: Literal["minmax", "mse"] = "minmax"


def _calibration(ctx: StageContext, config: QuantConfig) -> list[torch.Tensor]:
    return list(calibration_batches(ctx.data.train, config))


def _plan_bits(model: nn.Module, config: Int8StageConfig, ctx: StageContext) -> tuple[QuantConfig, dict]:
    """Sensitivity table (and, for ``bits: auto``, the chosen widths) -> (QuantConfig to apply, details)."""
    from torch.utils.data import Subset

    from slimkit.quantize.sensitivity import choose_bits, fold_copy, layer_sensitivity
    from slimkit.selection import matches

    quant = config.quant_config()
    if config.bits != "auto" and not config.sensitivity:
        return quant, {}
    folded = fold_copy(model) if config.fold_bn else copy.deepcopy(model).eval()
    train = ctx.data.train
    subset = Subset(train, range(min(config.sensitivity_samples, len(train))))
    candidates = config.auto_bits if config.bits == "auto" else tuple(sorted({8, 4, 2, config.bits}, reverse=True))
    if resolve_reduce_range(quant)[0] and quant.symmetric:  # 8-bit layers will deploy on the 7-bit grid
        candidates = tuple(sorted({7 if b == 8 else b for b in candidates}, reverse=True))
    ignore = tuple(config.ignore) + tuple(config.overrides)
    table = layer_sensitivity(folded, subset, candidates, config.layers, ignore, config.per_channel,
                              config.symmetric, config.weight_observer)
    details: dict = {"sensitivity": {n: {str(b): asdict(c) for b, c in row.items()} for n, row in table.items()},
                     "sensitivity_on": f"{len(subset)} training samples, one layer's weights quantized at a time; "
                                       "drop: accuracy points, kl: mean KL(float || quantized) of the softmax, nats"}
    if config.bits != "auto":
        return quant, details
    from slimkit.selection import select_modules

    pinned = select_modules(folded, (nn.Conv2d, nn.Linear), config.layers, config.ignore, what="int8.layers")
    fixed = {}
    for name in pinned:
        for glob, bits in config.overrides.items():
            if matches(name, (glob,)):
                fixed[name] = bits
                break
    float_bytes = state_dict_bytes(model)
    budget = config.size_budget_bytes or int(float_bytes / config.size_ratio)
    plan = choose_bits(folded, table, budget, config.act_bits, config.per_channel, config.symmetric, fixed,
                       scale_bytes=2 if config.scale_dtype == "float16" else 4)
    details.update(auto_bits={"budget_bytes": budget, "planned_bytes": plan.stored_bytes,
                              "float_bytes": float_bytes, "predicted_drop": plan.predicted_drop,
                              "predicted_kl": plan.predicted_kl, "steps": plan.steps})
    quant = quant.model_copy(update={"overrides": {**plan.overrides(), **config.overrides}})
    return quant, details


def _layer_rows(details: dict) -> list[dict]:
    """details["layers"] as a list of rows (report.md renders a list of dicts as a table)."""
    sens = details.get("sensitivity", {})
    rows = []
    for name, info in details.get("layers", {}).items():
        row = {"layer": name, "type": info.get("type"), "bits": info.get("bits"), "act_bits": info.get("act_bits")}
        cells = sens.get(name, {})
        row.update({f"drop@{bits}b": cell["drop"] for bits, cell in cells.items()})
        row.update({f"kl@{bits}b": float(f"{cell['kl']:.3g}") for bits, cell in cells.items()})
        rows.append(row)
    return rows


def _write_slim(model: nn.Module, ctx: StageContext, details: dict) -> dict[str, str]:
    """Store ``model`` bit-packed in the .slim container (stage directory); record its file size."""
    from slimkit.encode import save

    path = ctx.stage_dir / "model.slim"
    save(model, path)
    details["slim_bytes"] = path.stat().st_size
    return {"model.slim": str(path)}


def _vs_dense(ctx: StageContext, results: dict, engine: str | None, deployed_bytes: int) -> dict:
    """The deployed model against the dense fp32 baseline run by the same engine's fp32 path
    (batch 1, one thread): what a pruned-then-quantized model buys in total."""
    from slimkit.export.onnx import OnnxRunner, export_onnx, median_ms

    if engine is None or ctx.baseline is None or "latency_ms" not in results.get(engine, {}):
        return {"skipped": "no integer engine was chosen"}
    dense, example = ctx.baseline.eval(), ctx.example_inputs[:1]
    fp32_engine = "onnxruntime-fp32" if engine.startswith("onnxruntime") else "torch-fp32"
    try:
        if ctx.stage_index == 1 and "latency_ms" in results.get(fp32_engine, {}):
            dense_ms = results[fp32_engine]["latency_ms"]  # the first stage's input is the baseline itself
        elif fp32_engine == "onnxruntime-fp32":
            dense_ms = OnnxRunner(export_onnx(dense, example, ctx.stage_dir / "baseline.fp32.onnx")).latency_ms(example)
        else:
            with torch.no_grad():
                dense_ms = median_ms(lambda: dense(example))
    except Exception as err:  # the dense model may hold ops ONNX cannot export
        return {"skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    dense_bytes = state_dict_bytes(dense)
    deployed_ms = results[engine]["latency_ms"]
    return {"dense_engine": fp32_engine, "dense_fp32_ms": dense_ms, "deployed_engine": engine,
            "deployed_ms": deployed_ms, "speedup": dense_ms / deployed_ms, "dense_fp32_bytes": dense_bytes,
            "deployed_bytes": deployed_bytes, "size_ratio": dense_bytes / deployed_bytes}


def _deploy(qmodel: nn.Module, float_model: nn.Module, config: Int8StageConfig, ctx: StageContext,
            details: dict, trained: bool = False) -> StageOutput:
    from slimkit.export.engines import choose_engine, compare_engines

    float_acc = ctx.evaluate(float_model)
    calib = _calibration(ctx, config)
    engines = config.engines
    if config.act_bits != 8:
        engines = tuple(e for e in engines if e != "onnxruntime")
        details["onnx_skipped"] = f"act_bits={config.act_bits}: only 8-bit activations export to integer ONNX"
    # reduce_range turns 8-bit layers into 7-bit ones for int8 kernels that saturate; torch's own
    # x86 path guards against the same overflow itself (fbgemm reduces activations), so 8-bit PTQ
    # is still what it runs
    as_8bit = {8, 7} if details.get("reduce_range") else {8}
    own_grids = trained or any(v["bits"] not in as_8bit for v in details.get("layers", {}).values())
    if own_grids and "torch" in engines:
        # torch.ao quantizes the float model with its own 8-bit observers: not this model
        engines = tuple(e for e in engines if e != "torch")
        details["torch_skipped"] = ("torch x86 int8 re-quantizes the float model at 8 bits with its own grids; "
                                    "it cannot run QAT-trained or sub-8-bit grids")
    results = compare_engines(qmodel, float_model, ctx.data.test, ctx.example_inputs, ctx.stage_dir, calib, engines)
    engine, reason = choose_engine(results, float_acc - config.max_drop)
    details.update(float_accuracy=float_acc, engines=results, engine_reason=reason,
                   fakequant_accuracy=results["torch-fakequant"]["accuracy"])
    chosen = results.get(engine or "", {})
    if isinstance(details.get("layers"), dict):
        details["layer_bits"] = {n: v["bits"] for n, v in details["layers"].items()}
        details["layers"] = _layer_rows(details)
    details["vs_dense_fp32"] = _vs_dense(ctx, results, engine, stored_bytes(qmodel))
    artifacts = _write_slim(qmodel, ctx, details)
    if "path" in results.get("onnxruntime-int8", {}):
        artifacts["model.int8.onnx"] = results["onnxruntime-int8"]["path"]
    return StageOutput(
        model=qmodel, details=details, stored_bytes=stored_bytes(qmodel),
        accuracy=chosen.get("accuracy", results["torch-fakequant"]["accuracy"]),
        engine=engine or "torch-fakequant", latency_ms=chosen.get("latency_ms"), phase="simulated",
        artifacts=artifacts,
    )


@register_stage("int8", Int8StageConfig)
def int8_stage(model: nn.Module, config: Int8StageConfig, ctx: StageContext) -> StageOutput:
    """Post-training uniform quantization (int8 default), run for real in ONNX Runtime / PyTorch x86."""
    float_model = copy.deepcopy(model).eval()
    quant, planned = _plan_bits(model, config, ctx)
    report = quantize_(model, quant, calibration=_calibration(ctx, quant))
    report.update(planned)
    return _deploy(model, float_model, config, ctx, report)


@register_stage("qat", QATStageConfig)
def qat_stage(model: nn.Module, config: QATStageConfig, ctx: StageContext) -> StageOutput:
    """Quantization-aware training: PTQ start, fine-tune with fake quant (STE), then deploy as int8."""
    from slimkit.quantize.qat import fold_qat_bn_, late_freezer, prepare_qat_

    float_model = copy.deepcopy(model).eval()
    quant, planned = _plan_bits(model, config, ctx)
    report = prepare_qat_(model, quant, _calibration(ctx, quant), config.keep_bn, config.train_observer)
    report.update(planned)
    report["ptq_accuracy"] = ctx.evaluate(model) if ctx.evaluate else None

    def finalize(trained: nn.Module) -> StageOutput:
        details = dict(report)
        details["folded_bn"] = list(report["folded_bn"]) + fold_qat_bn_(trained)
        return _deploy(trained, float_model, config, ctx, details, trained=True)

    hooks = TrainHooks(after_step=(late_freezer(config.freeze_after, config.freeze_bn_after),))
    return StageOutput(model=model, details=report, hooks=hooks,
                       stored_bytes=stored_bytes(model), phase="simulated", finalize=finalize)


@contextlib.contextmanager
def numba_threads(count: int):
    """Run numba's parallel kernels on ``count`` threads (capped at its pool size) inside the block."""
    import numba

    old = numba.get_num_threads()
    count = max(1, min(int(count), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(count)
    try:
        yield count
    finally:
        numba.set_num_threads(old)


class BinarizeStageConfig(BinarizeConfig):
    """BinarizeConfig plus whether to evaluate xnor convolutions through the bit-packed kernel."""

    kernel: bool = True


@register_stage("binarize", BinarizeStageConfig)
def binarize_stage(model: nn.Module, config: BinarizeStageConfig, ctx: StageContext) -> StageOutput:
    """Binary weights (bwn) or weights and activations (xnor); stored at 1 bit per weight."""
    report = binarize_(model, BinarizeConfig(**config.model_dump(exclude={"kernel"})))

    def finalize(trained: nn.Module) -> StageOutput:
        from slimkit.export.onnx import median_ms

        details = dict(report)
        example = ctx.example_inputs[:1]
        sim_acc = ctx.evaluate(trained)
        with torch.no_grad():
            sim_ms = median_ms(lambda: trained.eval()(example), repeats=20)
        details.update(simulated_accuracy=sim_acc, simulated_latency_ms=sim_ms)
        engine, acc, latency = "torch", sim_acc, sim_ms
        if config.mode == "xnor" and config.kernel and use_kernel_(trained, True):
            # numba's pool defaults to every core; beside torch's threads on a shared CPU that
            # oversubscribes (batch-1 layers are tiny), so the kernel gets torch's thread count
            with torch.no_grad(), numba_threads(torch.get_num_threads()) as threads:
                kernel_acc = ctx.evaluate(trained)
                kernel_ms = median_ms(lambda: trained(example), repeats=20)
            use_kernel_(trained, False)
            details.update(kernel_accuracy=kernel_acc, kernel_latency_ms=kernel_ms, kernel_threads=threads)
            if kernel_ms < sim_ms and kernel_acc >= sim_acc - 0.5:
                engine, acc, latency = "xnor-kernel", kernel_acc, kernel_ms
        details["engine_reason"] = f"{engine}: faster of torch float simulation and the bit-packed kernel"
        details["binary_weights"] = sum(m.weight.numel() for m in binary_layers(trained).values())
        artifacts = _write_slim(trained, ctx, details)
        return StageOutput(model=trained, details=details, stored_bytes=binary_stored_bytes(trained), accuracy=acc,
                           engine=engine, latency_ms=latency, phase="simulated", artifacts=artifacts)

    return StageOutput(model=model, details=report, stored_bytes=binary_stored_bytes(model), phase="simulated",
                       finalize=finalize)
