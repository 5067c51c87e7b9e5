"""Real latency of structurally pruned vs dense models (eager PyTorch and ONNX Runtime).

For each ratio: prune a copy (l1, local), time dense and pruned in the same run, and print
the realized speed-up, the MAC reduction and their quotient (1.0 = speed follows MACs).

    python benchmarks/structured_latency.py --model mobilenet_v2 --size 64 --ratios 0.3,0.5 [--onnx]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import torch
import torchvision

from slimkit.measure import count_macs, measure_latency
from slimkit.prune import structured_


def ort_latency(model, x, runs: int) -> float:
    """Median batch latency (ms) of ``model`` exported to ONNX and run by ONNX Runtime on one thread."""
    from slimkit.export import OnnxRunner, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        return OnnxRunner(export_onnx(model, x, Path(tmp) / "m.onnx")).latency_ms(x, warmup=3, repeats=runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--onnx", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dense = torchvision.models.get_model(args.model, num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)
    macs0 = count_macs(dense, x)
    t0 = measure_latency(dense, x, runs=args.runs).median_ms
    o0 = ort_latency(dense, x, args.runs) if args.onnx else None
    print(f"{args.model} @ {args.size}: dense {macs0 / 1e6:.1f} MMACs, eager {t0:.2f} ms"
          + (f", ORT {o0:.2f} ms" if o0 else ""))
    for ratio in (float(r) for r in args.ratios.split(",")):
        model = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structured_(model, x, {"ratio": ratio})
        mac_red = macs0 / count_macs(model, x)
        t = measure_latency(model, x, runs=args.runs).median_ms
        line = (f"ratio {ratio:.2f}: MACs x{mac_red:.2f}, eager {t:.2f} ms, speed-up x{t0 / t:.2f}, "
                f"speed-up / MAC reduction {t0 / t / mac_red:.2f}")
        if args.onnx:
            o = ort_latency(model, x, args.runs)
            line += f"; ORT {o:.2f} ms, speed-up x{o0 / o:.2f} ({o0 / o / mac_red:.2f} of MACs)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
