"""im2col + GEMM: lower the convolution to one matrix product (Chellapilla et al. 2006).

NCHW: ``cols = unfold(x)`` is ``[N, C*kh*kw, L]`` (``L = out_h * out_w``) and the output is
``W[O, C*kh*kw] @ cols``, one GEMM per image, output already NCHW. NHWC: the padded input is
made channels-last, the patch matrix ``[N*L, kh*kw*C]`` is a strided view of it copied once,
and ``patches @ W'[kh*kw*C, O]`` gives ``[N, out_h, out_w, O]``, returned as an NCHW-shaped
view of channels-last memory (what a channels-last network passes on). Both do exactly
``n * o * L * c * kh * kw`` multiplications; they differ in the copy and the GEMM shape,
which is what ``benchmarks/conv_algorithms.py`` measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimkit.kernels.case import ConvCase


def conv2d_im2col(input: torch.Tensor, weight: torch.Tensor, case: ConvCase) -> torch.Tensor:
    """im2col (NCHW) + GEMM: ``[N, C, H, W] -> [N, O, out_h, out_w]``, no bias."""
    cols = F.unfold(input, (case.kh, case.kw), padding=case.padding, stride=case.stride)  # [N, C*kh*kw, L]
    out = torch.matmul(weight.reshape(case.o, -1), cols)  # [N, O, L]
    return out.view(case.n, case.o, case.out_h, case.out_w)


def conv2d_im2col_nhwc(input: torch.Tensor, weight: torch.Tensor, case: ConvCase) -> torch.Tensor:
    """im2col (NHWC patches) + GEMM: ``[N, C, H, W] -> [N, O, out_h, out_w]`` (channels-last memory), no bias."""
    ph, pw = case.padding
    (sh, sw), oh, ow = case.stride, case.out_h, case.out_w
    x = input.permute(0, 2, 3, 1)  # a view when the input is already channels-last
    if ph or pw:
        x = F.pad(x, (0, 0, pw, pw, ph, ph))
    x = x.contiguous()
    sn, sy, sx, sc = x.stride()
    patches = x.as_strided((case.n, oh, ow, case.kh, case.kw, case.c), (sn, sy * sh, sx * sw, sy, sx, sc))
    rows = patches.reshape(case.n * oh * ow, case.kh * case.kw * case.c)  # the one copy
    w = weight.permute(2, 3, 1, 0).reshape(case.kh * case.kw * case.c, case.o)  # [kh*kw*C, O]
    return torch.matmul(rows, w).view(case.n, oh, ow, case.o).permute(0, 3, 1, 2)
