"""Per layer and method: MAC reduction vs measured latency change (eager PyTorch and ONNX Runtime).

A single 3x3 conv (C -> C channels at HxW, batch 1, one thread) is decomposed by every
method at the same rank rule; for each we print the MAC ratio (before/after) and the
measured speed-up (median latency before/after) in eager PyTorch and ONNX Runtime, so
one sees which decompositions turn fewer MACs into less time on a CPU.

    python benchmarks/decompose_latency.py                       # fast default: 64ch @ 16x16
    python benchmarks/decompose_latency.py --layers 64x32 256x8 --rank 0.25 --repeats 50
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from slimkit.decompose import METHODS, decompose_
from slimkit.export.onnx import OnnxRunner, export_onnx
from slimkit.measure import measure_latency

CONV_METHODS = ["tucker", "cp", "channel", "separable", "depthwise-separable"]


def _rank(value: str):
    if value in ("vbmf", "full"):
        return value
    return float(value) if "." in value else int(value)


def bench_layer(channels: int, size: int, method: str, rank, repeats: int, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1)).eval()
    x = torch.randn(1, channels, size, size)
    eager_before = measure_latency(model, x, runs=repeats).median_ms
    ort_before = OnnxRunner(export_onnx(model, x, tmp / "before.onnx")).latency_ms(x, repeats=repeats)
    settings = {"method": method, "rank": rank, "only_if_smaller": False, "cp_max_iter": 50}
    if method == "depthwise-separable" and isinstance(rank, float):
        settings["rank"] = 1  # the MobileNet block: one depthwise filter per input channel
    report = decompose_(model, x, settings)
    row = report.layers[0]
    eager_after = measure_latency(model, x, runs=repeats).median_ms
    ort_after = OnnxRunner(export_onnx(model, x, tmp / "after.onnx")).latency_ms(x, repeats=repeats)
    return dict(layer=f"{channels}ch@{size}x{size}", method=method, ranks="/".join(map(str, row.ranks)),
                mac_ratio=row.macs_before / row.macs_after, eager=eager_before / eager_after,
                ort=ort_before / ort_after, err=row.rel_error, eager_ms=eager_after, ort_ms=ort_after)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=["64x16"], help="CHANNELSxSIZE of 3x3 convs to test")
    parser.add_argument("--methods", nargs="+", default=CONV_METHODS, choices=METHODS.names())
    parser.add_argument("--rank", default="0.25", help="int, fraction, vbmf or full (default 0.25)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'layer':<14} {'method':<20} {'ranks':>8} {'MACs x':>7} {'eager x':>8} {'ORT x':>7} {'rel.err':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.layers:
            channels, size = (int(v) for v in spec.split("x"))
            for method in args.methods:
                r = bench_layer(channels, size, method, _rank(args.rank), args.repeats, Path(tmp))
                rows.append(r)
                print(f"{r['layer']:<14} {r['method']:<20} {r['ranks']:>8} {r['mac_ratio']:7.2f} "
                      f"{r['eager']:8.2f} {r['ort']:7.2f} {r['err']:8.3f}")
    print("(x = before / after: MAC reduction, and measured speed-up of the median latency; >1 is faster)")
    return rows


if __name__ == "__main__":
    main()
