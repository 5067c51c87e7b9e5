"""Measurement: params, non-zeros, MACs (exact by hand and against torchvision's figures), bytes, peak activation
memory (exact by hand), latency, tables."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from slimkit.exceptions import ConfigError
from slimkit.measure import (
    count_macs,
    count_nonzeros,
    count_params,
    format_comparison,
    format_layer_table,
    format_summary,
    layer_profiles,
    measure_latency,
    peak_activation_bytes,
    profile,
    register_mac_rule,
    state_dict_bytes,
)
from slimkit.models import create_model

SMALL_ZOO = ("lenet-300-100", "lenet5", "resnet20-cifar", "vgg11-cifar", "mobilenet-v1", "squeezenet1_1",
             "shufflenet_v2_x0_5", "mobilenet_v3_small")


def _bn_buffers(model):
    """(float running-stat elements, number of int64 num_batches_tracked) of the model's BatchNorms."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return sum(2 * m.num_features for m in bns), len(bns)


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_profile_counts_of_zoo_models(name):
    model = create_model(name, num_classes=10, in_channels=1)
    p = profile(model, torch.zeros(1, 1, 28, 28), latency=False)
    params = sum(t.numel() for t in model.parameters())
    assert p.params == params
    assert p.nonzeros == sum(int((t != 0).sum()) for t in model.parameters())
    float_buffers, counters = _bn_buffers(model)
    assert p.bytes == 4 * (params + float_buffers) + 8 * counters
    assert p.macs > 0 and p.flops == 2 * p.macs
    assert sum(layer.params for layer in p.layers) == params  # every parameter lives in a profiled leaf
    assert sum(layer.macs for layer in p.layers) == p.macs
    assert sum(layer.share for layer in p.layers) == pytest.approx(1.0)
    assert (p.latency_ms, p.latency_p99_ms, p.throughput, p.batch_size) == (None, None, None, 1)
    assert p.peak_activation_bytes >= 4 * 28 * 28  # at least the fp32 input
    assert p.to_dict()["peak_activation_bytes"] == p.peak_activation_bytes
    json.dumps(p.to_dict(layers=True))


@pytest.mark.parametrize(("layer", "shape", "macs"), [
    (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 4, 4), 8 * 4 * 4 * 3 * 9),
    (nn.Conv2d(8, 16, 3, groups=4), (1, 8, 10, 10), 16 * 8 * 8 * 2 * 9),  # grouped: in/groups = 2
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), (1, 8, 10, 10), 8 * 10 * 10 * 1 * 9),  # depthwise
    (nn.Conv2d(4, 6, (3, 1), stride=2), (2, 4, 9, 9), 2 * 6 * 4 * 5 * 4 * 3),  # batch 2, stride, 3x1
    (nn.Conv1d(4, 6, 5), (1, 4, 20), 6 * 16 * 4 * 5),
    (nn.ConvTranspose2d(4, 6, 2, stride=2), (1, 4, 5, 5), 4 * 5 * 5 * 6 * 4),
    (nn.Linear(7, 5), (3, 7), 3 * 5 * 7),
    (nn.Linear(7, 5), (2, 4, 7), 2 * 4 * 5 * 7),
])
def test_macs_of_single_layers_are_exact(layer, shape, macs):
    assert count_macs(layer, torch.zeros(shape)) == macs


def test_macs_of_conv_plus_linear_and_batch_scaling():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 10))
    # conv: 4*6*6 outputs * 1*9; BN, ReLU, pool, flatten: 0; linear: 10 * 36
    assert count_macs(model, torch.zeros(1, 1, 8, 8)) == 4 * 36 * 9 + 10 * 36
    assert count_macs(model, torch.zeros(4, 1, 8, 8)) == 4 * (4 * 36 * 9 + 10 * 36)
    layers = layer_profiles(model, torch.zeros(1, 1, 8, 8))
    assert [(la.name, la.type, la.output_shape) for la in layers] == [
        ("0", "Conv2d", (1, 4, 6, 6)), ("1", "BatchNorm2d", (1, 4, 6, 6)), ("2", "ReLU", (1, 4, 6, 6)),
        ("3", "MaxPool2d", (1, 4, 3, 3)), ("4", "Flatten", (1, 36)), ("5", "Linear", (1, 10)),
    ]
    assert layers[0].share == pytest.approx(1296 / 1656)


def test_lenet5_macs_by_hand():
    p = profile(create_model("lenet5", in_channels=1), torch.zeros(1, 1, 28, 28), latency=False)
    by_name = {layer.name: layer.macs for layer in p.layers}
    assert by_name["conv1"] == 20 * 24 * 24 * 25
    assert by_name["conv2"] == 50 * 8 * 8 * 20 * 25
    assert by_name["fc1"] == 800 * 500
    assert by_name["fc2"] == 500 * 10
    assert p.macs == 2_293_000


# torchvision's published figures (weights meta: num_params and "_ops", GMACs at 224x224, batch 1)
@pytest.mark.parametrize(("name", "gmacs", "params"), [
    ("resnet18", 1.814, 11_689_512),
    ("mobilenet_v2", 0.301, 3_504_872),
    ("mobilenet_v3_large", 0.217, 5_483_032),
    ("shufflenet_v2_x1_0", 0.145, 2_278_604),
])
def test_torchvision_figures_at_224(name, gmacs, params):
    model = create_model(name, num_classes=1000, in_channels=3)
    p = profile(model, torch.zeros(1, 3, 224, 224), latency=False)
    assert p.params == params
    assert p.macs / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_nonzeros_after_zeroing_half_a_weight():
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        for t in model.parameters():
            t.fill_(1.0)
        model[0].weight[:4].zero_()  # half of the 80 entries
    assert count_params(model) == 88 + 18
    assert count_nonzeros(model) == 88 + 18 - 40
    assert profile(model, torch.zeros(1, 10), latency=False).nonzeros == 66


def test_nonzeros_respect_weight_mask_buffers():
    model = nn.Sequential(nn.Linear(10, 8), nn.Linear(8, 2))
    with torch.no_grad():
        for t in model.parameters():
            t.fill_(1.0)
    mask = torch.ones(8, 10)
    mask[:, :5] = 0
    model[0].register_buffer("weight_mask", mask)  # slimkit's convention: weight kept dense, mask beside it
    assert count_nonzeros(model) == 106 - 40
    torch_prune.l1_unstructured(model[1], "weight", amount=4)  # torch's convention: weight_orig + weight_mask
    assert count_nonzeros(model) == 106 - 40 - 4
    assert count_params(model) == 106


def test_bytes_exact_for_a_small_model():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model[0].register_buffer("weight_mask", torch.ones(3, 4))  # excluded: a simulation artefact
    model[1].register_buffer("codes", torch.zeros(5, dtype=torch.int8))  # integer buffer at its itemsize
    # linear 15 floats, BN weight+bias+mean+var 12 floats, num_batches_tracked int64, codes 5 x int8
    assert state_dict_bytes(model) == 4 * 15 + 4 * 12 + 8 + 5
    model.half()  # fp16 still counts as the fp32 state dict
    assert state_dict_bytes(model) == 4 * 15 + 4 * 12 + 8 + 5


def test_shared_weights_count_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_params(model) == 20 and state_dict_bytes(model) == 80
    p = profile(model, torch.zeros(1, 4), latency=False)
    assert p.macs == 2 * 16  # called twice, counted twice
    assert [layer.name for layer in p.layers] == ["0", "1"]


def test_latency_fields_and_restored_state():
    model = create_model("lenet5", in_channels=1)
    model.train()
    model.conv2.eval()  # a mixed state must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    p = profile(model, torch.zeros(4, 1, 28, 28), warmup=2, runs=7, threads=1)
    assert p.latency_ms > 0 and p.latency_p99_ms >= p.latency_ms
    assert p.throughput == pytest.approx(4 / (p.latency_ms / 1e3))
    assert p.batch_size == 4 and p.threads == 1
    assert [m.training for m in model.modules()] == [True, True, True, False, True, True, True, True, True, True]
    assert torch.get_num_threads() == threads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_threads_are_restored():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stats = measure_latency(nn.Linear(4, 4), torch.zeros(1, 4), warmup=0, runs=3, threads=1)
        assert stats.threads == 1 and torch.get_num_threads() == 2
        assert stats.min_ms <= stats.median_ms <= stats.p99_ms <= stats.max_ms
    finally:
        torch.set_num_threads(old)


def test_batchnorm_statistics_untouched_in_train_mode():
    model = create_model("resnet20-cifar", num_classes=10, in_channels=3).train()
    mean = model.bn1.running_mean.clone()
    profile(model, torch.randn(2, 3, 32, 32), latency=False)
    assert torch.equal(model.bn1.running_mean, mean) and int(model.bn1.num_batches_tracked) == 0


@pytest.mark.parametrize(("name", "bad", "expected"), [
    ("lenet5", torch.zeros(2, 3, 28, 28), r"\[N, 1, H, W\]"),
    ("resnet20-cifar", torch.zeros(2, 1, 32, 32), r"\[N, 3, H, W\]"),
    ("lenet-300-100", torch.zeros(2, 784), r"\[N, 1, H, W\] \(zoo model 'lenet-300-100'\)"),
])
def test_bad_example_inputs_raise_one_line_config_error(name, bad, expected):
    model = create_model(name, num_classes=10, in_channels=1 if name.startswith("lenet") else 3)
    with pytest.raises(ConfigError, match=expected) as info:
        profile(model, bad)
    assert "\n" not in str(info.value) and str(list(bad.shape)) in str(info.value)
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed even on error


def test_bad_input_of_a_plain_model_names_its_first_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ConfigError, match=r"expects \[N, 3, H, W\] \(first layer '0'\)"):
        count_macs(model, torch.zeros(1, 2, 8, 8))


@pytest.mark.parametrize("bad", [None, [1, 2], "x", ()])
def test_example_inputs_must_be_tensors(bad):
    with pytest.raises(ConfigError, match="example_inputs must be a Tensor"):
        profile(nn.Linear(2, 2), bad)


@pytest.mark.parametrize("kwargs", [{"runs": 0}, {"warmup": -1}, {"threads": 0}])
def test_bad_latency_settings(kwargs):
    with pytest.raises(ConfigError):
        profile(nn.Linear(2, 2), torch.zeros(1, 2), **kwargs)


class _TwoPath(nn.Module):
    """A custom unit: two linears inside, declared as one layer of cost 7."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_registered_rule_measures_a_module_as_one_unit():
    register_mac_rule(_TwoPath, lambda module, inputs, output: 7)
    model = nn.Sequential(_TwoPath(), nn.Linear(3, 1))
    p = profile(model, torch.zeros(1, 3), latency=False)
    assert p.macs == 7 + 3
    assert [(la.name, la.type, la.params) for la in p.layers] == [("0", "_TwoPath", 24), ("1", "Linear", 4)]
    assert count_macs(_TwoPath(), torch.zeros(1, 3)) == 7  # also when the unit is the whole model


def test_tables():
    model = create_model("lenet5", in_channels=1)
    p = profile(model, torch.zeros(1, 1, 28, 28), runs=3)
    table = format_layer_table(p)
    lines = table.splitlines()
    assert lines[0].split() == ["name", "type", "output", "shape", "params", "MACs", "share", "%"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule aligned
    assert "1,600,000" in table and "431,080" in lines[-1] and "2,293,000" in lines[-1]
    assert len(lines) == 2 + len(p.layers) + 2
    short = format_layer_table(p, hide_empty=True)
    assert "MaxPool2d" not in short and "conv2" in short
    summary = format_summary(p)
    assert "431,080" in summary and "2,293,000" in summary and "p99" in summary and "samples/s" in summary
    assert "peak 56.25 KiB (57,600 B) at pool1" in summary
    assert "not measured" in format_summary(profile(model, torch.zeros(1, 1, 28, 28), latency=False))
    small = create_model("lenet5", in_channels=1)
    with torch.no_grad():
        small.fc1.weight[:250].zero_()
    comparison = format_comparison({"dense": p, "pruned": profile(small, torch.zeros(1, 1, 28, 28), runs=3)})
    assert comparison.splitlines()[2].split()[0] == "dense" and "1.00x" in comparison


# --------------------------------------------------------------------------- peak activation memory

F32 = 4  # bytes per fp32 element


def _chain():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))


def test_peak_of_a_chain_is_the_largest_adjacent_pair():
    mem = peak_activation_bytes(_chain(), torch.zeros(1, 1, 8, 8))
    x, a, b, c = (F32 * n for n in (64, 256, 256, 128))  # [1,1,8,8] -> [1,4,8,8] -> relu -> [1,2,8,8]
    assert mem.steps == (("input", x), ("0", x + a), ("1", a + b), ("2", b + c), ("output", c))
    assert (mem.peak_bytes, mem.peak_at, mem.method) == (2048, "1", "graph")


class _Residual(nn.Module):
    """x [1,4,8,8] -> conv 4->8 -> relu -> conv 8->4 -> + x -> relu."""

    def __init__(self, inplace=False):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=inplace)
        self.conv2, self.relu2 = nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + x)


def test_residual_skip_stays_alive_across_the_branch():
    mem = peak_activation_bytes(_Residual(), torch.zeros(1, 4, 8, 8))
    x, a, b, c, d, e = (F32 * n for n in (256, 512, 512, 256, 256, 256))
    assert [size for _, size in mem.steps] == [x, x + a, x + a + b, x + b + c, x + c + d, d + e, e]
    assert (mem.peak_bytes, mem.peak_at) == (5120, "relu1")  # x, conv1's and relu1's outputs
    largest_pair = max(x + a, a + b, b + c, c + x + d, d + e)
    assert mem.peak_bytes > largest_pair


def test_in_place_results_share_their_input_storage():
    mem = peak_activation_bytes(_Residual(inplace=True), torch.zeros(1, 4, 8, 8))
    x, a, c, d = (F32 * n for n in (256, 512, 256, 256))  # relu1 writes into a, relu2 into d
    assert [size for _, size in mem.steps] == [x, x + a, x + a, x + a + c, x + c + d, d, d]
    assert (mem.peak_bytes, mem.peak_at) == (4096, "conv2")


class _Views(nn.Module):
    """conv [1,4,4,4] -> view [1,4,16] -> torch.flatten [1,64] -> nn.Flatten -> linear [1,2]."""

    def __init__(self):
        super().__init__()
        self.conv, self.flat, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(self.flat(torch.flatten(y.view(y.size(0), 4, -1), 1)))


def test_views_are_not_counted_twice():
    mem = peak_activation_bytes(_Views(), torch.zeros(1, 1, 4, 4))
    x, y, out = F32 * 16, F32 * 64, F32 * 2
    assert [name for name, _ in mem.steps] == ["x", "conv", "size", "view", "flatten", "flat", "fc", "output"]
    assert [size for _, size in mem.steps] == [x, x + y, y, y, y, y, y + out, out]
    assert (mem.peak_bytes, mem.peak_at) == (x + y, "conv")


def test_dtype_and_batch_size_scale_the_bytes():
    fp32 = peak_activation_bytes(_chain(), torch.zeros(1, 1, 8, 8)).peak_bytes
    assert peak_activation_bytes(_chain().half(), torch.zeros(1, 1, 8, 8, dtype=torch.half)).peak_bytes == fp32 // 2
    assert peak_activation_bytes(_chain(), torch.zeros(4, 1, 8, 8)).peak_bytes == 4 * fp32


class _FromBytes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x.float() / 255)


def test_an_int8_input_counts_one_byte_per_element():
    mem = peak_activation_bytes(_FromBytes(), torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    x, f, g, y = 64, F32 * 64, F32 * 64, F32 * 256
    assert [size for _, size in mem.steps] == [x, x + f, f + g, g + y, y]


class _Masked(nn.Module):
    """A weight times its mask inside forward: a weight-sized product that is no activation."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1000, 8))
        self.register_buffer("mask", torch.ones(1000, 8))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask)


def test_tensors_computed_from_weights_alone_are_not_activations():
    mem = peak_activation_bytes(_Masked(), torch.zeros(1, 8))
    assert mem.method == "graph" and mem.peak_bytes == F32 * (8 + 1000)


class _Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = self.relu(y)
        return y


def test_layers_fallback_for_a_model_fx_cannot_trace():
    model = _Branchy().train()
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.fill_(1.0)  # y > 0: the relu branch runs
    mem = peak_activation_bytes(model, torch.zeros(1, 1, 8, 8))
    x, y = F32 * 64, F32 * 256
    assert mem.method == "layers"
    assert mem.steps == (("input", x), ("conv", x + y), ("relu", 2 * y))
    assert (mem.peak_bytes, mem.peak_at) == (2 * y, "relu")
    assert model.training and all(not m._forward_hooks for m in model.modules())


def test_shape_branch_resolved_by_the_meta_trace():
    # LeNet-5's FitSize branches on the input size: the meta trace resolves it (an identity at 28 x 28)
    mem = peak_activation_bytes(create_model("lenet5", in_channels=1), torch.zeros(1, 1, 28, 28))
    assert mem.method == "graph" and "fit" not in dict(mem.steps) and "conv2" in dict(mem.steps)
    assert (mem.peak_bytes, mem.peak_at) == (F32 * (20 * 24 * 24 + 20 * 12 * 12), "pool1")


class _ValueBranch(nn.Module):
    """Branches on a tensor's value: no trace sees through it, so it is kept whole."""

    def forward(self, x):
        return x.relu() if x.sum() > 0 else x * 2


def test_untraceable_submodule_becomes_a_leaf():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _ValueBranch(), nn.Conv2d(4, 2, 3, padding=1))
    mem = peak_activation_bytes(model, torch.zeros(1, 1, 8, 8))
    assert mem.method == "graph" and "1" in dict(mem.steps)
    assert dict(mem.steps)["1"] == 2 * F32 * 4 * 64  # its input and (a new) output


def test_peak_memory_bad_input_raises_config_error():
    model = create_model("lenet5", in_channels=1)
    with pytest.raises(ConfigError, match=r"\[N, 1, H, W\]"):
        peak_activation_bytes(model, torch.zeros(1, 3, 28, 28))
    assert all(not m._forward_hooks for m in model.modules())


def _largest_leaf_in_plus_out(model, x):
    """Max over leaf-module calls of the bytes of their distinct input and output tensors (by storage)."""
    sizes = []

    def hook(module, inputs, output):
        tensors = {t.untyped_storage().data_ptr(): t for t in (*inputs, output)}
        sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return max(sizes)


@pytest.mark.parametrize(("name", "peak"), [
    ("lenet5", F32 * (20 * 24 * 24 + 20 * 12 * 12)),  # conv1's output and pool1's
    ("resnet20-cifar", F32 * 3 * 16 * 28 * 28),  # a block's input (the skip), conv1's and bn1's outputs
    ("mobilenet_v2", F32 * 2 * 96 * 14 * 14),  # the first expansion to 96 channels and its BN
    ("shufflenet_v2_x0_5", None),
    ("squeezenet1_1", None),
    ("vgg11-cifar", F32 * 2 * 64 * 28 * 28),  # the first conv's output and its BN's
])
def test_peak_memory_of_zoo_models(name, peak):
    model = create_model(name, num_classes=10, in_channels=1)
    x = torch.zeros(1, 1, 28, 28)
    mem = peak_activation_bytes(model, x)
    assert mem.method == "graph"
    assert mem.peak_bytes == max(size for _, size in mem.steps)
    assert mem.peak_bytes >= _largest_leaf_in_plus_out(model, x)
    largest_output = max(F32 * math.prod(la.output_shape) for la in layer_profiles(model, x) if la.output_shape)
    assert mem.peak_bytes >= F32 * 28 * 28 and mem.peak_bytes >= largest_output
    if peak is not None:
        assert mem.peak_bytes == peak


def test_skip_connections_raise_the_peak_above_any_single_layer():
    model = create_model("resnet20-cifar", num_classes=10, in_channels=1)
    x = torch.zeros(1, 1, 28, 28)
    assert peak_activation_bytes(model, x).peak_bytes > _largest_leaf_in_plus_out(model, x)


# ---------------------------------------------------------------- one measurement layer (issue 16)

class _Probe(nn.Module):
    """Records, on every forward, what a timer must have set: eval mode, inference mode, the thread count."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seen: list[tuple[bool, bool, int]] = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_inference_mode_enabled(), torch.get_num_threads()))
        return self.fc(x)


def _latency_paths():
    from slimkit.deploy.runners import TorchRunner
    from slimkit.measure.realtime import realtime_profile

    return {
        "measure_latency": lambda m, x: measure_latency(m, x, warmup=1, runs=3, threads=1),
        "profile": lambda m, x: profile(m, x, warmup=1, runs=3, threads=1),
        "TorchRunner.latency_ms": lambda m, x: TorchRunner(m, threads=1).latency_ms(x, warmup=1, repeats=3),
        "realtime eager": lambda m, x: realtime_profile(m, x, engine="eager", runs=3, threads=1),
    }


@pytest.mark.parametrize("path", sorted(_latency_paths()))
def test_every_latency_path_times_in_eval_and_inference_mode_on_its_threads(path):
    model = _Probe().train()
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _latency_paths()[path](model, torch.zeros(1, 4))
        timed = model.seen[-3:]  # the timed runs
        assert timed == [(False, True, 1)] * 3, timed
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_time_callable_applies_and_restores_threads():
    from slimkit.measure.latency import call_times_ms, time_callable

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        stats = time_callable(lambda: seen.append(torch.get_num_threads()), warmup=2, runs=5, threads=1)
        assert seen == [1] * 7 and stats.runs == 5 and stats.threads == 1 and torch.get_num_threads() == 2
        assert call_times_ms(lambda: None, warmup=0, runs=4).shape == (4,)
        with pytest.raises(ConfigError, match="runs must be an integer >= 1"):
            time_callable(lambda: None, runs=0)
    finally:
        torch.set_num_threads(old)


def test_one_timer_no_other_clock_around_an_inference():
    """Latency figures come from slimkit.measure.latency only: no other module in src reads the clock around
    a forward (the files listed time other things: a RAPL window, elapsed run time; kernels.timing's
    round-robin interleaved_ms is measure.latency's). The earlier deploy.timing.median_ms (no eval mode,
    inference mode or thread control) is gone."""
    from pathlib import Path

    import slimkit

    root = Path(slimkit.__file__).parent
    clocks = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "perf_counter" in p.read_text())
    assert clocks == ["measure/energy.py", "measure/latency.py", "measure/realtime.py", "pipeline.py",
                      "search/run.py"], clocks
    assert "perf_counter()" not in (root / "measure/realtime.py").read_text()  # named in its docstring only
    assert not [p for p in root.rglob("*.py") if "\ndef median_ms(" in p.read_text()]
    import slimkit.deploy
    import slimkit.deploy.timing

    assert not hasattr(slimkit.deploy.timing, "median_ms") and not hasattr(slimkit.deploy, "median_ms")


_CONVS = [
    nn.Conv2d(8, 16, 3, padding=1),
    nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, bias=False),
    nn.Conv2d(8, 8, 3, padding=1, groups=8),
    nn.Conv2d(8, 16, 4, padding="same"),  # even kernel: padding 1 on one side, 2 on the other
    nn.Conv2d(8, 16, (1, 5), padding="valid"),
    nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("conv", _CONVS, ids=lambda c: repr(c))
def test_count_macs_by_shape_equals_a_real_forward(conv):
    from slimkit.measure import count_macs_by_shape

    x = torch.randn(1, 8, 11, 9)
    assert count_macs_by_shape(conv, tuple(x.shape)) == count_macs(conv, x)
    chain = nn.Sequential(conv, nn.Conv2d(conv.out_channels, 4, 1))
    assert count_macs_by_shape(chain, tuple(x.shape)) == count_macs(chain, x)
    assert count_macs_by_shape(chain.to("meta"), tuple(x.shape)) == count_macs(chain, x, meta=True) > 0


@pytest.mark.parametrize("method", ["tucker", "cp", "channel", "separable", "depthwise-separable"])
def test_chain_cost_is_the_measure_count_on_a_decomposed_chain(method):
    """decompose's cost model and the report's MAC/param figures are one counter: they cannot disagree."""
    from slimkit.decompose import METHODS, chain_cost

    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    x = torch.randn(1, 8, 10, 10)
    spec = METHODS.get(method)
    skeleton = spec.skeleton(conv, tuple(max(1, f // 2) for f in spec.full_ranks(conv)), device="cpu")
    for chain in (conv, skeleton):
        assert chain_cost(chain, tuple(x.shape[1:])) == (count_params(chain), count_macs(chain, x))
    linear = nn.Linear(20, 6)
    assert chain_cost(linear, (3, 20)) == (126, 3 * 20 * 6) == (count_params(linear),
                                                                 count_macs(linear, torch.zeros(1, 3, 20)))


def test_mac_rules_and_units_are_public():
    """Packages that declare MACs (quantize/hashed, prune/graph) use measure.macs' public names."""
    from pathlib import Path

    import slimkit
    from slimkit.measure import macs

    assert macs.rule_for(nn.Conv2d(1, 1, 1)) is macs.conv_macs and macs.rule_for(nn.Linear(1, 1)) is macs.linear_macs
    assert [n for n, _ in macs.mac_units(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))] == ["0", "1"]
    root = Path(slimkit.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.parent.name != "measure" and any(
                     line.lstrip().startswith("from slimkit.measure") and " import _" in line
                     or line.lstrip().startswith("from slimkit.measure") and ", _" in line
                     for line in p.read_text().splitlines())]
    assert offenders == []


class _Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(8, 8))
        self.register_buffer("weight_mask", torch.ones(8, 8))


@pytest.mark.parametrize("name", SMALL_ZOO[:4])
def test_stored_bytes_is_the_state_dict_figure_without_rules(name):
    from slimkit.measure import stored_bytes
    from slimkit.measure.size import state_dict_bytes as size_bytes

    model = create_model(name, in_channels=1 if name.startswith("lenet") else 3)
    assert size_bytes is state_dict_bytes  # one implementation (slimkit.measure.storage)
    assert stored_bytes(model) == state_dict_bytes(model) == 4 * count_params(model) + 4 * _bn_buffers(model)[0] \
        + 8 * _bn_buffers(model)[1]


def test_storage_rules_replace_a_layers_own_tensors_once():
    from slimkit.measure import register_storage_rule, stored_bytes

    packed = _Packed()
    model = nn.Sequential(nn.Linear(4, 2), packed, nn.Sequential(packed))  # the ruled layer under two names
    assert state_dict_bytes(model) == stored_bytes(model) == 4 * 10 + 4 * 64  # masks excluded, shared once
    register_storage_rule(_Packed, lambda m: m.weight.numel() // 8)  # 1 bit per weight (a test-only class)
    assert stored_bytes(model) == 4 * 10 + 8
    assert state_dict_bytes(model) == 4 * 10 + 4 * 64  # the dense figure ignores rules
