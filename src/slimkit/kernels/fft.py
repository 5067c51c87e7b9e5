"""FFT convolution (Mathieu, Henaff & LeCun 2014, "Fast Training of Convolutional Networks through FFTs").

Cross-correlation by the convolution theorem: with the zero-padded input ``x`` and the
weight padded to the same ``S x T`` (the next 2,3,5-smooth sizes >= the padded input),
``y = irfft2(sum_c rfft2(x_c) * conj(rfft2(w_c)))`` cropped to ``out_h x out_w``; the
padding to the full input size means no circular wrap reaches the kept outputs. The sum
over channels is one complex GEMM per frequency. Cost is independent of the kernel size,
so it pays for large kernels and loses on 3x3. Stride 1 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimkit.kernels.case import ConvCase


def fast_size(n: int) -> int:
    """The smallest 2,3,5-smooth integer >= n (sizes pocketfft transforms fastest)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


# the transformed weight is [freqs, O, C] complex64: beyond this it is not worth holding in memory
MAX_TRANSFORM_BYTES = 256 * 2**20


def transform_bytes(case: ConvCase) -> int:
    """Bytes of the cached weight transform for ``case``."""
    s, t = fft_size(case)
    return s * (t // 2 + 1) * case.o * case.c * 8


def fft_size(case: ConvCase) -> tuple[int, int]:
    return fast_size(case.h + 2 * case.padding[0]), fast_size(case.w + 2 * case.padding[1])


def transform_weight(weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``conj(rfft2(w))`` at ``size``, laid out for the per-frequency GEMM: ``[F, O, C]`` complex64."""
    o, c = weight.shape[:2]
    wf = torch.fft.rfft2(weight, s=size).conj()  # [O, C, S, T//2+1]
    return wf.reshape(o, c, -1).permute(2, 0, 1).contiguous()


def conv2d_fft(input: torch.Tensor, wf: torch.Tensor, case: ConvCase) -> torch.Tensor:
    """FFT convolution with a transformed weight ``wf`` [F, O, C]: ``[N, C, H, W] -> [N, O, oh, ow]``."""
    ph, pw = case.padding
    size = fft_size(case)
    x = F.pad(input, (pw, pw, ph, ph)) if ph or pw else input
    xf = torch.fft.rfft2(x, s=size)  # [N, C, S, T//2+1]
    freq = xf.shape[-2:]
    xf = xf.reshape(case.n, case.c, -1).permute(2, 1, 0)  # [F, C, N]
    yf = torch.bmm(wf, xf)  # [F, O, N]
    yf = yf.permute(2, 1, 0).reshape(case.n, case.o, *freq)
    y = torch.fft.irfft2(yf, s=size)
    return y[:, :, : case.out_h, : case.out_w]


def multiplications(case: ConvCase) -> dict[str, int]:
    """Real multiplications: the complex products (4 real each) of the frequency stage."""
    s, t = fft_size(case)
    freqs = s * (t // 2 + 1)
    return {"frequency_products": 4 * freqs * case.o * case.c * case.n}
