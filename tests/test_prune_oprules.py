"""Op rules of the channel graph, one tiny hand-built module per rule.

Every test builds the graph, checks what the rule decided (channels pruned, united or kept,
and why), then prunes half of every group and runs the forward: a rule that allows a cut the
forward cannot take fails here. Where the rule promises it, outputs with the removed
channels zeroed equal the pruned model's.
"""

import warnings

import pytest
import torch
from torch import nn

from slimkit.prune.graph import build_graph
from test_prune_graph import half_of_each, outputs_zeroed_then_pruned


def prune_half(model, x, expect_groups=True):
    """Prune half of every group; returns (graph, output before with the removed channels zeroed, output after)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = build_graph(model, x, cache=False)
    uids = [u for grp in g.groups for u in half_of_each(grp)]
    assert bool(uids) == expect_groups, [grp.name for grp in g.groups]
    before, after = outputs_zeroed_then_pruned(model, g, uids, x)
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


# -- conv / linear over a dim without channels -------------------------------------------

class TokenMixing(nn.Module):
    """gMLP's spatial gating (a Linear over tokens) and CoaT's aggregate (a 1x1 Conv1d over tokens)."""

    def __init__(self, tokens=5):
        super().__init__()
        self.fc, self.mix = nn.Linear(4, 8), nn.Linear(tokens, tokens, bias=False)
        self.agg, self.head = nn.Conv1d(tokens, 1, 1, bias=False), nn.Linear(8, 2)

    def forward(self, x):  # [B, N, 4]
        h = self.fc(x)
        h = h * self.mix(h.transpose(1, 2)).transpose(1, 2)
        return self.head(self.agg(h).squeeze(1))


def test_linear_and_conv_over_tokens_pass_the_channels_through():
    g, before, after = prune_half(TokenMixing(), torch.randn(2, 5, 4))
    assert [grp.name for grp in g.groups] == ["fc"]
    assert g.axes[("mix", "in")].shape == (5,) and ("mix", "out") not in g.axes
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


class LinearOverChannelsAndTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.l, self.fc = nn.Conv1d(3, 4, 1), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):  # [B, 3, 6]: channels of c on dim 1 times channels of l on dim 2, fc reads dim 2
        return self.fc(self.c(x).mean(2, keepdim=True) * self.l(x.mean(1)).unsqueeze(1))


def test_linear_whose_features_mix_channels_and_tokens_keeps_them_with_a_warning():
    with pytest.warns(UserWarning, match="channels in dims"):
        g = build_graph(LinearOverChannelsAndTokens(), torch.randn(1, 3, 6), cache=False)
    assert not g.groups and any("fx node 'fc'" in w and "kept" in w for w in g.warnings)


# -- unfold / fold ------------------------------------------------------------------------

class UnfoldFold(nn.Module):
    """VOLO/TNT: im2col as ``nn.Unfold``, a per-position map, col2im as ``nn.Fold``; HaloNet's ``Tensor.unfold``."""

    def __init__(self):
        super().__init__()
        self.conv, self.unfold, self.fold = nn.Conv2d(3, 8, 1), nn.Unfold(3, padding=1), nn.Fold(6, 3, padding=1)
        self.conv2, self.head = nn.Conv1d(72, 72, 1), nn.Linear(8, 2)

    def forward(self, x):  # [B, 3, 6, 6]
        cols = self.unfold(self.conv(x))  # [B, 72, 36]: channel c at 9c .. 9c+8
        y = self.fold(torch.relu(self.conv2(cols)))  # [B, 8, 6, 6]
        windows = y.unfold(2, 2, 2).unfold(3, 2, 2)  # [B, 8, 3, 3, 2, 2]
        return self.head(windows.mean((2, 3, 4, 5)))


def test_unfold_repeats_channels_and_fold_prunes_them_in_blocks():
    model = UnfoldFold()
    g, before, after = prune_half(model, torch.randn(2, 3, 6, 6))
    assert sorted(grp.name for grp in g.groups) == ["conv", "conv2"]
    conv2 = next(grp for grp in g.groups if grp.name == "conv2")
    assert len(conv2.units) == 8 and all(len(g.units[u].members[("conv2", "out")]) == 9 for u in conv2.units)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert model.conv.out_channels == 4 and model.conv2.weight.shape == (36, 36, 1)


def test_tensor_unfold_along_the_channel_dim_keeps_them():
    class Windows(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.conv(x).unfold(1, 2, 2).sum()

    with pytest.warns(UserWarning, match="unfold along a channel dim"):
        g = build_graph(Windows(), torch.randn(1, 3, 4, 4), cache=False)
    assert "unfold along a channel dim" in g.fixed_reasons["conv"]


# -- recurrent layers ---------------------------------------------------------------------

@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_rnn_input_features_are_pruned(cls):
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.rnn, self.head = nn.Linear(4, 8), cls(8, 6, batch_first=True, bidirectional=True), \
                nn.Linear(12, 2)

        def forward(self, x):
            out, _ = self.rnn(self.fc(x))
            return self.head(out)

    model = Seq()
    g, before, after = prune_half(model, torch.randn(2, 5, 4))
    assert [grp.name for grp in g.groups] == ["fc"]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert model.rnn.input_size == 4 and model.rnn.weight_ih_l0_reverse.shape[1] == 4


# -- indexing with tensors and lists -----------------------------------------------------

class RelPosBias(nn.Module):
    """Swin-V2 / relpos ViTs: an MLP's per-head table gathered by a tensor of indices along the tokens."""

    def __init__(self):
        super().__init__()
        self.mlp, self.out = nn.Linear(2, 8), nn.Linear(8, 3)
        self.register_buffer("index", torch.tensor([0, 2, 1, 3, 3, 0]))
        self.head = nn.Linear(3, 2)

    def forward(self, coords):  # [4, 2]
        table = self.out(torch.relu(self.mlp(coords)))  # [4, heads]
        bias = table[self.index]  # [6, heads]
        return self.head(bias[:, [0, 2, 1]])


def test_index_tensor_along_another_dim_passes_channels_a_constant_list_on_channels_keeps_them():
    g, before, after = prune_half(RelPosBias(), torch.randn(4, 2))
    assert [grp.name for grp in g.groups] == ["mlp"]
    assert "gathered by a constant index list" in g.fixed_reasons["out"]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


# -- a channel dim split into (constant, computed) ---------------------------------------

class SelectiveKernel(nn.Module):
    """SKNet: two paths stacked, attention ``view(B, paths, C // paths, H, W)``, softmax and sum over paths."""

    def __init__(self):
        super().__init__()
        self.paths = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=2, dilation=2)])
        self.reduce, self.select, self.head = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 16, 1), nn.Linear(8, 2)

    def forward(self, x):
        x = torch.stack([p(x) for p in self.paths], 1)  # [B, 2, 8, H, W]
        a = self.select(torch.relu(self.reduce(x.sum(1).mean((2, 3), keepdim=True))))
        B, C, H, W = a.shape
        a = a.view(B, 2, C // 2, H, W).softmax(1)
        return self.head((x * a).sum(1).mean((2, 3)))


def test_split_into_constant_blocks_prunes_every_block_alike():
    model = SelectiveKernel()
    g, before, after = prune_half(model, torch.randn(2, 3, 6, 6))
    assert sorted(grp.name for grp in g.groups) == ["paths.0,paths.1,select", "reduce"]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert model.select.out_channels == 8 and model.paths[0].out_channels == 4

    class Uneven(SelectiveKernel):  # the block count computed, the block size constant: kept
        def forward(self, x):
            x = torch.stack([p(x) for p in self.paths], 1)
            a = self.select(torch.relu(self.reduce(x.sum(1).mean((2, 3), keepdim=True))))
            B, C, H, W = a.shape
            a = a.view(B, C // 8, 8, H, W).softmax(1)
            return self.head((x * a).sum(1).mean((2, 3)))

    g = build_graph(Uneven(), torch.randn(1, 3, 6, 6), cache=False)
    assert [grp.name for grp in g.groups] == ["reduce"]


class Shuffle(nn.Module):
    """``view(B, 2, C // 2, H, W).transpose(1, 2).reshape(B, merged, H, W)``: the merge back interleaves the blocks."""

    def __init__(self, merged="-1"):
        super().__init__()
        self.conv, self.head, self.merged = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), merged

    def forward(self, x):
        y = self.conv(x)
        B, C, H, W = y.shape
        c = {"-1": -1, "C": C, "8": 8}[self.merged]
        return self.head(y.view(B, 2, C // 2, H, W).transpose(1, 2).reshape(B, c, H, W))


@pytest.mark.parametrize("merged", ["-1", "C"])
def test_channel_shuffle_is_a_permutation_of_pairs(merged):
    """Channel ``j`` of each half lands at ``2j, 2j + 1``: one unit, so the interleaving survives pruning."""
    torch.manual_seed(0)
    model = Shuffle(merged).eval()
    x = torch.randn(2, 3, 4, 4)
    g = build_graph(model, x[:1], cache=False)
    (grp,) = g.groups
    assert len(grp.units) == 4
    for j, uid in enumerate(grp.units):
        assert g.units[uid].members[("conv", "out")].tolist() == [j, j + 4]
        assert g.units[uid].members[("head", "in")].tolist() == [2 * j, 2 * j + 1]
    before, after = outputs_zeroed_then_pruned(model, g, grp.units[1:3], x)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert model.conv.out_channels == 4 and model.head.in_channels == 4


def test_channel_shuffle_merged_into_a_constant_count_keeps_its_channels():
    g = build_graph(Shuffle("8"), torch.randn(1, 3, 4, 4), cache=False)
    assert not g.groups and "splits channels" in g.fixed_reasons["conv"]


def test_shufflenet_v2_stream_prunes_in_coupled_units():
    """ShuffleNetV2: every stage's stream is one group of coupled units (position j of both halves at each
    chunk, pairs at each shuffle: the units double in size per block), pruned with outputs preserved."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    g = build_graph(model, x[:1], cache=False)
    streams = {grp.producers[0].split(".")[0]: len(grp.units) for grp in g.groups if len(grp.producers) > 2}
    assert streams == {"stage2": 3, "stage3": 1, "stage4": 12}  # 48, 96, 192 channels after 4, 8, 4 blocks
    assert set(g.fixed_reasons) == {"fc"}
    stream = [u for grp in g.groups if len(grp.producers) > 2 for u in grp.units[: len(grp.units) // 2]]
    with torch.no_grad():
        for m in model.modules():  # random BatchNorm statistics: zeroed filters must not hide behind a zero shift
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.bias.uniform_(-0.1, 0.1)
    before, after = outputs_zeroed_then_pruned(model, g, stream, x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert model.stage4[0].branch1[2].out_channels == 48  # 12 units of 8 channels, 6 pruned: 96 - 48 per branch


class ShapeSlice(nn.Module):
    """``H, W = x.shape[1:3]`` of a channels-last tensor: a slice of the shape without the channel dim."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):  # [B, H, W, 3]
        y = self.fc(x)
        H, W = y.shape[1:3]
        return self.head(y.reshape(y.shape[0], H * W, -1).mean(1))


class ShapeControlFlow(SameTensorView):
    """Control flow on a shape: fx's MetaTracer traces it, every size in the graph is a constant."""

    def forward(self, x):
        x = self.conv(x)
        if x.shape[-1] > 2:
            x = x * 2
        B, C, H, W = x.shape
        return self.head(x.view(B, C, H * W).mean(2))


@pytest.mark.parametrize("cls", [ShapeSlice, ShapeControlFlow])
def test_sizes_without_channels_and_baked_constants_leave_channels_prunable(cls):
    x = torch.randn(1, 4, 4, 3) if cls is ShapeSlice else torch.randn(1, 3, 8, 8)
    g, before, after = prune_half(cls(), x)
    assert [grp.name for grp in g.groups] == ["fc" if cls is ShapeSlice else "conv"]
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


class BakedHeads(nn.Module):
    """CrossViT: control flow on a shape (a MetaTracer graph), ``C // heads`` read from the input of ``q``."""

    def __init__(self):
        super().__init__()
        self.inp, self.q, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(16, 2)

    def forward(self, x):
        x = self.inp(x)
        if x.shape[1] > 1:
            x = x * 2
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, 2, C // 2).softmax(-1)
        return self.head(torch.cat([q.reshape(B, N, C), x], -1))


def test_baked_head_split_keeps_the_input_of_the_split_layer():
    g, before, after = prune_half(BakedHeads(), torch.randn(1, 5, 4), expect_groups=False)
    assert "sizes baked into the graph" in g.fixed_reasons["inp"]
