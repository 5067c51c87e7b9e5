"""Bit-packed binary convolution: XNOR + popcount (Rastegari et al. 2016, XNOR-Net).

``xnor_conv2d(x, weight, stride, padding)`` returns exactly
``conv2d(sign(x), sign(weight), stride=stride, padding=padding)`` with ``sign(0) = +1`` and
zero padding, as a float tensor of integer values.

How: signs are packed along the channel axis into uint64 words (bit = 1 for negative),
so the input becomes ``[N, H, W, words]`` and the weight ``[O, kh, kw, words]``. For one
output value and one kernel tap, ``dot = C - 2 * popcount(x_word ^ w_word)`` summed over
the words (unused high bits are 0 in both, so any channel count works). A tap that falls in
the zero padding contributes exactly 0, so it is skipped: the border is exact, not
approximated. Loops are numba-compiled and parallel over (image, output channel).

>>> import torch
>>> x, w = torch.randn(1, 70, 6, 6), torch.randn(5, 70, 3, 3)
>>> ref = torch.nn.functional.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(w >= 0, 1.0, -1.0), padding=1)
>>> torch.equal(xnor_conv2d(x, w, padding=1), ref)
True
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from slimkit.kernels._threads import parallel_for


@lru_cache(maxsize=1)
def _kernels():
    """Compile the numba kernels on first use (keeps ``import slimkit.kernels`` light).

    Both are serial ``nogil`` loops over a ``[start, stop)`` range of (image, row) jobs, run
    on torch's thread count by :func:`slimkit.kernels._threads.parallel_for` (no numba
    threading layer: see that module for the measured reason).
    """
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def popcount64(typingctx, value):
        sig = types.uint64(types.uint64)

        def codegen(context, builder, signature, args):
            fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
            return builder.call(fn, args)

        return sig, codegen

    @numba.njit(nogil=True)
    def pack_nhwc(x, out, start, stop):
        # x: float32 [N, C, H, W] -> out uint64 [N, H, W, words] (zeroed); bit c%64 of word c//64 set when x < 0
        n, c, h, w = x.shape
        for img_row in range(start, stop):
            img, row = img_row // h, img_row % h
            for col in range(w):
                for ch in range(c):
                    if x[img, ch, row, col] < 0:
                        out[img, row, col, ch >> 6] |= np.uint64(1) << np.uint64(ch & 63)

    @numba.njit(nogil=True, fastmath=True)
    def conv(xp, wt, channels, sh, sw, ph, pw, out, start, stop):
        # xp: [N, H, W, words]; wt: [kh, kw, words, O] (output channels innermost, so the
        # popcount loop over output channels vectorizes); out: [N, O, out_h, out_w]
        n, h, w, words = xp.shape
        kh, kw, _, o = wt.shape
        out_h, out_w = out.shape[2], out.shape[3]
        acc = np.zeros(o, dtype=np.uint64)
        for job in range(start, stop):
            img, oy = job // out_h, job % out_h
            for ox in range(out_w):
                acc[:] = 0
                taps = 0
                for ky in range(kh):
                    iy = oy * sh - ph + ky
                    if iy < 0 or iy >= h:
                        continue
                    for kx in range(kw):
                        ix = ox * sw - pw + kx
                        if ix < 0 or ix >= w:
                            continue
                        taps += 1
                        for k in range(words):
                            xv = xp[img, iy, ix, k]
                            row = wt[ky, kx, k]
                            for oc in range(o):
                                acc[oc] += popcount64(xv ^ row[oc])
                full = taps * channels
                for oc in range(o):
                    out[img, oc, oy, ox] = np.float32(full - 2 * np.int64(acc[oc]))

    return pack_nhwc, conv


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def pack_signs(x: torch.Tensor, threads: int | None = None) -> np.ndarray:
    """Signs of a float ``[N, C, H, W]`` tensor packed to uint64 ``[N, H, W, ceil(C/64)]``."""
    pack_nhwc, _ = _kernels()
    array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    n, c, h, w = array.shape
    out = np.zeros((n, h, w, (c + 63) // 64), dtype=np.uint64)
    parallel_for(pack_nhwc, n * h, array, out, threads=threads, min_jobs_per_thread=4)
    return out


class PackedWeight:
    """A binary weight packed once for repeated :func:`xnor_conv2d` calls."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 4:
            raise ValueError(f"xnor_conv2d: weight must be [out, in, kh, kw], got shape {tuple(weight.shape)}")
        self.shape = tuple(weight.shape)
        # [O, kh, kw, words] -> [kh, kw, words, O]: output channels innermost
        self.bits = np.ascontiguousarray(pack_signs(weight).transpose(1, 2, 3, 0))
        self.nbytes = int(self.bits.nbytes)


def xnor_conv2d(x: torch.Tensor, weight: torch.Tensor | PackedWeight, stride=1, padding=0, *,
                threads: int | None = None) -> torch.Tensor:
    """``conv2d(sign(x), sign(weight), stride, padding)`` by XNOR-popcount, bit-exact (float32 result).

    ``x``: [N, C, H, W]; ``weight``: [O, C, kh, kw] tensor or a :class:`PackedWeight`;
    ``stride``/``padding``: int or pair (zero padding). Groups and dilation are not supported.
    ``threads``: default ``torch.get_num_threads()``, the threads the rest of the model runs on.
    """
    packed = weight if isinstance(weight, PackedWeight) else PackedWeight(weight)
    if x.dim() != 4 or x.shape[1] != packed.shape[1]:
        raise ValueError(
            f"xnor_conv2d: input must be [N, {packed.shape[1]}, H, W] for this weight, got shape {tuple(x.shape)}"
        )
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    _, conv = _kernels()
    h, w = x.shape[2], x.shape[3]
    kh, kw = packed.shape[2], packed.shape[3]
    out_h, out_w = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"xnor_conv2d: input {h}x{w} is smaller than the kernel {kh}x{kw} after padding {padding}")
    out = np.empty((x.shape[0], packed.shape[0], out_h, out_w), dtype=np.float32)
    parallel_for(conv, x.shape[0] * out_h, pack_signs(x, threads), packed.bits, packed.shape[1], sh, sw, ph, pw, out,
                 threads=threads)
    return torch.from_numpy(out)
