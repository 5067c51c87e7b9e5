"""Attention heads as whole prunable units (slimkit.prune.graph.heads).

A head unit is ``head_dim`` rows of each of q, k and v, ``head_dim`` input columns of the output
projection and one of ``num_heads``. Zeroing a head's q, k and v rows makes its output zero
(uniform attention over zero values), so the output must not change when it is then removed.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from slimkit.prune import structured_
from slimkit.prune.graph import build_graph
from test_prune_graph import half_of_each, outputs_zeroed_then_pruned

timm = pytest.importorskip("timm")


def head_groups(graph):
    return [g for g in graph.groups if any(role == "heads" for _, role in graph.units[g.units[0]].members)]


def heads_of(model):
    return [m.num_heads for m in model.modules() if isinstance(getattr(m, "num_heads", None), int)]


class SeparateQKV(nn.Module):
    """Multi-head attention written out: separate q/k/v projections, an explicit softmax(q k^T) v."""

    def __init__(self, dim=24, num_heads=4, head_dim=8, sized_from_input=False):
        super().__init__()
        self.num_heads, self.head_dim, self.sized_from_input = num_heads, head_dim, sized_from_input
        self.attn_dim = num_heads * head_dim
        self.q, self.k, self.v = (nn.Linear(dim, self.attn_dim) for _ in range(3))
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        d = C // self.num_heads if self.sized_from_input else self.head_dim  # the size read at run time
        q = self.q(x).reshape(B, N, self.num_heads, d).transpose(1, 2)
        k = self.k(x).reshape(B, N, self.num_heads, d).transpose(1, 2)
        v = self.v(x).reshape(B, N, self.num_heads, d).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim))


class Tokens(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(6, 24), attn, nn.Linear(24, 5)

    def forward(self, x):
        x = self.embed(x)
        return self.head(x + self.attn(x)).mean(1)


def _zero_then_prune(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = build_graph(model, x[:1], cache=False)
    hg = head_groups(g)
    uids = [u for grp in g.groups for u in half_of_each(grp)]
    before, after = outputs_zeroed_then_pruned(model, g, uids, x)
    return hg, before, after


@pytest.mark.parametrize("name,kw,size", [
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),  # fused qkv, F.scaled_dot_product_attention
    ("deit_tiny_patch16_224", {"img_size": 32}, 32),
    ("levit_128s", {}, 224),  # q/k/v split with sizes, per-head biases, attention downsampling
    ("efficientformer_l1", {}, 224),  # attention_biases[:, idxs]
    ("visformer_tiny", {"img_size": 64}, 64),  # conv attention: heads split from the channel dim of [B, C, H, W]
    ("tnt_s_patch16_224", {"img_size": 64}, 64),  # separate qk and v projections, inner and outer attention
    ("csatv2", {}, 64),
])
def test_timm_heads_zeroed_then_pruned_preserve_outputs(name, kw, size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kw).eval()
    heads_before = heads_of(model)
    hg, before, after = _zero_then_prune(model, torch.randn(2, 3, size, size))
    assert hg, "no attention heads found"
    assert before.abs().max() > 0 and after.shape == before.shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert sum(heads_of(model)) < sum(heads_before)


def test_written_out_attention_prunes_whole_heads():
    """Separate q/k/v projections: head ``h`` of each is one unit with the output projection's columns."""
    torch.manual_seed(0)
    model = Tokens(SeparateQKV()).eval()
    x = torch.randn(3, 7, 6)
    twin = copy.deepcopy(model)
    g = build_graph(model, x[:1], cache=False)
    (grp,) = head_groups(g)
    assert len(grp.units) == 4 and grp.producers == ("attn.k", "attn.q", "attn.v")
    unit = g.units[grp.units[1]]  # head 1
    for layer in ("attn.q", "attn.k", "attn.v"):
        assert unit.members[(layer, "out")].tolist() == list(range(8, 16))
    assert unit.members[("attn.proj", "in")].tolist() == list(range(8, 16))
    assert unit.members[("attn", "heads")].tolist() == [1]
    before, after = outputs_zeroed_then_pruned(model, g, [grp.units[1], grp.units[3]], x)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert (model.attn.num_heads, model.attn.attn_dim, model.attn.q.out_features, model.attn.proj.in_features) == (
        2, 16, 16, 16)
    with torch.no_grad():  # the heads removed were live: without zeroing, removing them changes the output
        assert not torch.allclose(twin(x), model(x), atol=1e-4)


def test_head_dim_read_from_the_input_keeps_the_heads():
    """``C // num_heads`` of the input would not follow pruned heads: those channels are kept."""
    model = Tokens(SeparateQKV(dim=24, num_heads=3, head_dim=8, sized_from_input=True)).eval()
    g = build_graph(model, torch.randn(1, 7, 6), cache=False)
    assert not head_groups(g)
    assert "attn.q" in g.fixed_reasons


class BiasedSDPA(SeparateQKV):
    """Fused attention with a bias per head passed as ``attn_mask`` (timm's relative-position ViTs)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, self.num_heads, 7, 7))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (f(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.proj(y.transpose(1, 2).reshape(B, N, self.attn_dim))


def test_a_bias_per_head_in_the_attention_mask_keeps_the_heads():
    model = Tokens(BiasedSDPA()).eval()
    g = build_graph(model, torch.randn(1, 7, 6), cache=False)
    assert not head_groups(g) and "attention mask per head" in g.fixed_reasons["attn.q"]


class UnknownAfterMerge(SeparateQKV):
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (f(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(torch.logcumsumexp(y.transpose(1, 2).reshape(B, N, self.attn_dim), dim=1))


def test_heads_reaching_an_op_without_a_rule_are_kept():
    """(As before heads were units: they were kept at the split and never reached that op.)"""
    g = build_graph(Tokens(UnknownAfterMerge()).eval(), torch.randn(1, 7, 6), cache=False)
    assert not head_groups(g) and "attention heads reach" in g.fixed_reasons["attn.q"]


class OneHead(nn.Module):
    """Hiera's first block: ``qkv(x).reshape(B, N, 3, 1, -1).unbind(2)`` with one head."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.qkv, self.proj = 1, nn.Linear(24, 3 * 24), nn.Linear(24, 24)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = torch.unbind(self.qkv(x).reshape(B, N, 3, self.num_heads, -1), 2)
        y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(y.transpose(1, 2).reshape(B, N, -1))


def test_one_head_keeps_its_features():
    """No head to remove; q/k features would change sdpa's default scale (1 / sqrt(head_dim)): kept."""
    g = build_graph(Tokens(OneHead()).eval(), torch.randn(1, 7, 6), cache=False)
    assert not head_groups(g) and "attn.qkv" in g.fixed_reasons
    assert not any("attn.qkv" in grp.producers for grp in g.groups)


def test_structured_counts_heads_as_units_and_updates_num_heads():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    g = build_graph(model, x, cache=False)
    assert sum(len(grp.units) for grp in head_groups(g)) == 12 * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = structured_(model, x, {"ratio": 0.5, "norm_channels": "keep"})
    assert report.units_before == sum(len(grp.units) for grp in g.groups)
    assert heads_of(model) == [2] * 12  # floor(0.5 * 3) = 1 head of 3 per block
    attn = model.blocks[0].attn
    assert (attn.attn_dim, attn.qkv.out_features, attn.proj.in_features) == (128, 384, 128)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
