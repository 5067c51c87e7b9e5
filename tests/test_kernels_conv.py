"""slimkit.kernels.conv2d: every algorithm equals F.conv2d on held-out shapes; unsupported cases raise one line."""

import pytest
import torch
import torch.nn.functional as F

from slimkit.kernels import ALGORITHMS, conv2d, winograd
from slimkit.kernels.case import ConvCase
from slimkit.kernels.conv import multiplications

# relative error = max |out - F.conv2d| / max |F.conv2d|; Winograd bounds are the measured maxima
# over these shapes (F(2x2) 1.7e-6, F(4x4) 7.5e-6 at 256 channels) with headroom
BOUND = {"direct": 1e-4, "im2col": 1e-4, "im2col_nhwc": 1e-4, "fft": 1e-4, "torch": 1e-6,
         "winograd_f2": 2e-5, "winograd_f4": 1e-4}
SHAPES = [  # n, c, o, h, w, k, stride, padding: odd channel counts, padding 0-2, stride 1-2, batch 1-4
    (1, 3, 5, 9, 9, 3, 1, 0),
    (2, 7, 9, 11, 13, 3, 1, 1),
    (3, 17, 6, 8, 10, 3, 1, 2),
    (4, 33, 17, 15, 15, 3, 2, 1),
    (1, 5, 3, 12, 12, 5, 1, 2),
    (2, 65, 31, 14, 14, 3, 1, 1),
    (1, 1, 1, 5, 5, 1, 1, 0),
    (2, 9, 11, 7, 6, 1, 2, 0),
]


def _rel(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}c{}o{}h{}w{}k{}s{}p{}".format(*s))
@pytest.mark.parametrize("algorithm", sorted(BOUND))
def test_matches_f_conv2d(algorithm, shape):
    n, c, o, h, w, k, stride, padding = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    x, weight, bias = torch.randn(n, c, h, w, generator=gen), torch.randn(o, c, k, k, generator=gen), torch.randn(o)
    ref = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    case = ConvCase(n, c, h, w, o, k, k, (stride, stride), (padding, padding))
    if ALGORITHMS.get(algorithm).unsupported(case):
        with pytest.raises(ValueError, match=f"algorithm '{algorithm}' does not support") as err:
            conv2d(x, weight, bias, stride, padding, algorithm=algorithm)
        assert "\n" not in str(err.value)
        return
    out = conv2d(x, weight, bias, stride, padding, algorithm=algorithm)
    assert out.shape == ref.shape
    assert _rel(out, ref) <= BOUND[algorithm]


def test_auto_picks_a_supported_algorithm_and_matches():
    x, weight = torch.randn(1, 16, 10, 10), torch.randn(8, 16, 3, 3)
    ref = F.conv2d(x, weight, stride=2, padding=1)
    assert _rel(conv2d(x, weight, stride=2, padding=1), ref) <= 1e-4


def test_rectangular_padding_and_stride_pairs():
    x, weight = torch.randn(2, 5, 9, 12), torch.randn(4, 5, 3, 3)
    ref = F.conv2d(x, weight, stride=(1, 2), padding=(2, 0))
    for algorithm in ("direct", "im2col", "im2col_nhwc"):
        assert _rel(conv2d(x, weight, stride=(1, 2), padding=(2, 0), algorithm=algorithm), ref) <= 1e-4
    ref = F.conv2d(x, weight, padding=(0, 2))
    for algorithm in ("winograd_f2", "winograd_f4", "fft"):
        assert _rel(conv2d(x, weight, padding=(0, 2), algorithm=algorithm), ref) <= 1e-4


def test_weight_transform_is_cached_and_refreshed_when_the_weight_changes():
    x, weight = torch.randn(1, 4, 6, 6), torch.randn(3, 4, 3, 3)
    conv2d(x, weight, padding=1, algorithm="winograd_f4")
    with torch.no_grad():
        weight.mul_(2)  # bumps the version counter: the cached transform must not be reused
    assert _rel(conv2d(x, weight, padding=1, algorithm="winograd_f4"), F.conv2d(x, weight, padding=1)) <= 1e-4


def test_winograd_f4_saves_4x_multiplications_in_the_elementwise_stage():
    case = ConvCase(1, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1))
    direct = multiplications(case, "direct")["multiply_accumulate"]
    assert direct / multiplications(case, "winograd_f4")["elementwise"] == pytest.approx(4.0)
    assert direct / multiplications(case, "winograd_f2")["elementwise"] == pytest.approx(2.25)


def test_winograd_transforms_compute_1d_correlation():
    # F(m, 3) in 1-D: A^T [(G g) * (B^T d)] equals the correlation of d with g
    for m in (2, 4):
        bt, g, at = (torch.tensor(v, dtype=torch.float64) for v in winograd._MATRICES[m])
        d, k = torch.randn(m + 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
        want = torch.stack([(d[i:i + 3] * k).sum() for i in range(m)])
        assert torch.allclose(at @ ((g @ k) * (bt @ d)), want)


@pytest.mark.parametrize("call,message", [
    (lambda: conv2d(torch.randn(1, 3, 5, 5), torch.randn(2, 4, 3, 3)), "grouped convolution is not supported"),
    (lambda: conv2d(torch.randn(3, 5, 5), torch.randn(2, 3, 3, 3)), "input must be a 4-D"),
    (lambda: conv2d(torch.randn(1, 3, 5, 5).double(), torch.randn(2, 3, 3, 3).double()), "float32"),
    (lambda: conv2d(torch.randn(1, 3, 2, 2), torch.randn(2, 3, 3, 3)), "smaller than the kernel"),
    (lambda: conv2d(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3), stride=0), "stride must be >= 1"),
    (lambda: conv2d(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3), algorithm="winograd"), "did you mean"),
])
def test_bad_calls_raise_one_line(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_plan_on_resnet18_chooses_per_layer_and_applying_it_keeps_the_outputs():
    import copy

    import torchvision

    from slimkit.kernels import apply_plan, plan

    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    p = plan(model, x, candidates=("torch", "im2col", "winograd_f2", "winograd_f4"), repeats=2)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(p.choices) == set(convs) | {"fc"}
    assert p.skipped["conv1"]["winograd_f2"].startswith("a 7x7 kernel")  # the 7x7 stride-2 stem
    assert all(p.timings[n][p.choices[n]] == min(p.timings[n].values()) for n in p.choices)
    planned = copy.deepcopy(model)
    apply_plan(planned, p)
    with torch.no_grad():
        assert _rel(planned(x), model(x)) <= 1e-4
    assert "| layer |" in p.table()


def test_plan_offers_the_sparse_kernel_for_pruned_shared_layers():
    from slimkit.kernels import apply_plan, plan
    from slimkit.prune.magnitude import magnitude_prune_
    from slimkit.quantize.sharing import share_weights_

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    magnitude_prune_(model, torch.zeros(1, 64), {"sparsity": 0.9})
    share_weights_(model, torch.zeros(1, 64), {"linear_bits": 4})
    x = torch.randn(1, 1, 8, 8)
    p = plan(model, x, candidates=("sparse",), repeats=3)
    assert set(p.timings["1"]) == {"torch", "sparse"}
    want = model(x).detach()
    apply_plan(model, p)
    with torch.no_grad():
        assert _rel(model(x), want) <= 1e-4
    with pytest.raises(ValueError, match="unknown candidate kernels"):
        plan(model, x, candidates=("winograd",))
