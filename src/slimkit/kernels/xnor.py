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


@lru_cache(maxsize=1)
def _kernels():
    """Compile the numba kernels on first use (keeps ``import slimkit.kernels`` light)."""
    import os

    import numba

    if "NUMBA_THREADING_LAYER" not in os.environ:
        # numba's default OpenMP layer spin-waits after every parallel region and fights torch's
        # own OpenMP threads: 10-20x slower batch-1 binary models on a shared CPU (docs/quantization.md)
        numba.config.THREADING_LAYER = "workqueue"
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

    @numba.njit(parallel=True)
    def pack_nhwc(x):
        # x: float32 [N, C, H, W] -> uint64 [N, H, W, words]; bit c%64 of word c//64 set when x < 0
        n, c, h, w = x.shape
        words = (c + 63) // 64
        out = np.zeros((n, h, w, words), dtype=np.uint64)
        for img_row in numba.prange(n * h):
            img, row = img_row // h, img_row % h
            for col in range(w):
                for ch in range(c):
                    if x[img, ch, row, col] < 0:
                        out[img, row, col, ch >> 6] |= np.uint64(1) << np.uint64(ch & 63)
        return out

    @numba.njit(parallel=True, fastmath=True)
    def conv(xp, wt, channels, sh, sw, ph, pw, out_h, out_w):
        # xp: [N, H, W, words]; wt: [kh, kw, words, O] (output channels innermost, so the
        # popcount loop over output channels vectorizes)
        n, h, w, words = xp.shape
        kh, kw, _, o = wt.shape
        out = np.zeros((n, o, out_h, out_w), dtype=np.float32)
        for job in numba.prange(n * out_h):
            img, oy = job // out_h, job % out_h
            acc = np.zeros(o, dtype=np.uint64)
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
        return out

    return pack_nhwc, conv


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def pack_signs(x: torch.Tensor) -> np.ndarray:
    """Signs of a float ``[N, C, H, W]`` tensor packed to uint64 ``[N, H, W, ceil(C/64)]``."""
    pack_nhwc, _ = _kernels()
    return pack_nhwc(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))


class PackedWeight:
    """A binary weight packed once for repeated :func:`xnor_conv2d` calls."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 4:
            raise ValueError(f"xnor_conv2d: weight must be [out, in, kh, kw], got shape {tuple(weight.shape)}")
        self.shape = tuple(weight.shape)
        # [O, kh, kw, words] -> [kh, kw, words, O]: output channels innermost
        self.bits = np.ascontiguousarray(pack_signs(weight).transpose(1, 2, 3, 0))
        self.nbytes = int(self.bits.nbytes)


def xnor_conv2d(x: torch.Tensor, weight: torch.Tensor | PackedWeight, stride=1, padding=0) -> torch.Tensor:
    """``conv2d(sign(x), sign(weight), stride, padding)`` by XNOR-popcount, bit-exact (float32 result).

    ``x``: [N, C, H, W]; ``weight``: [O, C, kh, kw] tensor or a :class:`PackedWeight`;
    ``stride``/``padding``: int or pair (zero padding). Groups and dilation are not supported.
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
    out = conv(pack_signs(x), packed.bits, packed.shape[1], sh, sw, ph, pw, out_h, out_w)
    return torch.from_numpy(out)
