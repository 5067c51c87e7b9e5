"""The fast paths of structured pruning give the figures of the slow ones (correctness only, never wall-clock).

- timm's norm-act layers as leaves of the trace give the graph, the kept channels and the
  weights that tracing through them gives;
- the report's MACs after the cut, read from the recorded shapes and the cut layers' channel
  counts (no run), equal ``count_macs`` of the pruned model, and so do the MACs of a graph from
  the cache (no real forward);
- a graph whose layout a cut can change still counts by a run (the check that the forward works).
"""

import copy
import importlib
import warnings

import pytest
import torch
import torchvision
from torch import nn

from slimkit.measure import count_macs
from slimkit.prune import structured_
from slimkit.prune.graph import build_graph, clear_graph_cache
from slimkit.prune.graph import macs as graph_macs
from slimkit.prune.graph.macs import fixed_layout, traced_macs

graph_trace = importlib.import_module("slimkit.prune.graph.trace")  # the package exports a function of that name

timm = pytest.importorskip("timm")

X = torch.randn(1, 3, 64, 64)


def _timm(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, num_classes=10).eval()


def _tv(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=10).eval()


def _randomize(model: nn.Module) -> None:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.5)
            m.running_mean.data.normal_(0, 0.1)
            m.running_var.data.uniform_(0.5, 1.5)


def _layout(graph) -> list:
    """The graph's content, independent of slot numbering: axes with their sizes, groups with their unit counts."""
    axes = sorted((name, role, len(slots)) for (name, role), slots in graph.axes.items())
    groups = sorted((g.name, g.producers, len(g.units)) for g in graph.groups)
    return [axes, groups, sorted(graph.fixed_reasons)]


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "efficientnet_b0"])
def test_norm_act_leaves_give_the_traced_through_graph_and_cut(name, monkeypatch):
    model = _timm(name)
    leaves = [n for n, m in model.named_modules() if graph_trace.norm_act_leaf(m)]
    assert leaves, "the model has BatchNormAct2d layers with element-wise activations"
    gm = graph_trace.trace(model, X)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert set(leaves) <= called and not any(n.startswith(leaf + ".") for n in called for leaf in leaves)
    leaf_graph = build_graph(model, X, cache=False)
    leaf_model = copy.deepcopy(model)
    _randomize(leaf_model)
    through_model = copy.deepcopy(leaf_model)
    leaf_report = structured_(leaf_model, X, {"ratio": 0.5})

    monkeypatch.setattr(graph_trace, "NORM_ACT_FORWARDS", frozenset())
    clear_graph_cache()
    through_gm = graph_trace.trace(model, X)
    assert len(through_gm.graph.nodes) > len(gm.graph.nodes) + 5 * len(leaves)  # F.batch_norm, _assert, ...
    assert _layout(build_graph(model, X, cache=False)) == _layout(leaf_graph)
    through_report = structured_(through_model, X, {"ratio": 0.5})
    clear_graph_cache()

    assert leaf_report.layers == through_report.layers and leaf_report.groups == through_report.groups
    assert leaf_report.macs_after == through_report.macs_after and leaf_report.after == through_report.after
    state = through_model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in leaf_model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(leaf_model(X), through_model(X))


class _OwnAct(nn.Module):
    def forward(self, x):
        return x * 2


def test_a_norm_act_layer_with_an_unknown_activation_is_traced_through():
    layer = timm.layers.BatchNormAct2d(8, act_layer=nn.ReLU)
    assert graph_trace.norm_act_leaf(layer)
    layer.act = _OwnAct()  # not a torch.nn element-wise layer: its forward must be seen
    assert not graph_trace.norm_act_leaf(layer)
    layer.act = nn.PReLU(8)  # parameters of its own
    assert not graph_trace.norm_act_leaf(layer)
    assert not graph_trace.norm_act_leaf(nn.BatchNorm2d(8))


MODELS = {
    "resnet18": lambda: _tv("resnet18"),
    "mobilenet_v3_small": lambda: _tv("mobilenet_v3_small"),
    "efficientnet_b0": lambda: _tv("efficientnet_b0"),
    "densenet121": lambda: _tv("densenet121"),
    "timm:mobilenetv3_small_050": lambda: _timm("mobilenetv3_small_050"),
    "timm:efficientnet_b0": lambda: _timm("efficientnet_b0"),
    "timm:resnet10t": lambda: _timm("resnet10t"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_macs_after_the_cut_from_recorded_shapes_equal_count_macs(name, monkeypatch):
    model = MODELS[name]()
    graph = build_graph(model, X, cache=False)
    assert fixed_layout(graph.traced, model)

    def no_run(*args, **kwargs):
        raise AssertionError("the MACs of a model with a fixed layout are counted without a run")

    monkeypatch.setattr(graph_macs, "_Counter", no_run)
    monkeypatch.setattr("slimkit.prune.structured.count_macs", no_run)
    report = structured_(model, X, {"ratio": 0.5})
    assert report.macs_after < report.macs_before
    assert report.macs_after == count_macs(model, X) and report.macs_before == count_macs(MODELS[name](), X)


def test_a_graph_from_the_cache_counts_macs_without_a_forward(monkeypatch):
    model = _tv("mobilenet_v3_small")
    build_graph(model, X)  # cached
    twin = copy.deepcopy(model)
    graph = build_graph(twin, X)
    assert graph.traced is None and graph.recorded is not None
    before = traced_macs(graph, twin, X, recorded=True)
    assert before == count_macs(twin, X)
    monkeypatch.setattr("slimkit.prune.structured.count_macs", lambda *a, **k: pytest.fail("a real forward"))
    report = structured_(twin, X, {"ratio": 0.5})
    monkeypatch.undo()
    assert report.macs_before == before and report.macs_after == count_macs(twin, X)
    clear_graph_cache()


class _Heads(nn.Module):
    """A reshape of the channels (two heads): a cut changes the layout, so the MACs after are counted by a run."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        n, c, h, w = y.shape
        return self.c(y.view(n, 2, c // 2, h, w).flatten(1, 2))


def test_graphs_whose_layout_a_cut_can_change_are_counted_by_a_run(monkeypatch):
    model = _Heads()
    graph = build_graph(model, X, cache=False)
    assert not fixed_layout(graph.traced, model)
    runs = []
    counter = graph_macs._Counter

    def counting(*args, **kwargs):
        runs.append(1)
        return counter(*args, **kwargs)

    monkeypatch.setattr(graph_macs, "_Counter", counting)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    net_graph = build_graph(net, X, cache=False)
    assert fixed_layout(net_graph.traced, net)
    assert not fixed_layout(build_graph(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Flatten(2)), X, cache=False).traced,
                            nn.Sequential(nn.Conv2d(3, 8, 1), nn.Flatten(2)))
    report = structured_(model, X, {"ratio": 0.5, "ignore": []})
    assert runs and report.macs_after == count_macs(model, X)
