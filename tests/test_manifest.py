"""Saving models whose architecture changed: rebuild from the manifest, identical outputs."""

import pytest
import torch
from torch import nn

from slimkit.exceptions import ConfigError, CorruptFileError
from slimkit.manifest import load_model, save_model
from slimkit.models import create_model


def _shrink_first_conv(model: nn.Module) -> nn.Module:
    """Replace lenet5's conv1 by a narrower one and conv2 by a 2-layer chain (like pruning + decomposition)."""
    model.conv1 = nn.Conv2d(1, 12, 5)
    model.conv2 = nn.Sequential(nn.Conv2d(12, 8, 1, bias=False), nn.Conv2d(8, 50, 5))
    return model


@pytest.mark.parametrize("name,shape", [("lenet5", (2, 1, 28, 28)), ("resnet20-cifar", (2, 1, 28, 28))])
def test_round_trip_of_an_unchanged_zoo_model(tmp_path, name, shape):
    model = create_model(name, num_classes=10, in_channels=1).eval()
    x = torch.randn(shape)
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    torch.testing.assert_close(loaded(x), model(x))


def test_round_trip_of_a_changed_architecture_with_masks(tmp_path):
    model = _shrink_first_conv(create_model("lenet5", num_classes=10, in_channels=1)).eval()
    model.fc1.register_buffer("weight_mask", (torch.rand_like(model.fc1.weight) > 0.5).float())
    x = torch.randn(3, 1, 28, 28)
    save_model(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)  # no pickled code inside
    assert payload["arch"]["name"] == "lenet5"
    loaded = load_model(tmp_path / "m.pt")
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.conv1.out_channels == 12
    torch.testing.assert_close(loaded.fc1.weight_mask, model.fc1.weight_mask)


def test_model_outside_the_zoo_needs_a_skeleton(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model[0] = nn.Conv2d(3, 2, 3)
    model[3] = nn.Linear(2 * 6 * 6, 2)
    save_model(model, tmp_path / "m.pt")
    with pytest.raises(ConfigError, match="model=<an instance"):
        load_model(tmp_path / "m.pt")
    skeleton = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(load_model(tmp_path / "m.pt", model=skeleton)(x), model.eval()(x))


def test_damaged_files_fail_with_one_clear_line(tmp_path):
    model = create_model("lenet5", num_classes=10, in_channels=1)
    path = save_model(model, tmp_path / "m.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="cut.pt"):
        load_model(tmp_path / "cut.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CorruptFileError, match="not a slimkit model"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_load_model_opens_the_formats_other_packages_register(tmp_path):
    """``.slim`` is registered by slimkit.encode (the manifest imports no encode module); a .pt is no other format."""
    from slimkit.encode import save
    from slimkit.manifest import MODEL_FILE_FORMATS, ModelFileFormat, file_format, register_model_file_format

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    save(model, tmp_path / "m.slim")
    save_model(model, tmp_path / "m.pt")
    assert file_format(tmp_path / "m.slim").name == "slim" and file_format(tmp_path / "m.pt") is None
    x = torch.randn(2, 1, 6, 6)
    skeleton = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    assert torch.equal(load_model(tmp_path / "m.slim", model=skeleton)(x), model(x))

    def load_text(path, skeleton):  # a format of a test's own: one float per line is the Linear's weight
        layer = skeleton or nn.Linear(2, 1, bias=False)
        values = [float(v) for v in open(path).read().split()[1:]]
        layer.weight.data = torch.tensor([values])
        return layer.eval()

    if "numbers" not in MODEL_FILE_FORMATS:
        register_model_file_format(ModelFileFormat("numbers", b"NUMBERS\n", load_text))
    (tmp_path / "w.txt").write_text("NUMBERS\n0.5\n-2\n")
    assert load_model(tmp_path / "w.txt")(torch.tensor([[2.0, 1.0]])).item() == -1.0


@pytest.mark.parametrize("name,size", [("timm:efficientnet_b0", 32), ("timm:mobilenetv3_large_100", 32),
                                       ("timm:vit_tiny_patch16_224", 224)])
def test_pruned_timm_model_reloads_from_its_source_alone(tmp_path, name, size):
    """timm's norm-act layers and attention blocks have no constructor spec: the manifest's recorded
    attributes (num_features, num_heads) and tensor shapes rebuild them (cls_token on the root too)."""
    pytest.importorskip("timm")
    from slimkit.prune import structured_

    model = create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    structured_(model, x, {"ratio": 0.5})
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(loaded.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())


def test_a_state_dict_that_does_not_fit_the_recorded_shapes_is_refused(tmp_path):
    model = _shrink_first_conv(create_model("lenet5", num_classes=10, in_channels=1))
    save_model(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"]["fc1.weight"] = payload["state_dict"]["fc1.weight"][:7]
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CorruptFileError, match="do not fit"):
        load_model(tmp_path / "bad.pt")
