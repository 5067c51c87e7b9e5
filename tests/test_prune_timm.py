"""Structured pruning on timm models: zero-channel equivalence across the op rules, coverage per rule.

timm builds its layers in their functional spelling (``BatchNormAct2d`` calls ``F.batch_norm``,
``Conv2dSame`` calls ``F.conv2d`` on its own weight, weight-standardized convs standardize
their weight first), so these models exercise the get_attr side of every rule. Models are
the small variants at 32 px (random init); the slow ones are marked.
"""

import copy
import warnings

import pytest
import torch

from slimkit.measure import count_macs
from slimkit.prune import structured_
from slimkit.prune.graph import build_graph
from test_prune_graph import _randomize_bn, half_of_each, outputs_zeroed_then_pruned

timm = pytest.importorskip("timm")


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, num_classes=10).eval()


#: model -> the rule it exercises
EQUIV = {
    "efficientnet_b0": "functional BatchNorm (BatchNormAct2d), SE, depthwise",
    "mobilenetv3_small_050": "hard-swish, SE with a divisor, depthwise",
    "mobilenetv2_035": "inverted residuals",
    "mnasnet_small": "inverted residuals",
    "lcnet_035": "depthwise + SE",
    "tinynet_e": "EfficientNet blocks at tiny width",
    "ghostnet_050": "GhostNet's cat-and-slice (a whole-range slice passes)",
    "resnet10t": "timm ResNet (deep stem)",
    "regnetx_002": "grouped convs",
    "regnety_002": "grouped convs + SE",
    "convnext_atto": "LayerNorm2d over channels with norm_channels keep",
    "dla46x_c": "DLA's cat roots",
    "ese_vovnet19b_slim_dw": "VoVNet's one-shot cat + eSE",
    "hardcorenas_a": "HardCoReNAS blocks",
    "rexnet_100": "ReXNet's partial residual (slice + cat)",
    "repvgg_a0": "RepVGG's parallel branches",
    "gernet_s": "ByobNet blocks",
    "resnest14d": "split attention (radix reshape kept)",
    "selecsls42b": "SelecSLS cat of features",
    "dpn48b": "dual path: slices and cat of dense paths",
    "hrnet_w18_small": "HRNet fuse layers (upsample + add)",
    "mixnet_s": "mixed kernels (split with sizes kept)",
    "resnetv2_18": "pre-activation ResNet",
    "cspresnet50": "CSP cross-stage split",
    "ecaresnet26t": "ECA: a Conv1d across the channel axis",
    "seresnext26t_32x4d": "grouped convs + SE",
    "xception41": "aligned Xception (separable convs)",
    "skresnet18": "selective kernel attention",
    "mobilevit_xxs": "hybrid: MobileViT conv stages",
    "fastvit_t8": "hybrid: FastViT reparameterizable blocks",
    "densenet121": "DenseNet's growing cat",
    "mobileone_s0": "MobileOne's over-parameterized branches",
    "edgenext_xx_small": "attention heads sized from x.shape (run-time sizes), channels-last transposes",
    "csatv2": "a linear over a dim without channels (DCT), a constant index list, constant reshapes",
    "sequencer2d_s": "LSTM input features",
}
SIZE = {"csatv2": 64}
SLOW = {"densenet121", "mobileone_s0", "dpn48b", "xception41", "cspresnet50", "hrnet_w18_small", "mobilevit_xxs",
        "csatv2", "sequencer2d_s", "fastvit_t8", "rexnet_100", "efficientnet_b0", "regnety_002", "seresnext26t_32x4d"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in EQUIV])
def test_timm_pruning_zero_channels_preserves_outputs(name):
    model = make(name)
    x = torch.randn(2, 3, SIZE.get(name, 32), SIZE.get(name, 32))
    for m in model.modules():  # a zero-initialized classifier (Sequencer) would make the comparison vacuous
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = build_graph(model, x[:1], norm_channels="keep")
    uids = [u for grp in g.groups for u in half_of_each(grp)]
    assert uids, "nothing prunable"
    _randomize_bn(model)
    params = sum(p.numel() for p in model.parameters())
    before, after = outputs_zeroed_then_pruned(model, g, uids, x)
    assert before.abs().max() > 0
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < params


COVERAGE = ["efficientnet_b0", "ghostnet_050", "cspresnet50", "convnext_atto", "mixnet_s", "ecaresnet26t",
            "nf_regnet_b0", "vit_tiny_patch16_224", "mobilevit_xxs", "efficientformerv2_s0", "skresnet18",
            "edgenext_xx_small"]
COVERAGE_SLOW = {"cspresnet50", "nf_regnet_b0", "vit_tiny_patch16_224", "mobilevit_xxs", "efficientformerv2_s0",
                 "efficientnet_b0"}
OWN_SIZE = {"vit_tiny_patch16_224": 224, "efficientformerv2_s0": 224}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in COVERAGE_SLOW else n
                                  for n in COVERAGE])
def test_timm_structured_prunes_half(name):
    """structured_ at 50%: a working forward, the same output shape, at most 0.8 of the dense MACs."""
    model = make(name)
    size = OWN_SIZE.get(name, 64)
    x = torch.randn(1, 3, size, size)
    macs = count_macs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = structured_(model, x, {"ratio": 0.5})
    with torch.no_grad():
        y = model(torch.randn(2, 3, size, size))
    assert y.shape == (2, 10)
    assert report.macs_after == count_macs(model, x) <= 0.8 * macs


def test_layer_norm_channels_prune_or_keep():
    """ConvNeXt's residual stream: kept whole under ``norm_channels: keep``, pruned (far fewer MACs) under prune."""
    left = {}
    for mode in ("keep", "prune"):
        model = make("convnext_atto")
        x = torch.randn(1, 3, 64, 64)
        macs = count_macs(model, x)
        report = structured_(model, x, {"ratio": 0.5, "norm_channels": mode})
        left[mode] = report.macs_after / macs
        assert model(x).shape == (1, 10)
        stem_out = model.stem[0].out_channels
        assert stem_out == (40 if mode == "keep" else 20)
    assert left["prune"] < 0.35 < left["keep"]


def test_deep_copy_after_pruning_runs_like_the_original():
    model = make("ghostnet_050")
    x = torch.randn(1, 3, 64, 64)
    structured_(model, x, {"ratio": 0.5})
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["twins_svt_small", "nest_tiny"])
def test_meta_traced_constants_read_from_another_tensor_fall_back_to_fixed(name):
    """Twins / NesT trace on meta tensors only (shape control flow), and their attention reshapes the qkv
    output with ``C // heads`` of the *input*: read as run-time sizes, the constants let the input's channels
    go and the forward breaks (apply refuses); structured_ then reads them as fixed and prunes."""
    from slimkit.exceptions import UnsupportedModelError
    from slimkit.prune.structured import apply_structured_, plan_structured, structured_

    model = timm.create_model(name, pretrained=False, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(UnsupportedModelError, match="would break its forward"):
        apply_structured_(model, x, plan_structured(model, x, {"ratio": 0.5}))
    with torch.no_grad():
        ref = model(x)
    report = structured_(model, x, {"ratio": 0.5})
    with torch.no_grad():
        assert model(x).shape == ref.shape
    assert report.macs_after <= 0.8 * report.macs_before
