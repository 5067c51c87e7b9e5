"""The forward check without a forward: channel counts along a fixed-layout graph after a cut."""

import pytest
import torch
import torchvision
from torch import nn

from slimkit.prune import structured_
from slimkit.prune.graph import build_graph, clear_graph_cache
from slimkit.prune.graph.check import channel_mismatch
from slimkit.prune.graph.macs import fixed_layout

MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "vgg11_bn", "densenet121"]


def _cut(name: str):
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    clear_graph_cache()  # a graph from the cache has no traced GraphModule of its own
    gm = build_graph(model, x).traced
    assert fixed_layout(gm, dict(model.named_modules()))
    structured_(model, x, {"ratio": 0.5})
    return model, gm, x


@pytest.mark.parametrize("name", MODELS)
def test_a_correct_cut_fits_and_a_layer_off_by_one_channel_is_named(name):
    model, gm, x = _cut(name)
    modules = dict(model.named_modules())
    assert channel_mismatch(gm, modules) is None
    model(x)  # and it does run
    conv_name, conv = next((k, m) for k, m in modules.items()
                           if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 3)
    conv.in_channels -= 1
    assert channel_mismatch(gm, modules).startswith(f"{conv_name} expects {conv.in_channels} input channels")
    conv.in_channels += 1


def test_batchnorm_and_linear_counts_are_checked():
    model, gm, _ = _cut("resnet18")
    modules = dict(model.named_modules())
    model.bn1.num_features += 1
    assert channel_mismatch(gm, modules).startswith("bn1 normalizes")
    model.bn1.num_features -= 1
    model.fc.in_features += 2
    assert channel_mismatch(gm, modules).startswith("fc expects")


def test_residual_adds_of_different_widths_are_named():
    model, gm, _ = _cut("resnet18")
    modules = dict(model.named_modules())
    block = model.layer1[0]
    block.conv2.out_channels += 1
    block.bn2.num_features += 1
    assert "add of tensors with" in channel_mismatch(gm, modules)


def test_a_cut_that_does_not_fit_is_refused_and_undone_on_the_no_run_path(monkeypatch):
    """structured_ counts the MACs of a fixed-layout graph without a forward: a surgery that leaves one conv's
    input wider than its producer must still be refused, and the model left as it was."""
    from slimkit.exceptions import UnsupportedModelError
    from slimkit.prune import structured as structured_module

    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = structured_module.prune_units_

    def forgets_one_layer(m, graph, units):
        changes = real(m, graph, units)
        conv = m.layer1[0].conv1  # re-widen its input: as if surgery had skipped it
        conv.weight = nn.Parameter(torch.zeros(conv.out_channels, conv.in_channels + 1, 3, 3))
        conv.in_channels += 1
        return changes

    monkeypatch.setattr(structured_module, "prune_units_", forgets_one_layer)
    with pytest.raises(UnsupportedModelError, match="would break its forward"):
        structured_(model, x, {"ratio": 0.5})
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}
    model(x)
