"""xnor_conv2d (bit-packed XNOR-popcount, numba) vs torch's fp32 conv2d on the same shapes.

Default: the XNOR-Net case, 256 -> 256 channels, 3x3, 14x14, padding 1, batch 1. The
binary kernel is timed with the weight packed once (as deployed) and the input packed on
every call. Prints each median time and the speed-up ratio.

    .venv/bin/python benchmarks/xnor_vs_conv.py            # 256ch 3x3 14x14 batch 1
    .venv/bin/python benchmarks/xnor_vs_conv.py --threads 1 --channels 128 --size 28
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from slimkit.export.onnx import median_ms
from slimkit.kernels import PackedWeight, xnor_conv2d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--out-channels", type=int, default=None)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    out_ch = args.out_channels or args.channels
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    w = torch.randn(out_ch, args.channels, args.kernel, args.kernel)
    pad = args.kernel // 2
    packed = PackedWeight(w)
    ref = F.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0), padding=pad)
    assert torch.equal(xnor_conv2d(x, packed, padding=pad), ref), "xnor_conv2d disagrees with the float reference"
    t_fp32 = median_ms(lambda: F.conv2d(x, w, padding=pad), repeats=args.repeats)
    t_xnor = median_ms(lambda: xnor_conv2d(x, packed, padding=pad), repeats=args.repeats)
    print(f"shape: x {tuple(x.shape)}, w {tuple(w.shape)}, padding {pad}, threads {args.threads}")
    print(f"torch fp32 conv2d : {t_fp32:8.3f} ms")
    print(f"xnor_conv2d       : {t_xnor:8.3f} ms  (weight {packed.nbytes} B packed vs {w.numel() * 4} B fp32)")
    print(f"speed-up          : {t_fp32 / t_xnor:.2f}x")


if __name__ == "__main__":
    main()
