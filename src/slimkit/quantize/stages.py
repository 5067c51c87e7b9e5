"""Recipe stages of this package: ``int8`` (post-training), ``qat`` (quantization-aware
fine-tune) and ``binarize`` (BWN / XNOR).

``int8`` and ``qat`` report the *deployed* figures: the model is exported to ONNX QDQ with
slimkit's grids (``model.int8.onnx`` in the stage directory), executed by ONNX Runtime and
by PyTorch's x86 int8 path, and the fastest engine meeting the accuracy target (the
model's float accuracy minus ``max_drop`` points) is chosen; its accuracy and latency are
the stage's, the reason is in ``details.engine_reason``.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from slimkit.quantize.binary import BinarizeConfig, binarize_, binary_layers, binary_stored_bytes, use_kernel_
from slimkit.quantize.fake import freeze_
from slimkit.quantize.uniform import QuantConfig, calibration_batches, quantize_, stored_bytes
from slimkit.stages import StageContext, StageOutput, register_stage
from slimkit.train import StepInfo, TrainHooks


class Int8StageConfig(QuantConfig):
    """QuantConfig plus deployment: engines to try and the accuracy target."""

    engines: tuple[str, ...] = ("onnxruntime", "torch")
    max_drop: float = Field(1.0, ge=0, description="accuracy target: float accuracy minus this many points")


class QATStageConfig(Int8StageConfig):
    """Int8StageConfig plus when activation ranges freeze (fraction of fine-tune steps)."""

    freeze_after: float = Field(0.5, ge=0, le=1)


def _calibration(ctx: StageContext, config: QuantConfig) -> list[torch.Tensor]:
    return list(calibration_batches(ctx.data.train, config))


def _deploy(qmodel: nn.Module, float_model: nn.Module, config: Int8StageConfig, ctx: StageContext,
            details: dict) -> StageOutput:
    from slimkit.export.engines import choose_engine, compare_engines

    float_acc = ctx.evaluate(float_model)
    calib = _calibration(ctx, config)
    engines = config.engines
    if config.act_bits != 8:
        engines = tuple(e for e in engines if e != "onnxruntime")
        details["onnx_skipped"] = f"act_bits={config.act_bits}: only 8-bit activations export to integer ONNX"
    results = compare_engines(qmodel, float_model, ctx.data.test, ctx.example_inputs, ctx.stage_dir, calib, engines)
    engine, reason = choose_engine(results, float_acc - config.max_drop)
    details.update(float_accuracy=float_acc, engines=results, engine_reason=reason,
                   fakequant_accuracy=results["torch-fakequant"]["accuracy"])
    chosen = results.get(engine or "", {})
    artifacts = {}
    if "onnxruntime-int8" in results:
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
    quant = QuantConfig(**config.model_dump(exclude={"engines", "max_drop"}))
    report = quantize_(model, quant, calibration=_calibration(ctx, quant))
    return _deploy(model, float_model, config, ctx, report)


@register_stage("qat", QATStageConfig)
def qat_stage(model: nn.Module, config: QATStageConfig, ctx: StageContext) -> StageOutput:
    """Quantization-aware training: PTQ start, fine-tune with fake quant (STE), then deploy as int8."""
    float_model = copy.deepcopy(model).eval()
    quant = QuantConfig(**config.model_dump(exclude={"engines", "max_drop", "freeze_after"}))
    report = quantize_(model, quant, calibration=_calibration(ctx, quant))
    report["ptq_accuracy"] = ctx.evaluate(model) if ctx.evaluate else None

    def freeze_late(m: nn.Module, info: StepInfo) -> None:
        if info.step >= config.freeze_after * info.total_steps:
            freeze_(m)

    def finalize(trained: nn.Module) -> StageOutput:
        return _deploy(trained, float_model, config, ctx, dict(report))

    return StageOutput(model=model, details=report, hooks=TrainHooks(after_step=(freeze_late,)),
                       stored_bytes=stored_bytes(model), phase="simulated", finalize=finalize)


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
            with torch.no_grad():
                kernel_acc = ctx.evaluate(trained)
                kernel_ms = median_ms(lambda: trained(example), repeats=20)
            use_kernel_(trained, False)
            details.update(kernel_accuracy=kernel_acc, kernel_latency_ms=kernel_ms)
            if kernel_ms < sim_ms and kernel_acc >= sim_acc - 0.5:
                engine, acc, latency = "xnor-kernel", kernel_acc, kernel_ms
        details["engine_reason"] = f"{engine}: faster of torch float simulation and the bit-packed kernel"
        details["binary_weights"] = sum(m.weight.numel() for m in binary_layers(trained).values())
        return StageOutput(model=trained, details=details, stored_bytes=binary_stored_bytes(trained), accuracy=acc,
                           engine=engine, latency_ms=latency, phase="simulated")

    return StageOutput(model=model, details=report, stored_bytes=binary_stored_bytes(model), phase="simulated",
                       finalize=finalize)
