"""Op rules of the channel graph, one tiny hand-built module per rule.

Every test builds the graph, checks what the rule decided (channels pruned, united or kept,
and why), then prunes half of every group and runs the forward: a rule that allows a cut the
forward cannot take fails here. Where the rule promises it, outputs with the removed
channels zeroed equal the pruned model's.
"""

import warnings

import torch
from torch import nn

from slimkit.prune.graph import build_graph
from slimkit.prune.surgery import prune_units_
from test_prune_graph import half_of_each, zero_units


def prune_half(model, x, expect_groups=True):
    """Prune half of every group; returns (graph, output before with the removed channels zeroed, output after)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = build_graph(model, x, cache=False)
    uids = [u for grp in g.groups for u in half_of_each(grp)]
    assert bool(uids) == expect_groups, [grp.name for grp in g.groups]
    zero_units(model, g, uids)
    with torch.no_grad():
        before = model(x)
    prune_units_(model, g, uids)
    with torch.no_grad():
        after = model(x)
    return g, before, after


# -- sizes read at run time --------------------------------------------------------------

class HeadsFromInput(nn.Module):
    """CaiT's attention: ``C`` read from the input is divided into heads and reshapes the attention output."""

    def __init__(self):
        super().__init__()
        self.inp, self.qkv, self.proj, self.head = nn.Linear(4, 8), nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = self.inp(x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(B, N, C)
        return self.head(self.proj(y) + x)


def test_size_divided_into_heads_keeps_the_channels_it_counts():
    g, before, after = prune_half(HeadsFromInput(), torch.randn(1, 5, 4), expect_groups=False)
    assert "uses the size of pruned channels" in g.fixed_reasons["inp"]
    assert after.shape == (1, 5, 2)


class SameTensorView(nn.Module):
    """``x.view(B, C, H * W)`` with ``C`` read from ``x`` itself: the channels stay prunable."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv(x)
        B, C, H, W = x.shape
        return self.head(x.view(B, C, H * W).mean(2) * x.size(1))


def test_size_of_the_reshaped_tensor_itself_is_followed():
    model = SameTensorView()
    g = build_graph(model, torch.randn(1, 3, 8, 8), cache=False)
    assert [grp.name for grp in g.groups] == []  # ``* x.size(1)`` scales by the channel count: kept
    assert "uses the size of pruned channels" in g.fixed_reasons["conv"]

    class NoScale(SameTensorView):
        def forward(self, x):
            x = self.conv(x)
            B, C, H, W = x.shape
            return self.head(x.view(B, C, H * W).mean(2))

    g, before, after = prune_half(NoScale(), torch.randn(1, 3, 8, 8))
    assert [grp.name for grp in g.groups] == ["conv"]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


class TiedBySize(nn.Module):
    """``z.reshape(B, N, C)`` with ``C`` read from another tensor ``y``: their channel counts are tied."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(16, 2)

    def forward(self, x):
        y, z = self.a(x), self.b(x)
        B, N, C = y.shape
        return self.head(torch.cat([y, z.transpose(1, 2).reshape(B, C, N).transpose(1, 2).reshape(B, N, C)], -1))


def test_exact_size_in_a_reshape_unites_the_two_channel_sets():
    g, before, after = prune_half(TiedBySize(), torch.randn(1, 5, 4))
    assert [grp.producers for grp in g.groups] == [("a", "b")]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert after.shape == (1, 5, 2)


class ConstantExpand(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gate, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Linear(8, 2)

    def forward(self, x):
        g = self.gate(x).mean((2, 3), keepdim=True).expand(1, 8, 4, 4)
        return self.head((self.conv(x) * g).mean((2, 3)))


def test_constant_size_of_a_channel_dim_keeps_it():
    g = build_graph(ConstantExpand(), torch.randn(1, 3, 4, 4), cache=False)
    assert "a constant (8)" in g.fixed_reasons["gate"] and "a constant (8)" in g.fixed_reasons["conv"]
