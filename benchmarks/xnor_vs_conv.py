"""xnor_conv2d (bit-packed XNOR-popcount, numba) vs torch's fp32 conv2d, as a user's model runs them.

Default: the XNOR-Net case, 256 -> 256 channels, 3x3, 14x14, padding 1, batch 1, at 1 and
at 2 threads set the way a user sets them (``torch.set_num_threads``; the kernel follows
torch's thread count, no environment variables). The binary kernel is timed with the
weight packed once (as deployed) and the input packed on every call. Two measurements per
thread count: the kernel alone, and inside a model (a torch fp32 1x1 conv before it, so
torch's OpenMP threads and the kernel's threads take turns as in a binary network).
``--numba-layers`` also times the same loop compiled with numba ``parallel=True`` under
each numba threading layer (one subprocess each), the choice slimkit no longer makes.

    .venv/bin/python benchmarks/xnor_vs_conv.py                 # 256ch 3x3 14x14 batch 1, 1 and 2 threads
    .venv/bin/python benchmarks/xnor_vs_conv.py --threads 1 --channels 128 --size 28
    .venv/bin/python benchmarks/xnor_vs_conv.py --numba-layers omp workqueue
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F

from slimkit.kernels import PackedWeight, xnor_conv2d
from slimkit.kernels.timing import interleaved_ms


def _parallel_kernel():
    """The kernel loop compiled with numba parallel=True (prange over image rows)."""
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def popcount64(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.call(builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)]), args)

        return types.uint64(types.uint64), codegen

    @numba.njit(parallel=True, fastmath=True)
    def conv(xp, wt, channels, ph, pw, out):
        n, h, w, words = xp.shape
        kh, kw, _, o = wt.shape
        out_h, out_w = out.shape[2], out.shape[3]
        for job in numba.prange(n * out_h):
            img, oy = job // out_h, job % out_h
            acc = np.zeros(o, dtype=np.uint64)
            for ox in range(out_w):
                acc[:] = 0
                taps = 0
                for ky in range(kh):
                    iy = oy - ph + ky
                    if iy < 0 or iy >= h:
                        continue
                    for kx in range(kw):
                        ix = ox - pw + kx
                        if ix < 0 or ix >= w:
                            continue
                        taps += 1
                        for k in range(words):
                            xv = xp[img, iy, ix, k]
                            row = wt[ky, kx, k]
                            for oc in range(o):
                                acc[oc] += popcount64(xv ^ row[oc])
                for oc in range(o):
                    out[img, oc, oy, ox] = np.float32(taps * channels - 2 * np.int64(acc[oc]))

    return conv


def measure(args, threads: int, layer: str | None = None) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out_ch = args.out_channels or args.channels
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    w = torch.randn(out_ch, args.channels, args.kernel, args.kernel)
    pre = torch.randn(args.channels, args.channels, 1, 1)
    pad = args.kernel // 2
    packed = PackedWeight(w)
    if layer is None:
        def binary(inp):
            return xnor_conv2d(inp, packed, padding=pad)
    else:
        import numba

        from slimkit.kernels.xnor import pack_signs

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        kernel = _parallel_kernel()

        def binary(inp):
            out = np.empty((inp.shape[0], out_ch, args.size, args.size), dtype=np.float32)
            kernel(pack_signs(inp), packed.bits, args.channels, pad, pad, out)
            return torch.from_numpy(out)

    ref = F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0), padding=pad)
    assert torch.equal(binary(x), ref), "the binary kernel disagrees with the float reference"
    with torch.no_grad():
        t = interleaved_ms({"fp32": lambda: F.conv2d(x, w, padding=pad), "xnor": lambda: binary(x),
                            "model_fp32": lambda: F.conv2d(F.conv2d(x, pre), w, padding=pad),
                            "model_xnor": lambda: binary(F.conv2d(x, pre))}, repeats=args.repeats, warmup=3)
    return {"threads": threads, "layer": layer or "slimkit default", **{f"{k}_ms": v for k, v in t.items()},
            "weight_bytes": packed.nbytes, "fp32_weight_bytes": w.numel() * 4}


def show(r: dict) -> None:
    print(f"{r['layer']:>16} | {r['threads']} | {r['fp32_ms']:8.3f} | {r['xnor_ms']:8.3f} | "
          f"{r['fp32_ms'] / r['xnor_ms']:6.2f}x | {r['model_fp32_ms'] / r['model_xnor_ms']:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--out-channels", type=int, default=None)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--numba-layers", nargs="*", default=[], choices=["omp", "workqueue", "tbb"],
                        help="also time numba parallel=True under these threading layers (subprocesses)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layer", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:  # one subprocess run under NUMBA_THREADING_LAYER
        print(json.dumps([measure(args, t, args.layer) for t in args.threads]))
        return
    print(f"x ({args.batch}, {args.channels}, {args.size}, {args.size}), w ({args.out_channels or args.channels}, "
          f"{args.channels}, {args.kernel}, {args.kernel}), padding {args.kernel // 2}; "
          f"median of {args.repeats}, candidates timed in turn")
    print("          kernel | threads | fp32 ms | xnor ms | alone | in a model (1x1 fp32 conv before)")
    rows = [measure(args, t) for t in args.threads]
    for r in rows:
        show(r)
    for layer in args.numba_layers:
        cmd = [sys.executable, __file__, "--json", "--layer", layer, "--repeats", str(args.repeats),
               "--channels", str(args.channels), "--size", str(args.size), "--kernel", str(args.kernel),
               "--batch", str(args.batch), "--threads", *map(str, args.threads)]
        if args.out_channels:
            cmd += ["--out-channels", str(args.out_channels)]
        env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{layer:>16} | failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
            continue
        for r in json.loads(done.stdout.strip().splitlines()[-1]):
            r["layer"] = f"numba {layer}"
            show(r)
    print(f"weight: {rows[0]['weight_bytes']} B packed vs {rows[0]['fp32_weight_bytes']} B fp32")


if __name__ == "__main__":
    main()
