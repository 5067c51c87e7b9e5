"""Channel dependency graph and surgery: coupled groups, and pruning zero channels changes nothing."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from slimkit.exceptions import UnsupportedModelError
from slimkit.models import create_model
from slimkit.prune import graph as graph_module
from slimkit.prune.graph import build_graph, clear_graph_cache
from slimkit.prune.surgery import prune_units_, removals_for


def _groups(model, x):
    g = build_graph(model, x)
    return g, {grp.name: len(grp.units) for grp in g.groups}


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        y = self.stem(x)
        y = y + torch.relu(self.bn(self.a(y)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.b(y), 4), 1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.out(y * s)


class Chunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        p, q = self.a(x).chunk(2, dim=1)
        y = torch.cat([p, self.b(q)], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(y)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.b(torch.cumsum(self.a(x), 2)))


X = torch.randn(1, 3, 8, 8)


def test_chain_and_flatten_linear():
    g, groups = _groups(Residual(), X)
    # stem and the residual branch's conv a share one channel stream
    assert groups == {"a,stem": 8, "b": 6}
    unit = g.units[g.groups[1].units[0]]
    # one channel of b maps onto 4*4 flattened inputs of fc
    assert len(unit.members[("fc", "in")]) == 16


def test_concat_offsets():
    g, groups = _groups(Concat(), X)
    assert groups == {"a": 4, "b": 6}
    offsets = sorted(int(g.units[u].members[("head", "in")][0]) for grp in g.groups for u in grp.units)
    assert offsets == list(range(10))


def test_se_multiply_couples_main_path():
    g, groups = _groups(SE(), X)
    assert groups == {"conv,fc2": 8, "fc1": 4}


def test_chunk_and_shuffle_keep_stream_but_prune_inside():
    g, groups = _groups(Chunk(), X)
    assert groups == {}  # split halves and the shuffle fix every stream channel
    assert "a" in g.fixed_reasons and "b" in g.fixed_reasons


def test_depthwise_grouped_groupnorm_prelu():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(8, 8), nn.PReLU(8), nn.Conv2d(8, 8, 3, groups=8),
                        nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 4, 1))
    g, groups = _groups(net, X)
    assert groups == {"0": 8, "6": 8}  # GroupNorm(2 groups) keeps conv 4 and the grouped conv's input
    assert g.groups[1].partitions == [g.groups[1].units[:4], g.groups[1].units[4:]]
    assert set(g.units[g.groups[0].units[0]].members) == {("0", "out"), ("1", "out"), ("2", "out"),
                                                          ("3", "out"), ("4", "in")}
    prune_units_(net, g, g.groups[0].units[:3])
    assert net[3].groups == net[3].in_channels == 5 and net(X).shape == (1, 4, 4, 4)


class ResNeXtBlock(nn.Module):
    """Bottleneck with a grouped 3x3 (groups=4) and a projection shortcut."""

    def __init__(self, cin=8, width=16, cout=12, groups=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return torch.relu(self.bn3(self.conv3(y)) + self.down(x))


class ResNeXtNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(ResNeXtBlock(8, 16, 12, 4), ResNeXtBlock(12, 24, 16, 8))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def grouped_chain():
    """1x1 -> grouped 3x3 (groups=4) -> grouped 3x3 (groups=2, refined by 4) -> grouped 1x1 (groups=6)."""
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1, groups=4),
                         nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=2), nn.ReLU(),
                         nn.Conv2d(12, 12, 1, groups=6), nn.BatchNorm2d(12), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(12, 10))


def test_grouped_conv_channels_are_partitioned_per_group():
    g, groups = _groups(grouped_chain(), X)
    assert groups == {"0": 8, "3": 12, "6": 12, "8": 12}
    parts = {grp.name: [len(p) for p in grp.partitions] for grp in g.groups}
    # conv 3's output: 4 blocks (its groups) and 2 (conv 6's); conv 6's: 2 and 6; the finer holds
    assert parts == {"0": [2] * 4, "3": [3] * 4, "6": [2] * 6, "8": [2] * 6}
    g, groups = _groups(ResNeXtNet(), X)
    assert {name: len(grp.partitions or []) for name, grp in zip(groups, g.groups, strict=True)} == {
        "stem.0": 0, "blocks.0.conv1": 4, "blocks.0.conv2": 4, "blocks.0.conv3,blocks.0.down.0": 0,
        "blocks.1.conv1": 8, "blocks.1.conv2": 8, "blocks.1.conv3,blocks.1.down.0": 0}


def test_grouped_conv_keeps_channels_it_cannot_split_evenly():
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, groups=2), nn.Conv2d(6, 6, 3, groups=3),
                        nn.Conv2d(6, 2, 1))
    g, groups = _groups(net, X)
    assert groups == {"0": 6, "2": 6}  # conv 1's output: 2 groups of 3 and 3 groups of 2
    assert g.fixed_reasons == {"1": "input of grouped conv 2 (groups=3)", "3": "reaches the model output"}


def test_surgery_refuses_uneven_group_removal():
    net = grouped_chain()
    g = build_graph(net, X)
    with pytest.raises(UnsupportedModelError, match="groups would lose different channel counts"):
        prune_units_(net, g, g.groups[0].partitions[0][:1])


def test_unknown_op_errors_or_skips():
    with pytest.raises(UnsupportedModelError, match="cumsum"):
        build_graph(Unknown(), X)
    with pytest.warns(UserWarning, match="cumsum"):
        g = build_graph(Unknown(), X, on_unsupported="skip")
    assert {grp.name for grp in g.groups} == {"b"}


def test_model_with_shape_control_flow_is_traced():
    g = build_graph(create_model("lenet5", in_channels=1), torch.zeros(1, 1, 28, 28))
    assert {grp.name for grp in g.groups} == {"conv1", "conv2", "fc1"}


def zero_units(model, graph, uids):
    """Zero every parameter the units own (filters, BN scale/shift, per-channel params)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for (name, role), drop in removals_for(graph, uids).items():
            if role == "in":
                continue
            m, idx = modules[name], torch.as_tensor(drop)
            if role.startswith("param:"):
                _, pname, axis = role.split(":")
                getattr(m, pname).index_fill_(int(axis), idx, 0)
                continue
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if p is not None:
                    p.index_fill_(0, idx, 0)


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)


def _tv(name):
    kw = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return lambda: torchvision.models.get_model(name, num_classes=10, **kw)


def _zoo(name, channels=3):
    return lambda: create_model(name, num_classes=10, in_channels=channels)


EQUIV = {
    "lenet5": (_zoo("lenet5", 1), 28), "lenet-300-100": (_zoo("lenet-300-100", 1), 28),
    "resnet20-cifar": (_zoo("resnet20-cifar"), 32), "vgg11-cifar": (_zoo("vgg11-cifar"), 32),
    "mobilenet-v1": (_zoo("mobilenet-v1"), 32), "mobilenet_v3_small": (_zoo("mobilenet_v3_small"), 32),
    "shufflenet_v2_x0_5": (_zoo("shufflenet_v2_x0_5"), 32), "squeezenet1_1": (_zoo("squeezenet1_1"), 48),
    "resnet18": (_tv("resnet18"), 32), "mobilenet_v2": (_tv("mobilenet_v2"), 32),
    "mnasnet0_5": (_tv("mnasnet0_5"), 32), "efficientnet_b0": (_tv("efficientnet_b0"), 32),
    "regnet_x_400mf": (_tv("regnet_x_400mf"), 32), "googlenet": (_tv("googlenet"), 32),
    "densenet121": (_tv("densenet121"), 32), "convnext_tiny": (_tv("convnext_tiny"), 32),
    "regnet_y_400mf": (_tv("regnet_y_400mf"), 32), "resnext-block": (ResNeXtNet, 16),
    "grouped-chain": (grouped_chain, 8),
    "resnext50_32x4d": (_tv("resnext50_32x4d"), 32),
}


def outputs_zeroed_then_pruned(model, graph, uids, x):
    """(output with the units' parameters zeroed, output after pruning them): equal when the cut is exact."""
    zero_units(model, graph, uids)
    with torch.no_grad():
        before = model(x)
    prune_units_(model, graph, uids)
    with torch.no_grad():
        after = model(x)
    return before, after


def half_of_each(group):
    """The first half of a group's units, taken per partition when it reaches a grouped conv."""
    if group.partitions:
        return [u for p in group.partitions for u in p[: len(p) // 2]]
    return group.units[: len(group.units) // 2]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "resnext50_32x4d" else n
                                  for n in EQUIV])
def test_pruning_zero_channels_preserves_outputs(name):
    build, size = EQUIV[name]
    model = build().eval()
    channels = 1 if name.startswith("lenet") else 3
    x = torch.randn(2, channels, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = build_graph(model, x[:1])
    uids = [u for grp in g.groups for u in half_of_each(grp)]
    assert uids, "nothing prunable"
    _randomize_bn(model)
    params = sum(p.numel() for p in model.parameters())
    before, after = outputs_zeroed_then_pruned(model, g, uids, x)
    assert before.abs().max() > 0
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < params


def _same_graph(a, b):
    assert [(g.name, g.units) for g in a.groups] == [(g.name, g.units) for g in b.groups]
    assert list(a.units) == list(b.units) and a.fixed_reasons == b.fixed_reasons and a.warnings == b.warnings
    for uid, unit in a.units.items():
        other = b.units[uid]
        assert unit.producers == other.producers and list(unit.members) == list(other.members)
        assert all(np.array_equal(idx, other.members[axis]) for axis, idx in unit.members.items())


def test_graph_cache_serves_copies_and_never_a_stale_graph(monkeypatch):
    traced = []
    real_trace = graph_module.trace
    monkeypatch.setattr(graph_module, "trace", lambda *a: traced.append(1) or real_trace(*a))
    net, x = create_model("resnet20-cifar").eval(), torch.randn(1, 3, 32, 32)
    clear_graph_cache()
    reference = build_graph(net, x, cache=False)
    first = build_graph(net, x)
    twin = copy.deepcopy(net)
    again = build_graph(twin, x)  # same structure: served from the cache
    assert len(traced) == 2
    _same_graph(reference, first)
    _same_graph(reference, again)
    assert again.units[again.groups[0].units[0]] is not first.units[first.groups[0].units[0]]
    assert again.modules[""] is twin
    with pytest.raises(ValueError, match="read-only"):
        next(iter(again.units[again.groups[0].units[0]].members.values()))[0] = 1
    prune_units_(net, first, first.groups[0].units[:3])  # surgery changes the structure
    _same_graph(build_graph(net, x, cache=False), build_graph(net, x))
    assert len(traced) == 4
    twin.conv1.stride = (2, 2)  # an attribute that changes shapes, same channel counts
    _same_graph(build_graph(twin, x, cache=False), build_graph(twin, x))
    assert len(traced) == 6


# -- the op-rule table: functional spellings, the extension point ------------------------

class FunctionalNet(nn.Module):
    """Layers in their functional spelling: F.conv2d on a standardized weight, F.batch_norm on get_attr
    parameters, F.linear, a per-channel gain and a class token and position embedding as in ViTs."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.gain = nn.Parameter(torch.rand(8, 1, 1, 1) + 0.5)
        self.bn = nn.BatchNorm2d(8)
        self.w2 = nn.Parameter(torch.randn(6, 8, 1, 1))
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.pos = nn.Parameter(torch.randn(1, 17, 6))
        self.fc_w = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        w = self.w1.reshape(1, self.w1.shape[0], -1)
        w = F.batch_norm(w, None, None, training=True, momentum=0.0).reshape_as(self.w1)
        y = F.conv2d(x, w * self.gain, padding=1)
        y = F.relu(F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias))
        y = F.conv2d(F.max_pool2d(y, 2), self.w2) * self.scale.view(1, -1, 1, 1)
        tokens = y.flatten(2).transpose(1, 2)  # [N, 16, 6]
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.pos
        return F.linear(tokens[:, 0], self.fc_w)



def test_functional_layers_read_their_get_attr_parameters():
    net = FunctionalNet().eval()
    g = build_graph(net, X)
    assert {grp.name: len(grp.units) for grp in g.groups} == {"w1": 8, "w2": 6}
    axes = {axis for unit in g.units.values() for axis in unit.members}
    assert {("", "param:w1:0"), ("", "param:gain:0"), ("bn", "out"), ("", "param:w2:1"), ("", "param:w2:0"),
            ("", "param:scale:0"), ("", "param:cls:2"), ("", "param:pos:2"), ("", "param:fc_w:1")} <= axes
    uids = [u for grp in g.groups for u in grp.units[:2]]
    prune_units_(net, g, uids)
    assert net.w1.shape[0] == net.gain.shape[0] == net.bn.num_features == net.w2.shape[1] == 6
    assert net.w2.shape[0] == net.scale.shape[0] == net.cls.shape[2] == net.pos.shape[2] == net.fc_w.shape[1] == 4
    assert net(X).shape == (1, 4)


class Eca(nn.Module):
    """ECA attention: a Conv1d slides along the channel axis of the pooled features."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        s = self.eca(y.mean((2, 3)).view(x.shape[0], 1, -1)).view(x.shape[0], -1, 1, 1)
        return self.head(y * s.sigmoid().expand_as(y))


class Glu(nn.Module):
    """A gated MLP: fc1's output is chunked in two halves that gate each other."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.fc1(x.mean((2, 3))).chunk(2, dim=-1)
        return self.fc2(a * torch.sigmoid(b))


def test_eca_passes_channels_and_even_chunks_pair_halves():
    g, groups = _groups(Eca(), X)
    assert groups == {"a": 8} and ("eca", "in") not in g.axes
    net = Glu()
    g, groups = _groups(net, X)
    assert groups == {"fc1": 4}  # unit i is channels i and i + 4 of fc1
    assert sorted(g.units[g.groups[0].units[0]].members[("fc1", "out")].tolist()) == [0, 4]
    prune_units_(net, g, g.groups[0].units[:1])
    assert net.fc1.out_features == 6 and net(X).shape == (1, 2)


def test_layer_norm_over_channels_keep_or_prune():
    net = torchvision.models.convnext_tiny(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    keep = build_graph(net, x, norm_channels="keep")
    prune = build_graph(net, x, norm_channels="prune")
    assert "features.0.0" in keep.fixed_reasons and "LayerNorm" in keep.fixed_reasons["features.0.0"]
    stream = next(grp for grp in prune.groups if "features.0.0" in grp.producers)
    assert len(stream.units) == 96
    with pytest.raises(ValueError, match="norm_channels must be 'keep' or 'prune'"):
        build_graph(net, x, norm_channels="sometimes")


def test_unknown_op_names_it_and_the_extension_point():
    with pytest.raises(UnsupportedModelError, match=r"function cumsum .*register_channel_rule"):
        build_graph(Unknown(), X)


def test_wrongly_shaped_input_fails_in_one_line():
    from slimkit.exceptions import ConfigError

    with pytest.raises(ConfigError) as info:
        build_graph(Residual(), torch.randn(1, 5, 8, 8))
    message = str(info.value)
    assert "\n" not in message and "(1, 5, 8, 8)" in message and "fx node 'stem'" in message


def test_docs_custom_layer_example_is_refused_then_pruned(capsys):
    """The worked example of docs/structured-pruning.md, run as written."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "structured-pruning.md").read_text()
    block = doc.split("<!-- example: custom layer -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(block, "docs/structured-pruning.md", "exec"), {})
    assert "function unfold" in capsys.readouterr().out


class ConstantViews(nn.Module):
    """``scale.view(self.shape)`` (timm's Scale2d) and a view of the activations with a channel count baked in."""

    def __init__(self, baked: bool):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)
        self.scale, self.shape = nn.Parameter(torch.ones(8)), (8, 1, 1)
        self.head, self.baked = nn.Linear(8, 2), baked

    def forward(self, x):
        y = self.b(self.a(x) * self.scale.view(self.shape))
        y = y.view(x.shape[0], 8, -1) if self.baked else y.flatten(2)
        return self.head(y.mean(2))


class BakedView(nn.Module):
    """A layer with a channel count baked into its forward, described (wrongly) as element-wise."""

    def forward(self, x):
        return x.reshape(x.shape[0], 8, x.shape[2], x.shape[3])


def test_constant_shapes_keep_their_channels_or_leave_the_model_unchanged():
    from slimkit.prune import register_channel_rule, structured_

    net = ConstantViews(baked=False)
    structured_(net, X, {"ratio": 0.5})
    assert net.a.out_channels == 8 and net.b.out_channels == 4  # scale's fixed view keeps a's channels
    assert "a constant (8)" in build_graph(ConstantViews(baked=True), X).fixed_reasons["b"]  # view(B, 8, -1)
    register_channel_rule(BakedView, "pass")  # a rule that does not foresee the baked count
    net = nn.Sequential(nn.Conv2d(3, 8, 1), BakedView(), nn.Conv2d(8, 2, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"would break its forward at fx node '_1', module 1 \(BakedView\) "
                       r"\(RuntimeError: .*left as it was"):
        structured_(net, X, {"ratio": 0.5})
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()) and net(X).shape[1] == 2
