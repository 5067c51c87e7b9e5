"""The model zoo: every registered model builds, adapts to channels/classes, and runs at 28x28 and 32x32."""

import pytest
import torch
from torch import nn

from slimkit.exceptions import ConfigError, UnknownNameError
from slimkit.models import MODELS, arch_of, create_model, list_models
from slimkit.models.classic import FitSize
from slimkit.models.torchvision_zoo import adapt_in_channels

ZOO = (
    "lenet-300-100", "lenet5", "vgg11-cifar", "vgg16-cifar", "resnet20-cifar", "resnet32-cifar",
    "resnet56-cifar", "mobilenet-v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "squeezenet1_0", "squeezenet1_1", "resnet18", "resnet50",
)


def test_registry_lists_the_whole_zoo():
    assert set(ZOO) <= set(list_models())  # other areas may register more (e.g. distillation students)
    assert list_models("resnet*-cifar") == ["resnet20-cifar", "resnet32-cifar", "resnet56-cifar"]


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(("num_classes", "in_channels"), [(10, 1), (100, 3)])
def test_builds_and_forwards(name, num_classes, in_channels):
    model = create_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    assert arch_of(model) == {"name": name, "num_classes": num_classes, "in_channels": in_channels}
    with torch.no_grad():
        for size in (28, 32):
            out = model(torch.randn(2, in_channels, size, size))
            assert out.shape == (2, num_classes)
            assert torch.isfinite(out).all()
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        assert first_conv.in_channels == in_channels


@pytest.mark.parametrize(("name", "params"), [("lenet-300-100", 266_610), ("lenet5", 431_080)])
def test_lenet_parameter_counts_are_the_caffe_ones(name, params):
    model = create_model(name, num_classes=10, in_channels=1)
    assert sum(p.numel() for p in model.parameters()) == params


def test_lenet_layer_names_read_well():
    weighted = (nn.Conv2d, nn.Linear)
    lenet5 = create_model("lenet5", in_channels=1)
    assert [n for n, m in lenet5.named_modules() if isinstance(m, weighted)] == ["conv1", "conv2", "fc1", "fc2"]
    mlp = create_model("lenet-300-100", in_channels=1)
    assert [n for n, m in mlp.named_modules() if isinstance(m, weighted)] == ["fc1", "fc2", "fc3"]


def test_fit_size_is_identity_at_native_size():
    x = torch.randn(2, 3, 4, 4)
    assert FitSize(4)(x) is x
    assert FitSize(4)(torch.randn(2, 3, 5, 5)).shape == (2, 3, 4, 4)


@pytest.mark.parametrize(("name", "params"), [
    ("resnet20-cifar", 272_474),  # option B; option A would be 269,722
    ("resnet32-cifar", 466_906),
    ("resnet56-cifar", 855_770),
])
def test_cifar_resnet_sizes(name, params):
    model = create_model(name, num_classes=10, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == params
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert {m.out_channels for m in convs} == {16, 32, 64}


def test_mobilenet_v1_matches_the_paper_and_scales_with_width():
    model = create_model("mobilenet-v1", num_classes=1000, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976  # Howard 2017 Table 1: 4.2M
    half = create_model("mobilenet-v1", num_classes=1000, in_channels=3, width_mult=0.5)
    assert sum(p.numel() for p in half.parameters()) < 0.4 * 4_231_976
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    with pytest.raises(ConfigError, match="width_mult"):
        create_model("mobilenet-v1", width_mult=0)


def test_torchvision_first_conv_keeps_its_geometry():
    model = create_model("resnet18", num_classes=10, in_channels=1)
    assert (model.conv1.in_channels, model.conv1.out_channels) == (1, 64)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert model.fc.out_features == 10
    same = create_model("squeezenet1_1", num_classes=10, in_channels=3)
    assert adapt_in_channels(same, 3) is same


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet20-cifar'"):
        create_model("resnet20_cifar")
    with pytest.raises(UnknownNameError, match="'mobilenet_v2'"):
        MODELS.get("mobilenetv2")


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"in_channels": -1}, {"num_classes": 2.5}])
def test_bad_sizes_are_config_errors(bad):
    with pytest.raises(ConfigError):
        create_model("lenet5", **bad)


def test_bad_cifar_depth():
    from slimkit.models.cifar import CifarResNet

    with pytest.raises(ConfigError, match="6n\\+2"):
        CifarResNet(21)
