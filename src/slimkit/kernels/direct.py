"""Direct convolution: the six nested loops, numba-compiled (the reference every other algorithm is checked by).

``out[n, o, y, x] = sum_{c, i, j} w[o, c, i, j] * xpad[n, c, y * sh + i, x * sw + j]``: the
input is zero-padded once, then each (image, output channel) job accumulates one tap at a
time over a whole output row, so the innermost loop runs over contiguous output columns
and vectorizes at stride 1. ``n * o * out_h * out_w * c * kh * kw`` multiplications.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from slimkit.kernels._threads import parallel_for
from slimkit.kernels.case import ConvCase


@lru_cache(maxsize=1)
def _kernel():
    import numba

    @numba.njit(nogil=True, fastmath=True)
    def direct(xp, w, sh, sw, out, start, stop):
        # xp: [N, C, Hp, Wp] zero-padded; w: [O, C, kh, kw]; out: [N, O, oh, ow] (zeroed)
        o, c, kh, kw = w.shape
        oh, ow = out.shape[2], out.shape[3]
        for job in range(start, stop):
            n, oc = job // o, job % o
            for ch in range(c):
                for i in range(kh):
                    for j in range(kw):
                        wv = w[oc, ch, i, j]
                        for y in range(oh):
                            row = xp[n, ch, y * sh + i]
                            dst = out[n, oc, y]
                            for x in range(ow):
                                dst[x] += wv * row[x * sw + j]

    return direct


def conv2d_direct(input: torch.Tensor, weight: torch.Tensor, case: ConvCase,
                  threads: int | None = None) -> torch.Tensor:
    """Direct convolution of a checked case, [N, C, H, W] -> [N, O, out_h, out_w], no bias."""
    ph, pw = case.padding
    xp = F.pad(input, (pw, pw, ph, ph)) if ph or pw else input
    xp = np.ascontiguousarray(xp.detach().numpy())
    out = np.zeros((case.n, case.o, case.out_h, case.out_w), dtype=np.float32)
    parallel_for(_kernel(), case.n * case.o, xp, np.ascontiguousarray(weight.detach().numpy()), case.stride[0],
                 case.stride[1], out, threads=threads)
    return torch.from_numpy(out)
