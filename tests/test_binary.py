"""binarize_: BWN / XNOR layers, STE, first/last kept, kernel path equals simulation, sizes."""

import pytest
import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.manifest import load_model, save_model
from slimkit.measure.storage import stored_bytes
from slimkit.quantize.binary import BinaryConv2d, binarize_, sign_ste, use_kernel_


def _net(c=3):
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 70, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(70, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 32),
                         nn.ReLU(), nn.Linear(32, 5))


def _lenet():
    from slimkit.models import create_model

    return create_model("lenet5", num_classes=10, in_channels=1)


@pytest.mark.parametrize("build,shape", [(_net, (2, 3, 8, 8)), (_lenet, (2, 1, 28, 28))])
def test_bwn_weights_are_scaled_signs(build, shape):
    model = build().eval()
    report = binarize_(model, torch.zeros(1, *shape[1:]), {"mode": "bwn"})
    assert len(report.kept_full_precision) == 2 and set(report.skipped) == set(report.kept_full_precision)
    for name in report.changed:
        layer = model.get_submodule(name)
        w = layer.binary_weight().detach()
        alpha = layer.weight.abs().flatten(1).mean(1)
        assert torch.allclose(w.abs().flatten(1), alpha[:, None].expand_as(w.flatten(1)))
    assert model(torch.randn(*shape)).shape[0] == shape[0]


def test_first_and_last_kept_unless_asked():
    model = _net()
    report = binarize_(model, torch.zeros(1, 3, 8, 8), {"mode": "bwn", "keep_first_last": False})
    assert report.kept_full_precision == [] and len(report.layers) == 5 == len(report.changed)


def test_ste_gradient_is_clipped():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


def test_unsupported_layer_is_one_line_config_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 1))
    with pytest.raises(ConfigError, match="BatchNorm2d") as err:
        binarize_(model, torch.zeros(1, 3, 8, 8), {"layers": ["1"]})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="mode"):
        binarize_(model, torch.zeros(1, 3, 8, 8), {"mode": "ternary"})


def test_xnor_kernel_path_equals_simulation():
    torch.manual_seed(0)
    model = _net().eval()
    binarize_(model, torch.zeros(1, 3, 8, 8), {"mode": "xnor"})
    for layer in model.modules():
        if isinstance(layer, BinaryConv2d):
            layer.threshold.data.uniform_(-0.1, 0.3)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        sim = model(x)
        assert use_kernel_(model) == 2
        fast = model(x)
    assert torch.allclose(sim, fast, atol=1e-4)
    assert torch.equal(sim.argmax(1), fast.argmax(1))


def test_stored_bytes_lenet5_bwn_is_16x_smaller():
    model = _lenet()
    fp32 = sum(t.numel() * 4 for t in model.state_dict().values())
    report = binarize_(model, torch.zeros(1, 1, 28, 28), {"mode": "bwn"})
    stored = stored_bytes(model)
    assert report.after.bytes == stored and report.before.bytes == fp32
    binary = 25000 + 400000  # conv2 + fc1 weights, 1 bit each
    full = 500 + 5000 + 20 + 50 + 500 + 10  # conv1 and fc2 weights, all biases at fp32
    assert stored == binary // 8 + 4 * (50 + 500) + 4 * full
    assert fp32 / stored >= 16


def test_save_load_roundtrip(tmp_path):
    model = _net().eval()
    binarize_(model, torch.zeros(1, 3, 8, 8), {"mode": "xnor"})
    x = torch.randn(2, 3, 8, 8)
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", model=_net())
    assert torch.equal(model(x), loaded(x))
