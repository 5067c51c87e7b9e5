"""Structured pruning of models with a submodule torch.fx cannot trace: that submodule is an opaque leaf.

The channel graph keeps the leaf whole (its parameters, and the channels entering and leaving
it, with a warning naming it) and prunes the rest; removing channels that are exactly zero
leaves the outputs unchanged, and no cut ever reaches inside the leaf.
"""

import warnings

import pytest
import torch
from torch import nn

from slimkit.measure import count_macs
from slimkit.prune import structured_
from slimkit.prune.graph import build_graph
from test_prune_graph import _randomize_bn, half_of_each, outputs_zeroed_then_pruned


class Gate(nn.Module):
    """Data-dependent control flow (a branch on a tensor's value): fx cannot trace it, nor can the meta tracer."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.relu() if x.mean() > 0 else y * 0.5


class WithGate(nn.Module):
    """stem -> conv -> [Gate] + skip -> conv -> conv -> head; only the Gate's edges must be kept."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pre = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.gate = Gate(12)
        self.post = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pre(self.stem(x))
        x = self.gate(x) + x
        return self.head(self.post(x).mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def _graph(model, x):
    with pytest.warns(UserWarning, match=r"module gate \(Gate\) cannot be traced by torch\.fx .*kept whole"):
        return build_graph(model, x[:1], cache=False)


def test_opaque_leaf_keeps_its_edges_and_prunes_the_rest():
    g = _graph(WithGate().eval(), X)
    names = {grp.name for grp in g.groups}
    assert names == {"stem.0", "post.0", "post.3"}  # pre.0 feeds the gate; the head's input is the output's
    assert "gate" in g.fixed_reasons.get("pre.0", "")
    assert not any(layer.startswith("gate") for layer, _ in g.axes)


def test_opaque_zero_channels_preserve_outputs():
    """The units of every group, half of each, set to zero: removing them changes no output (1e-5)."""
    torch.manual_seed(0)
    model = WithGate().eval()
    g = _graph(model, X)
    uids = [u for grp in g.groups for u in half_of_each(grp)]
    _randomize_bn(model)
    gate_state = {k: v.clone() for k, v in model.gate.state_dict().items()}
    before, after = outputs_zeroed_then_pruned(model, g, uids, X)
    assert before.abs().max() > 0
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert model.post[0].out_channels == 8 and model.stem[0].out_channels == 4
    assert all(torch.equal(gate_state[k], v) for k, v in model.gate.state_dict().items())  # never cut inside


def test_opaque_leaf_shared_with_the_traced_part_is_not_cut():
    """A layer inside the opaque leaf, also called outside it, keeps its channels (a cut would break the leaf)."""

    class Shared(WithGate):
        def forward(self, x):
            x = self.pre(self.stem(x))
            x = self.gate(x) + self.gate.bn(self.gate.conv(x))
            return self.head(self.post(x).mean((2, 3)))

    g = _graph(Shared().eval(), X)
    assert {grp.name for grp in g.groups} == {"stem.0", "post.0", "post.3"}


def test_optional_forward_arguments_are_traced_at_their_defaults():
    """``forward(x, mask=None)`` traces the branch a one-input call takes (timm's Hiera), not a proxy mask."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x, mask=None):
            x = self.a(x)
            if mask is not None:
                x = x * mask.view(1, -1, 1, 1)
            return self.b(x)

    g = build_graph(Masked(), X[:1], cache=False)
    assert [grp.name for grp in g.groups] == ["a"] and not g.traced.meta["opaque"]


timm = pytest.importorskip("timm")


def test_timm_model_with_untraceable_attention_prunes():
    """EfficientViT (MIT): LiteMLA attention branches on its input's device type: it stays whole, the rest prunes."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("efficientvit_b0", num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    opaque = {n: {k: v.shape for k, v in m.state_dict().items()} for n, m in model.named_modules()
              if n.endswith("context_module.main")}
    assert len(opaque) == 4
    macs = count_macs(model, x)
    with pytest.warns(UserWarning, match="context_module.main .*cannot be traced by torch.fx"):
        report = structured_(model, x, {"ratio": 0.5})
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 10)
    assert report.macs_after == count_macs(model, x) <= 0.8 * macs
    modules = dict(model.named_modules())
    assert all({k: v.shape for k, v in modules[n].state_dict().items()} == shapes for n, shapes in opaque.items())


def test_timm_opaque_zero_channels_preserve_outputs():
    """EfficientViT with its attention kept whole: removing exactly-zero channels elsewhere changes nothing."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model("efficientvit_b0", num_classes=10).eval()
        x = torch.randn(2, 3, 64, 64)
        g = build_graph(model, x[:1], cache=False)
    assert any("context_module.main" in w for w in g.warnings)
    uids = [u for grp in g.groups for u in half_of_each(grp)]
    _randomize_bn(model)
    before, after = outputs_zeroed_then_pruned(model, g, uids, x)
    assert before.abs().max() > 0 and len(uids) > 100
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
