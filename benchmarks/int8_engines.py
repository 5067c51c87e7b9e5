"""fp32 vs int8 batch-1 latency in ONNX Runtime and in PyTorch's x86 int8 path, as ratios.

Each model is quantized per channel (slimkit's grids, calibrated on digits) and run by
:func:`slimkit.deploy.compare_engines` on one thread: ONNX Runtime fp32 vs the QDQ int8 export,
torch eager fp32 vs torch.ao x86 int8 (FX). Weights are untrained (latency does not depend on
them); accuracy is not reported here (see benchmarks/quantization_targets.py). A ratio > 1 means
int8 is faster. On CPUs without VNNI (AVX2 only) int8 is often *not* faster at these sizes.

    .venv/bin/python benchmarks/int8_engines.py                    # lenet5, resnet20-cifar
    .venv/bin/python benchmarks/int8_engines.py --models mobilenet_v2 --size 56
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20-cifar"])
    parser.add_argument("--size", type=int, default=28, help="input height = width (digits: 28)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from torch.utils.data import TensorDataset

    from slimkit.deploy import compare_engines
    from slimkit.models import create_model
    from slimkit.quantize import quantize_

    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    print(f"CPU VNNI: {'yes' if vnni else 'no'}; torch threads {args.threads}; batch 1, {args.size}x{args.size}")
    print("| model | ORT fp32 ms | ORT int8 ms | ORT fp32/int8 | torch fp32 ms | torch x86 int8 ms | torch fp32/int8 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    out = tempfile.mkdtemp(prefix="int8-engines-")
    for name in args.models:
        channels = 1 if name.startswith("lenet") else 3
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_channels=channels).eval()
        x = torch.randn(64, channels, args.size, args.size)
        data = TensorDataset(x, torch.zeros(64, dtype=torch.long))
        q = create_model(name, num_classes=10, in_channels=channels).eval()
        q.load_state_dict(model.state_dict())
        quantize_(q, x[:1], {"bits": 8}, calibration=[x])
        r = compare_engines(q, model, data, x[:1], out, calibration=[x], engines=("onnxruntime", "torch"))
        of, oi = r["onnxruntime-fp32"].latency_ms, r["onnxruntime-int8"].latency_ms
        tf = r["torch-fp32"].latency_ms
        ti = r["torch-x86-int8"].latency_ms
        tcell = f"{ti:.3f} | {tf / ti:.2f}x" if ti else f"failed ({(r['torch-x86-int8'].error or '')[:60]}) | -"
        print(f"| {name} | {of:.3f} | {oi:.3f} | {of / oi:.2f}x | {tf:.3f} | {tcell} |", flush=True)


if __name__ == "__main__":
    main()
