"""ExecuTorch: a ``.pte`` program for PyTorch's on-device runtime, delegated to XNNPACK.

:func:`export_pte` lowers a float model (``torch.export`` -> edge dialect -> XNNPACK
partitioner -> ExecuTorch program), or, with ``int8=True``, first quantizes it with the
XNNPACK quantizer (PT2E: symmetric per-channel int8 weights, int8 activations calibrated on
the given batches; its own grids, as PyTorch's x86 path has). The program has a static
batch-1 input, the embedded real-time case. :class:`PteRunner` executes it with
ExecuTorch's Python runtime, which makes ``executorch-fp32`` and ``executorch-int8`` two
more engines (family ``executorch``; optional extra ``slimkit[executorch]``).

Nothing here imports ``executorch`` until it is used.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from slimkit.deploy.engines import EngineInput, register_engine
from slimkit.deploy.runners import Runner

EXTRA = "executorch"
#: calibration samples fed (one at a time: the exported graph has batch 1) to the XNNPACK quantizer
CALIBRATION_SAMPLES = 128


def require_executorch() -> None:
    """One ConfigError line naming the missing package when ExecuTorch cannot be imported here."""
    from slimkit.exceptions import ConfigError

    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
        from executorch.exir import to_edge_transform_and_lower  # noqa: F401
    except Exception as err:  # ImportError, or an executorch built for another torch failing at import
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"--format executorch needs the executorch package working beside torch "
                          f"{torch.__version__} ({type(err).__name__}: {reason}); pip install 'slimkit[{EXTRA}]'"
                          ) from None


def _samples(calibration: list[torch.Tensor], limit: int = CALIBRATION_SAMPLES) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for batch in calibration:
        for row in batch:
            if len(out) >= limit:
                return out
            out.append(row.unsqueeze(0))
    return out


def export_pte(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, int8: bool = False,
               calibration: list[torch.Tensor] | None = None) -> Path:
    """Write ``model`` as an XNNPACK-delegated ExecuTorch program at ``path`` (atomically).

    ``example``: one input ``[1, C, H, W]``. ``int8``: quantize with the XNNPACK quantizer first,
    calibrated on ``calibration`` (batches ``[N, C, H, W]``, fed one sample at a time).
    The model is not changed.
    """
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from slimkit.atomic import atomic_write_bytes
    from slimkit.exceptions import UnsupportedModelError

    example = example[:1]
    model = _plain_copy(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if int8:
                model = _xnnpack_int8(model, example, calibration or [example])
            program = torch.export.export(model, (example,))
            buffer = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise UnsupportedModelError(f"export_pte: {type(model).__name__} does not lower to ExecuTorch/XNNPACK "
                                    f"({type(err).__name__}: {reason})") from err
    return atomic_write_bytes(path, buffer)


def _plain_copy(model: nn.Module) -> nn.Module:
    import copy

    from slimkit.exceptions import UnsupportedModelError
    from slimkit.quantize.fake import quant_layers

    if quant_layers(model):
        raise UnsupportedModelError("export_pte: the model holds slimkit fake-quant layers; ExecuTorch int8 "
                                    "quantizes the float model itself (use --format executorch-int8 on the "
                                    "float model, or --format int8-onnx for slimkit's own grids)")
    return copy.deepcopy(model).eval()


def _xnnpack_int8(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor]) -> nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
    with torch.no_grad():
        for sample in _samples(calibration):
            prepared(sample)
    return convert_pt2e(prepared)


class PteRunner(Runner):
    """An ExecuTorch program run by its Python runtime (static batch 1: datasets run sample by sample)."""

    batch_size = 1

    def __init__(self, path: str | os.PathLike) -> None:
        require_executorch()
        from executorch.runtime import Runtime

        self.path = Path(path)
        self.method = Runtime.get().load_program(str(self.path)).load_method("forward")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous()
        if x.shape[0] == 1:
            return self.method.execute([x])[0].clone()
        return torch.cat([self.method.execute([row.unsqueeze(0).contiguous()])[0].clone() for row in x])


@register_engine("executorch-fp32", family="executorch", integer=False, runs="float", requires=("executorch",),
                 extra=EXTRA)
def _executorch_fp32(inp: EngineInput) -> Runner:
    """The float model as an XNNPACK-delegated ExecuTorch program."""
    return PteRunner(export_pte(inp.float_model, inp.example, inp.out_dir / "model.pte"))


@register_engine("executorch-int8", family="executorch", integer=True, runs="float", fp32="executorch-fp32",
                 requires=("executorch",), extra=EXTRA, grids="XNNPACK quantizer's own observers (same calibration)")
def _executorch_int8(inp: EngineInput) -> Runner:
    """The float model quantized by the XNNPACK quantizer (PT2E), as an ExecuTorch program."""
    return PteRunner(export_pte(inp.float_model, inp.example, inp.out_dir / "model.int8.pte", int8=True,
                                calibration=inp.calibration))
