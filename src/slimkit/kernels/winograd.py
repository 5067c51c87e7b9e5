"""Winograd minimal filtering F(2x2, 3x3) and F(4x4, 3x3) (Lavin & Gray 2016, "Fast Algorithms for Convolutional
Neural Networks").

The output is cut into ``m x m`` tiles (``m`` = 2 or 4); each needs an ``a x a`` input tile
``d`` (``a = m + 2``). With the transforms ``U = G g G^T`` (weights, ``[a, a]`` per output and
input channel, computed once per layer and cached), ``V = B^T d B`` (input tiles) the
output tile is ``Y = A^T [sum_c U_c (.) V_c] A``. Summing over channels turns the
element-wise stage into ``a * a`` independent GEMMs ``M[xi] = U[xi] (O x C) @ V[xi] (C x P)``
(``P`` = tiles of all images): ``a^2 * O * C * P`` multiplications against ``9 * m^2 * O * C * P``
for direct, 2.25x fewer for F(2x2) and 4x fewer for F(4x4). Each transform is one GEMM with
the Kronecker product of its matrices (``vec(B^T d B) = (B^T (x) B^T) vec(d)``).

Stride 1 and 3x3 kernels only; any padding and channel count. F(4x4)'s transform matrices
hold 1/24, 1/12, 1/6, 4, 5 and 8: its fp32 results lose about one more decimal digit than
F(2x2)'s (measured bounds in tests/test_kernels_conv.py and docs/kernels.md).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F

from slimkit.kernels.case import ConvCase

_MATRICES = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],  # B^T
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],  # G
        [[1, 1, 1, 0], [0, 1, -1, -1]],  # A^T
    ),
    4: (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


@cache
def transforms(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B^T (x) B^T [a^2, a^2], G (x) G [a^2, 9], A^T (x) A^T [m^2, a^2]) in float32, built in float64."""
    bt, g, at = (torch.tensor(v, dtype=torch.float64) for v in _MATRICES[m])
    return tuple(torch.kron(t, t).float().contiguous() for t in (bt, g, at))


def transform_weight(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``U = G g G^T`` for every (output, input) channel pair: ``[O, C, 3, 3] -> [a^2, O, C]``."""
    o, c = weight.shape[:2]
    _, gg, _ = transforms(m)
    return (gg @ weight.reshape(o * c, 9).T).view(-1, o, c)


def conv2d_winograd(input: torch.Tensor, u: torch.Tensor, case: ConvCase, m: int) -> torch.Tensor:
    """F(m x m, 3 x 3) convolution with a transformed weight ``u`` [a^2, O, C]: ``[N, C, H, W] -> [N, O, oh, ow]``."""
    a = m + 2
    bt, _, at = transforms(m)
    oh, ow = case.out_h, case.out_w
    th, tw = -(-oh // m), -(-ow // m)  # tiles per column / row
    ph, pw = case.padding
    # pad so that th * m + 2 rows and tw * m + 2 columns exist (extra zeros give outputs that are cropped)
    x = F.pad(input, (pw, tw * m + 2 - case.w - pw, ph, th * m + 2 - case.h - ph))
    tiles = x.unfold(2, a, m).unfold(3, a, m)  # [N, C, th, tw, a, a] (a view)
    d = tiles.permute(4, 5, 1, 0, 2, 3).reshape(a * a, -1)  # [a^2, C * N * th * tw], one copy
    v = (bt @ d).view(a * a, case.c, -1)  # [a^2, C, P]
    mm = torch.bmm(u, v)  # [a^2, O, P]: the element-wise stage as a^2 GEMMs
    y = (at @ mm.view(a * a, -1)).view(m, m, case.o, case.n, th, tw)
    y = y.permute(3, 2, 4, 0, 5, 1).reshape(case.n, case.o, th * m, tw * m)
    return y[:, :, :oh, :ow]


def multiplications(case: ConvCase, m: int) -> dict[str, int]:
    """Multiplications of each stage (dense transforms as implemented, element-wise stage as in the paper)."""
    a = m + 2
    tiles = case.n * -(-case.out_h // m) * -(-case.out_w // m)
    return {"input_transform": a**4 * case.c * tiles, "elementwise": a * a * case.o * case.c * tiles,
            "output_transform": m * m * a * a * case.o * tiles}
