"""Network in Network, Xception and the small Inception network: sizes from the papers, structure, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.manifest import load_model, save_model
from slimkit.models import arch_of, create_model, list_models

LITERATURE = ("nin-cifar", "xception-cifar", "inception-cifar")  # the small-input variants


def test_registered():
    assert {"nin-cifar", "xception", "xception-cifar", "inception-cifar"} <= set(list_models())


@pytest.mark.parametrize("name", LITERATURE)
@pytest.mark.parametrize(("num_classes", "in_channels"), [(10, 1), (100, 3)])
def test_builds_and_forwards(name, num_classes, in_channels):
    model = create_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    assert arch_of(model)["name"] == name
    with torch.no_grad():
        for size in (8, 28, 32):
            out = model(torch.randn(2, in_channels, size, size))
            assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels


@pytest.mark.parametrize(("name", "num_classes", "params"), [
    ("nin-cifar", 10, 966_986),  # Lin 2014's CIFAR-10 NiN: 0.97M
    ("xception", 1000, 22_855_952),  # Chollet 2017 / Keras: 22.9M trainable
    ("inception-cifar", 10, 1_649_402 + 1_712),  # Zhang 2017 Table 1 + one BN scale per channel
])
def test_parameter_counts_are_the_papers(name, num_classes, params):
    model = create_model(name, num_classes=num_classes, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == params


def test_nin_is_mlpconv_with_global_average_pooling():
    model = create_model("nin-cifar", num_classes=10, in_channels=3)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # GAP replaces the classifier
    for block in (model.block1, model.block2, model.block3):
        kernels = [m.kernel_size for m in block if isinstance(m, nn.Conv2d)]
        assert kernels[1:] == [(1, 1), (1, 1)] and kernels[0][0] > 1  # k x k, then the 1x1 micro network
    assert model.block3[-2].out_channels == 10
    bn = create_model("nin-cifar", num_classes=10, in_channels=3, batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 9


def test_xception_is_separable_and_residual():
    model = create_model("xception", num_classes=1000, in_channels=3)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 2 * 3 + 3 * 8 + 2 + 2  # entry, middle, exit block, exit convs
    assert all(m.groups == m.in_channels == m.out_channels and m.kernel_size == (3, 3) for m in depthwise)
    assert len(model.middle) == 8 and all(block.shortcut is None for block in model.middle)
    small = create_model("xception-cifar", num_classes=10, in_channels=3)
    assert len(small.middle) == 4 and small.stem[0].stride == (1, 1) and small.fc.in_features == 512
    with pytest.raises(ConfigError, match="width_mult"):
        create_model("xception", width_mult=0)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 71, 71)).shape == (1, 1000)


def test_inception_modules_concatenate_their_branches():
    from slimkit.models.literature import DownsampleModule, InceptionModule

    x = torch.randn(2, 16, 9, 9)
    assert InceptionModule(16, 4, 6)(x).shape == (2, 10, 9, 9)
    assert DownsampleModule(16, 6)(x).shape == (2, 22, 5, 5)
    model = create_model("inception-cifar", num_classes=10, in_channels=3)
    assert model.fc.in_features == 336
    with pytest.raises(ConfigError, match="no keyword"):
        create_model("inception-cifar", width=2)


@pytest.mark.parametrize("name", LITERATURE)
def test_save_load_reproduces_outputs(tmp_path, name):
    model = create_model(name, num_classes=10, in_channels=1).eval()
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", LITERATURE)
def test_recipe_builds_measures_and_saves_the_model(tmp_path, name):
    """``model: NAME`` in a recipe, no training (an epoch of NiN costs minutes on a busy 2-core CPU)."""
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import parse_recipe

    recipe = parse_recipe({"name": f"{name}-zero-epochs", "model": name, "data": "digits", "image_size": 8,
                           "latency_runs": 1, "train": {"epochs": 0}, "stages": [{"train": {}}]})
    report = run_recipe(recipe, tmp_path / "run", progress=False, log=lambda _m: None)
    baseline = report["stages"][0]
    assert baseline["params"] == sum(p.numel() for p in create_model(name, 10, 1).parameters())
    assert 0.0 <= baseline["accuracy"] <= 100.0 and baseline["macs"] > 0
    saved = load_model(tmp_path / "run" / "models" / "00-baseline.pt")
    assert sum(p.numel() for p in saved.parameters()) == baseline["params"]
