"""Recipe stages that end in deployment: ``int8`` (post-training), ``qat`` (quantization-aware
fine-tune) and ``binarize`` (BWN / XNOR).

``int8`` and ``qat`` report the *deployed* figures: the model is exported to ONNX QDQ with
slimkit's grids (``model.int8.onnx`` in the stage directory), executed by ONNX Runtime and
by PyTorch's x86 int8 path (and any other registered engine the recipe lists, e.g.
``executorch``), and the fastest engine meeting the accuracy target (the model's float
accuracy minus ``max_drop`` points) is chosen; its accuracy and latency are the stage's,
the reason is in ``details.engine_reason``. Every one of them stores its model bit-packed
in ``model.slim``. The quantization side (bit plans, sensitivity) is
:mod:`slimkit.quantize.stages`.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from slimkit.deploy.compare import REFERENCE, choose_engine, compare_engines, vs_dense
from slimkit.deploy.engines import engines_of
from slimkit.deploy.slim import write_slim
from slimkit.measure.latency import measure_latency
from slimkit.measure.storage import stored_bytes
from slimkit.quantize.binary import BinarizeConfig, binarize_, binary_layers, use_kernel_
from slimkit.quantize.stages import AutoBitsConfig, layer_rows, plan_bits
from slimkit.quantize.uniform import QuantConfig, calibration_batches, quantize_
from slimkit.stages import StageContext, StageOutput, register_stage
from slimkit.train import TrainHooks


class Int8StageConfig(AutoBitsConfig):
    """AutoBitsConfig plus deployment: the engine families to try and the accuracy target."""

    engines: tuple[str, ...] = Field(("onnxruntime", "torch"),
                                     description="engine families to run (slimkit.deploy.engines)")
    max_drop: float = Field(1.0, ge=0, description="accuracy target: float accuracy minus this many points")

    @field_validator("engines")
    @classmethod
    def _known_engines(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        engines_of(tuple(value))  # UnknownNameError with the close matches
        return value


class QATStageConfig(Int8StageConfig):
    """Int8StageConfig plus how QAT trains: ``keep_bn`` trains with batch norm (folded weights
    fake-quantized, :mod:`slimkit.quantize.qat`) and folds it at the end; BN statistics
    freeze after ``freeze_bn_after`` and activation ranges after ``freeze_after`` (fractions of
    the fine-tune's steps). ``train_observer`` re-derives the weight grids at every step."""

    freeze_after: float = Field(0.5, ge=0, le=1)
    keep_bn: bool = True
    freeze_bn_after: float = Field(0.5, ge=0, le=1)
    train_observer: Literal["minmax", "mse"] = "minmax"


class BinarizeStageConfig(BinarizeConfig):
    """BinarizeConfig plus whether to evaluate xnor convolutions through the bit-packed kernel."""

    kernel: bool = True


def _calibration(ctx: StageContext, config: QuantConfig) -> list[torch.Tensor]:
    return list(calibration_batches(ctx.data.train, config))


def _slim_artifact(model: nn.Module, ctx: StageContext, details: dict) -> dict[str, str]:
    """Store ``model`` bit-packed in the stage directory's ``model.slim``; record its size."""
    slim = write_slim(model, ctx.stage_dir / "model.slim")
    details["slim_bytes"] = slim.bytes
    return {"model.slim": slim.path}


def requantizes(family: str) -> bool:
    """Whether every integer engine of ``family`` quantizes the float model itself (its own grids)."""
    integer = [spec for spec in engines_of((family,)) if spec.integer]
    return bool(integer) and all(spec.runs == "float" for spec in integer)


def _deploy(qmodel: nn.Module, float_model: nn.Module, config: Int8StageConfig, ctx: StageContext,
            details: dict, trained: bool = False) -> StageOutput:
    float_acc = ctx.evaluate(float_model)
    calib = _calibration(ctx, config)
    engines = tuple(config.engines)
    if config.act_bits != 8:
        engines = tuple(e for e in engines if e != "onnxruntime")
        details["onnx_skipped"] = f"act_bits={config.act_bits}: only 8-bit activations export to integer ONNX"
    # reduce_range turns 8-bit layers into 7-bit ones for int8 kernels that saturate; torch's own
    # x86 path guards against the same overflow itself (fbgemm reduces activations), so 8-bit PTQ
    # is still what it runs
    as_8bit = {8, 7} if details.get("reduce_range") else {8}
    own_grids = trained or any(v["bits"] not in as_8bit for v in details.get("layers", {}).values())
    if own_grids:
        # torch.ao (and the XNNPACK quantizer) quantize the float model with their own 8-bit observers:
        # not this model
        for family in [f for f in engines if requantizes(f)]:
            engines = tuple(e for e in engines if e != family)
            details[f"{family}_skipped"] = (f"{family} int8 re-quantizes the float model at 8 bits with its own "
                                            "grids; it cannot run QAT-trained or sub-8-bit grids")
    results = compare_engines(qmodel, float_model, ctx.data.test, ctx.example_inputs, ctx.stage_dir, calib, engines)
    engine, reason = choose_engine(results, float_acc - config.max_drop)
    details.update(float_accuracy=float_acc, engines=results.to_dict(), engine_reason=reason,
                   fakequant_accuracy=results[REFERENCE].accuracy)
    chosen = results.get(engine) if engine else None
    if isinstance(details.get("layers"), dict):
        details["layer_bits"] = {n: v["bits"] for n, v in details["layers"].items()}
        details["layers"] = layer_rows(details)
    dense = vs_dense(results, engine, ctx.baseline, ctx.example_inputs, ctx.stage_dir, stored_bytes(qmodel),
                     reuse_fp32=ctx.stage_index == 1)
    details["vs_dense_fp32"] = dense.to_dict()
    artifacts = _slim_artifact(qmodel, ctx, details)
    int8_onnx = results.get("onnxruntime-int8")
    if int8_onnx is not None and int8_onnx.path:
        artifacts["model.int8.onnx"] = int8_onnx.path
    return StageOutput(
        model=qmodel, details=details, stored_bytes=stored_bytes(qmodel),
        accuracy=chosen.accuracy if chosen else results[REFERENCE].accuracy,
        engine=engine or REFERENCE, latency_ms=chosen.latency_ms if chosen else None, phase="simulated",
        artifacts=artifacts,
    )


@register_stage("int8", Int8StageConfig)
def int8_stage(model: nn.Module, config: Int8StageConfig, ctx: StageContext) -> StageOutput:
    """Post-training uniform quantization (int8 default), run for real in ONNX Runtime / PyTorch x86."""
    float_model = copy.deepcopy(model).eval()
    quant, planned = plan_bits(model, config, ctx.data.train)
    report = quantize_(model, ctx.example_inputs, quant, calibration=_calibration(ctx, quant)).to_dict()
    report.update(planned)
    return _deploy(model, float_model, config, ctx, report)


@register_stage("qat", QATStageConfig)
def qat_stage(model: nn.Module, config: QATStageConfig, ctx: StageContext) -> StageOutput:
    """Quantization-aware training: PTQ start, fine-tune with fake quant (STE), then deploy as int8."""
    from slimkit.quantize.qat import QATConfig, fold_qat_bn_, late_freezer, prepare_qat_

    float_model = copy.deepcopy(model).eval()
    quant, planned = plan_bits(model, config, ctx.data.train)
    qat = QATConfig(**quant.model_dump(), keep_bn=config.keep_bn, train_observer=config.train_observer)
    report = prepare_qat_(model, ctx.example_inputs, qat, calibration=_calibration(ctx, quant)).to_dict()
    report.update(planned)
    report["ptq_accuracy"] = ctx.evaluate(model)

    def finalize(trained: nn.Module) -> StageOutput:
        details = dict(report)
        details["folded_bn"] = list(report["folded_bn"]) + fold_qat_bn_(trained)
        return _deploy(trained, float_model, config, ctx, details, trained=True)

    hooks = TrainHooks(after_step=(late_freezer(config.freeze_after, config.freeze_bn_after),))
    return StageOutput(model=model, details=report, hooks=hooks,
                       stored_bytes=stored_bytes(model), phase="simulated", finalize=finalize)


@register_stage("binarize", BinarizeStageConfig)
def binarize_stage(model: nn.Module, config: BinarizeStageConfig, ctx: StageContext) -> StageOutput:
    """Binary weights (bwn) or weights and activations (xnor); stored at 1 bit per weight."""
    report = binarize_(model, ctx.example_inputs, BinarizeConfig(**config.model_dump(exclude={"kernel"}))).to_dict()

    def finalize(trained: nn.Module) -> StageOutput:
        details = dict(report)
        example = ctx.example_inputs[:1]
        sim_acc = ctx.evaluate(trained)
        sim_ms = measure_latency(trained, example, runs=20).median_ms
        details.update(simulated_accuracy=sim_acc, simulated_latency_ms=sim_ms)
        engine, acc, latency = "torch", sim_acc, sim_ms
        if config.mode == "xnor" and config.kernel and use_kernel_(trained, True):
            # numba's pool defaults to every core; beside torch's threads on a shared CPU that
            # oversubscribes (batch-1 layers are tiny), so the kernel gets torch's thread count
            from slimkit.global_state import numba_threads

            with torch.no_grad(), numba_threads(torch.get_num_threads()) as threads:
                kernel_acc = ctx.evaluate(trained)
                kernel_ms = measure_latency(trained, example, runs=20).median_ms
            use_kernel_(trained, False)
            details.update(kernel_accuracy=kernel_acc, kernel_latency_ms=kernel_ms, kernel_threads=threads)
            if kernel_ms < sim_ms and kernel_acc >= sim_acc - 0.5:
                engine, acc, latency = "xnor-kernel", kernel_acc, kernel_ms
        details["engine_reason"] = f"{engine}: faster of torch float simulation and the bit-packed kernel"
        details["binary_weights"] = sum(m.weight.numel() for m in binary_layers(trained).values())
        artifacts = _slim_artifact(trained, ctx, details)
        return StageOutput(model=trained, details=details, stored_bytes=stored_bytes(trained), accuracy=acc,
                           engine=engine, latency_ms=latency, phase="simulated", artifacts=artifacts)

    return StageOutput(model=model, details=report, stored_bytes=stored_bytes(model), phase="simulated",
                       finalize=finalize)
