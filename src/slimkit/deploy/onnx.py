"""ONNX export: fp32, or int8 QDQ carrying slimkit's own grids (run by :class:`slimkit.deploy.runners.OnnxRunner`).

A model quantized by :func:`slimkit.quantize.quantize_` exports as QuantizeLinear /
DequantizeLinear pairs around every quantized Conv/Gemm input and weight, with the scales
and zero points slimkit calibrated. Weight quantizers are then folded: the file stores the
int8 (or uint8) codes as initializers feeding a DequantizeLinear, so it is about 4x
smaller than fp32, and ONNX Runtime fuses the QDQ groups into integer kernels where it can.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 13


def _fold_weight_quantizers(path: Path) -> int:
    """Replace QuantizeLinear(constant weight) by its integer result; returns how many."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    const_nodes = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            const_nodes[node.output[0]] = node
        elif node.op_type == "Identity" and node.input[0] in consts:
            # the exporter deduplicates equal initializers (e.g. all-zero zero points) behind Identity
            consts[node.output[0]] = consts[node.input[0]]
    folded, remove = 0, []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in consts:
            continue
        x = consts[node.input[0]].astype(np.float32)
        scale = consts[node.input[1]].astype(np.float32)
        zero = consts[node.input[2]] if len(node.input) > 2 else np.zeros((), np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zero_b = scale.reshape(shape), zero.reshape(shape)
        else:
            zero_b = zero
        info = np.iinfo(zero.dtype)
        q = np.clip(np.rint(x / scale) + zero_b.astype(np.int32), info.min, info.max).astype(zero.dtype)
        name = node.output[0] + "_int"
        graph.initializer.append(numpy_helper.from_array(q, name))
        for other in graph.node:
            for i, inp in enumerate(other.input):
                if inp == node.output[0]:
                    other.input[i] = name
        remove.append(node)
        folded += 1
    for node in remove:
        graph.node.remove(node)
    # drop initializers / constants nobody reads any more (the fp32 weights)
    used = {inp for node in graph.node for inp in node.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    for name, node in const_nodes.items():
        if name not in used and node in graph.node:
            graph.node.remove(node)
    onnx.save(model, str(path))
    return folded


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds slimkit fake-quant layers (it then exports as int8 QDQ)."""
    from slimkit.quantize.fake import quant_layers

    return bool(quant_layers(model))


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` as ONNX (opset 13, dynamic batch); int8 QDQ if it is quantized.

    The model is not changed (export mode is switched on and off around the call). The file
    appears under its name only once complete (written beside it, then renamed).
    """
    from slimkit.quantize.fake import quant_layers, set_export_mode

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    quantized = bool(quant_layers(model))
    for layer in quant_layers(model).values():
        if layer.act_bits not in (None, 8):
            from slimkit.exceptions import ConfigError

            raise ConfigError(f"export_onnx: layer uses {layer.act_bits}-bit activations; only 8 (or float) exports "
                              "to integer ONNX; quantize with act_bits: 8")
    was_training = model.training
    model.eval()
    set_export_mode(model, True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, (example_inputs,), str(tmp), dynamo=False, opset_version=OPSET,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            except OSError:  # the path, not the model
                raise
            except Exception as err:  # an op without an ONNX symbolic, data-dependent control flow, ...
                from slimkit.exceptions import UnsupportedModelError

                reason = (str(err).strip().splitlines() or [""])[0][:200]
                raise UnsupportedModelError(f"export_onnx: {type(model).__name__} does not export to ONNX opset "
                                            f"{OPSET} ({type(err).__name__}: {reason})") from err
        if quantized:
            _fold_weight_quantizers(tmp)
        os.replace(tmp, path)
    finally:
        set_export_mode(model, False)
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    return path
