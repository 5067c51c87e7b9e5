"""xnor_conv2d is bit-exact against conv2d(sign(x), sign(w)) with zero padding."""

import pytest
import torch
import torch.nn.functional as F

from slimkit.kernels import PackedWeight, xnor_conv2d


def _sign(t):
    return torch.where(t >= 0, 1.0, -1.0)


@pytest.mark.parametrize(
    "n,c,o,h,w,k,stride,padding",
    [
        (1, 1, 1, 5, 5, 3, 1, 1),
        (2, 3, 4, 7, 9, 3, 1, 0),
        (1, 63, 5, 6, 6, 3, 1, 1),
        (1, 64, 7, 6, 5, 3, 2, 1),
        (2, 65, 3, 8, 8, 5, 1, 2),
        (1, 130, 9, 5, 7, 1, 1, 0),
        (1, 200, 6, 9, 9, 3, 2, 2),
        (3, 17, 8, 4, 4, (3, 1), 1, (1, 0)),
    ],
)
def test_bit_exact(n, c, o, h, w, k, stride, padding):
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w)
    x[x.abs() < 0.1] = 0.0  # sign(0) = +1
    weight = torch.randn(o, c, kh, kw)
    ref = F.conv2d(_sign(x), _sign(weight), stride=stride, padding=padding)
    out = xnor_conv2d(x, weight, stride=stride, padding=padding)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_random_shapes_many():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        c, o = int(torch.randint(1, 150, (1,), generator=gen)), int(torch.randint(1, 12, (1,), generator=gen))
        h = int(torch.randint(3, 10, (1,), generator=gen))
        k = int(torch.randint(1, 4, (1,), generator=gen))
        pad, stride = int(torch.randint(0, 3, (1,), generator=gen)), int(torch.randint(1, 3, (1,), generator=gen))
        x, weight = torch.randn(2, c, h, h, generator=gen), torch.randn(o, c, k, k, generator=gen)
        ref = F.conv2d(_sign(x), _sign(weight), stride=stride, padding=pad)
        assert torch.equal(xnor_conv2d(x, PackedWeight(weight), stride, pad), ref)


def test_packed_weight_is_one_bit_per_weight_rounded_to_words():
    packed = PackedWeight(torch.randn(256, 256, 3, 3))
    assert packed.nbytes == 256 * 9 * 256 // 8


def test_bad_input_shape():
    with pytest.raises(ValueError, match="input must be"):
        xnor_conv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 3, 3, 3))
