"""One tracing helper (slimkit.tracing.trace_model) with one fallback order, used by every graph path:
the channel graph (structured pruning), peak activation memory, batch-norm folding, the x86 int8 engine."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import slimkit
from slimkit.exceptions import UnsupportedModelError
from slimkit.measure import peak_activation_bytes
from slimkit.models import create_model
from slimkit.quantize.fold import conv_bn_pairs, fold_bn_
from slimkit.tracing import trace_model


class ShapeBranch(nn.Module):
    """The model's own forward branches on a shape: only the meta trace resolves it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        if x.shape[-1] != 8:
            x = F.adaptive_avg_pool2d(x, 8)
        return self.head(torch.flatten(self.bn(self.conv(x)), 1))


class ValueBranch(nn.Module):
    def forward(self, x):
        return x.relu() if x.sum() > 0 else x * 2


class OpaqueInside(nn.Module):
    """A submodule branches on a value: it is kept whole, the rest traced (the BN outside any Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.branch = ValueBranch()
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.head(torch.flatten(self.inner(self.branch(self.bn(self.conv(x)))), 1))


class RootValueBranch(nn.Module):
    """The model's own forward branches on a value: nothing traces."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = self.body(x)
        return self.head(torch.flatten(y if y.mean() > 0 else -y, 1))


X = torch.randn(1, 1, 8, 8)


def test_fallback_order():
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    assert trace_model(plain).method == "symbolic" and trace_model(plain).error is None
    shape = trace_model(ShapeBranch(), X)
    assert shape.method == "meta" and "control flow" in shape.error
    assert trace_model(ShapeBranch()).method == "none"  # no example inputs: no meta trace
    model = OpaqueInside().eval()
    opaque = trace_model(model, X)
    assert (opaque.method, opaque.opaque) == ("opaque", ("branch",))
    assert torch.equal(opaque.graph_module(X), model(X))
    none = trace_model(RootValueBranch(), X)
    assert (none.method, none.graph_module) == ("none", None) and none.error


def test_leaf_rule_keeps_modules_whole():
    model = OpaqueInside()
    gm = trace_model(model, X, leaf=lambda m, name: name == "inner").graph_module
    assert "inner" in {n.target for n in gm.graph.nodes if n.op == "call_module"}


def test_trace_does_not_change_the_model():
    model = ShapeBranch().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_model(model, X)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())


class SharedInside(nn.Module):
    """One conv reachable by two paths (CoaT's shared position encodings), one weight tied between two
    layers, and a tensor constant the trace stores on the root."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Conv2d(1, 1, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(self.pos, nn.ReLU())])
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.b.weight = self.a.weight

    def forward(self, x):
        x = self.blocks[0](x) + self.pos(x) + torch.tensor(1.0)
        return self.b(self.a(x.flatten(1)))


def test_the_pruning_graph_module_runs_and_on_meta_restores_shared_and_tied_tensors():
    from slimkit.prune.graph.trace import trace
    from slimkit.tracing import on_meta

    model = SharedInside().eval()
    gm = trace(model, X)  # the lazy GraphModule over the root's own children
    assert torch.equal(gm(X), model(X))
    with on_meta(gm):
        assert all(p.device.type == "meta" for p in gm.parameters())
    with on_meta(model):
        assert model.b.weight.device.type == "meta" and model.blocks[0][0].weight.device.type == "meta"
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *gm.parameters()])
    assert model.b.weight is model.a.weight


def _pruning_traces(model) -> bool:
    from slimkit.prune.graph.trace import trace

    try:
        gm = trace(model, X)
    except UnsupportedModelError as err:
        assert "cannot be traced by torch.fx" in str(err)
        return False
    assert set(gm.meta["opaque"]) == ({"branch"} if isinstance(model, OpaqueInside) else set())
    return True


def _x86_traces(model) -> bool:
    from slimkit.deploy.engines import torch_x86_int8

    try:
        quantized = torch_x86_int8(model.eval(), [X], X)
    except UnsupportedModelError:
        return False
    assert quantized(X).shape == (1, 3)
    return True


@pytest.mark.parametrize("cls, graph", [(ShapeBranch, True), (OpaqueInside, True), (RootValueBranch, False)])
def test_every_graph_path_agrees_on_what_traces(cls, graph):
    """Memory, folding, x86 int8 and the channel graph all see a graph iff trace_model finds one; the channel
    graph keeps a submodule fx cannot trace as an opaque leaf (tests/test_prune_opaque.py)."""
    model = cls().eval()
    assert (trace_model(model, X).graph_module is not None) is graph
    assert (peak_activation_bytes(model, X).method == "graph") is graph
    assert _x86_traces(model) is graph
    assert _pruning_traces(model) is graph
    pairs = conv_bn_pairs(model, X)
    assert ("conv", "bn") in pairs or ("body.0", "body.1") in pairs  # graph, or Sequential adjacency
    if cls is OpaqueInside:
        assert pairs == [("conv", "bn"), ("inner.0", "inner.1")]  # the graph outside, adjacency inside


def test_fold_on_the_meta_graph_preserves_outputs():
    model = ShapeBranch().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    before = model(X)
    assert fold_bn_(model, X) == ["conv"] and isinstance(model.bn, nn.Identity)
    assert torch.allclose(model(X), before, atol=1e-5)


def test_lenet5_traces_for_every_path():
    model = create_model("lenet5", in_channels=1).eval()
    x = torch.zeros(1, 1, 28, 28)
    assert trace_model(model, x).method == "meta"  # FitSize branches on the input size
    assert peak_activation_bytes(model, x).method == "graph"
    from slimkit.deploy.engines import torch_x86_int8

    assert torch_x86_int8(model, [x], x)(x).shape == (1, 10)


def test_one_tracer_in_the_source():
    """No module but slimkit.tracing builds an fx tracer of its own (a second fallback order would let a model
    trace for one figure and not another)."""
    root = Path(slimkit.__file__).parent
    patterns = ("symbolic_trace(", "fx.Tracer)", "MetaTracer", "prepare_custom_config=PrepareCustomConfig()"
                ".set_non_traceable_module_classes")
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if any(pat in p.read_text() for pat in patterns))
    # kernels/fused.py (new, not yet on trace_model: its leaf rule is "every module but containers", which
    # trace_model's ``leaf=`` expresses) is the one known exception
    assert found == ["kernels/fused.py", "tracing.py"] or found == ["tracing.py"], found


def test_tensor_method_test_agrees_with_torch_on_every_overridable_function():
    import torch.overrides

    from slimkit.tracing import is_tensor_method

    funcs = [f for fs in torch.overrides.get_overridable_functions().values() for f in fs]
    assert len(funcs) > 500
    disagree = [f for f in funcs if is_tensor_method(f) != torch.overrides.is_tensor_method_or_property(f)]
    assert disagree == []
    assert is_tensor_method(torch.Tensor.view) and not is_tensor_method(torch.cat)
