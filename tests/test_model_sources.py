"""Model sources (zoo, torchvision:, timm:, file.py:callable, package.module:callable), their
arguments, trained weights from a file, and saved models that rebuild from their recorded source."""

import sys
import textwrap

import pytest
import torch
from torch import nn

from slimkit.exceptions import ConfigError, UnknownNameError
from slimkit.manifest import atomic_save, load_model, read_payload, save_model
from slimkit.models import arch_of, create_model
from slimkit.models.sources import ModelSource, parse_source
from slimkit.models.weights import load_weights

MYNET = textwrap.dedent("""
    import torch
    from torch import nn


    class MyNet(nn.Module):
        def __init__(self, num_classes=10, in_channels=3, width=8):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            return self.head(x.mean((2, 3)))


    def small(num_classes, width=4):
        return MyNet(num_classes=num_classes, in_channels=1, width=width)


    from os import getcwd  # imported, not defined here: never a builder
""")


@pytest.fixture
def mynet(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(MYNET)
    return path


@pytest.mark.parametrize("text,expected", [
    ("lenet5", ModelSource("zoo", "lenet5")),
    ("ResNet20-CIFAR", ModelSource("zoo", "resnet20-cifar")),
    ("torchvision:mobilenet_v2", ModelSource("torchvision", "mobilenet_v2")),
    ("timm:test_resnet", ModelSource("timm", "test_resnet")),
    ("pkg.nets:Builder.make", ModelSource("module", "Builder.make", "pkg.nets")),
])
def test_spellings_parse(text, expected):
    assert parse_source(text) == expected


def test_a_file_source_is_recorded_with_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = parse_source("nets/mynet.py:MyNet")
    assert source.kind == "file" and source.location == str(tmp_path / "nets" / "mynet.py")
    assert source.spelling == f"{tmp_path}/nets/mynet.py:MyNet"


@pytest.mark.parametrize("text,message", [
    ("nets/mynet.txt:MyNet", "neither a .py file nor a dotted module path"),
    ("mynet.py:3net", "is not a Python name"),
    ("timm:", "needs a model name"),
    ("", "must be a non-empty string"),
])
def test_bad_spellings_are_one_line(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_source(text)
    assert "\n" not in str(info.value) and "torchvision:NAME" in str(info.value)


def test_a_class_in_a_file_gets_classes_channels_and_model_args(mynet):
    model = create_model(f"{mynet}:MyNet", num_classes=5, in_channels=2, width=6)
    assert model.conv.in_channels == 2 and model.conv.out_channels == 6 and model.head.out_features == 5
    assert arch_of(model) == {"name": f"{mynet}:MyNet", "num_classes": 5, "in_channels": 2, "args": {"width": 6}}
    assert model(torch.zeros(3, 2, 9, 9)).shape == (3, 5)


def test_a_function_gets_only_the_arguments_it_names(mynet):
    model = create_model(f"{mynet}:small", num_classes=4, in_channels=3)  # `small` takes no in_channels
    assert model.conv.in_channels == 1 and model.conv.out_channels == 4 and model.head.out_features == 4


def test_a_package_module_source(tmp_path, monkeypatch):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "nets.py").write_text(MYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("userpkg.nets:MyNet", num_classes=3, in_channels=1)
    assert type(model).__module__ == "userpkg.nets" and model.head.out_features == 3


@pytest.mark.parametrize("name,message", [
    ("MyNte", "has no 'MyNte'; did you mean 'MyNet'"),
    ("getcwd", "not an nn.Module class or a function defined in"),
    ("torch", "not an nn.Module class"),
])
def test_a_file_without_that_builder(mynet, name, message):
    with pytest.raises(ConfigError, match=message):
        create_model(f"{mynet}:{name}")


@pytest.mark.parametrize("source,kwargs,message", [
    ("os:system", {"command": "echo hi"}, "os is not a package of model builders"),
    ("subprocess:run", {}, "subprocess is not a package of model builders"),
    ("torch.hub:load", {}, "torch is not a package of model builders"),
    ("no_such_pkg_xyz.nets:Net", {}, "no module named 'no_such_pkg_xyz'"),
    ("torchvision:mobilenet_v2", {"weights": "DEFAULT"}, "slimkit downloads nothing"),
    ("timm:test_resnet", {"pretrained": True}, "slimkit downloads nothing"),
    ("torchvision:mobilenet_v3", {}, "did you mean 'mobilenet_v2' or 'mobilenet_v3_small'"),
])
def test_refused_sources(source, kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        create_model(source, **kwargs)
    assert "\n" not in str(info.value)


def test_unknown_model_args_name_what_the_builder_takes(mynet):
    with pytest.raises(ConfigError, match=r"MyNet takes no argument 'widht' \(it takes: in_channels, num_classes, "
                                          r"width\)"):
        create_model(f"{mynet}:MyNet", widht=3)


def test_a_file_that_fails_to_import_is_one_line(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("class Net(nn.Module:\n    pass\n")
    with pytest.raises(ConfigError, match=r"broken.py: importing it raised SyntaxError \(line 1\)"):
        create_model(f"{bad}:Net")


@pytest.mark.parametrize("source,in_channels", [("torchvision:mobilenet_v2", 1), ("timm:test_resnet", 2)])
def test_library_models_take_classes_and_channels_from_the_data(source, in_channels):
    model = create_model(source, num_classes=7, in_channels=in_channels)
    assert model.eval()(torch.zeros(1, in_channels, 32, 32)).shape == (1, 7)
    assert arch_of(model)["name"] == source


@pytest.mark.parametrize("source", ["lenet5", "FILE:MyNet", "FILE:small", "torchvision:mobilenet_v2",
                                    "timm:test_resnet"])
def test_saved_models_rebuild_from_their_recorded_source(tmp_path, mynet, source):
    source = source.replace("FILE", str(mynet))
    model = create_model(source, num_classes=3, in_channels=1, **({"width": 5} if "MyNet" in source else {}))
    model.eval()
    x = torch.randn(2, 1, 32, 32)
    path = save_model(model, tmp_path / "model.pt")
    again = load_model(path)  # no skeleton: the file says how to build it
    assert type(again).__qualname__ == type(model).__qualname__
    assert torch.equal(again(x), model(x))


def test_a_saved_file_naming_a_stdlib_function_runs_nothing(tmp_path, mynet):
    path = save_model(create_model(f"{mynet}:MyNet", num_classes=2, in_channels=1), tmp_path / "model.pt")
    payload = read_payload(path)
    flag = tmp_path / "ran"
    payload["arch"] = {"name": "os:system", "num_classes": 2, "in_channels": 1, "args": {"command": f"touch {flag}"}}
    atomic_save(payload, path)
    with pytest.raises(ConfigError, match="cannot rebuild its model from the recorded source 'os:system'"):
        load_model(path)
    assert not flag.exists()


def test_a_saved_file_whose_source_file_is_gone(tmp_path, mynet):
    path = save_model(create_model(f"{mynet}:MyNet", num_classes=2, in_channels=1), tmp_path / "model.pt")
    mynet.unlink()
    with pytest.raises(ConfigError, match=rf"cannot rebuild its model from the recorded source '{mynet}:MyNet'.*"
                                          r"no such file.*put it back there"):
        load_model(path)


# -- weights files ---------------------------------------------------------------------------------------------


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"epoch": 3, "model_state_dict": sd, "lr": 0.1},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
])
def test_weights_from_a_state_dict_or_a_checkpoint(tmp_path, wrap):
    source = _net()
    torch.save(wrap(source.state_dict()), tmp_path / "w.pt")
    target = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    load_weights(target, tmp_path / "w.pt")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_weights_that_do_not_fit_list_the_keys_in_one_line(tmp_path):
    state = _net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["1.bias"]
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ConfigError) as info:
        load_weights(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)), tmp_path / "w.pt", "mynet.py:Net")
    text = str(info.value)
    assert "\n" not in text and "do not fit mynet.py:Net" in text
    assert "missing 1: 1.bias" in text and "unexpected 1: extra.weight" in text
    assert "0.weight [2, 1, 3, 3] vs [3, 1, 3, 3]" in text


def test_a_pickled_module_is_refused_without_running_its_code(tmp_path, monkeypatch):
    pkg = tmp_path / "evilnet.py"
    pkg.write_text(f"import pathlib\npathlib.Path({str(tmp_path / 'imported')!r}).touch()\n"
                   "from torch import nn\nclass Net(nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import evilnet

    torch.save(evilnet.Net(2, 2), tmp_path / "pickled.pt")
    del sys.modules["evilnet"]
    (tmp_path / "imported").unlink()
    with pytest.raises(ConfigError, match=r"pickled Python object \(evilnet.Net\).*never unpickles code") as info:
        load_weights(nn.Linear(2, 2), tmp_path / "pickled.pt")
    assert "weights_only" not in str(info.value)
    assert not (tmp_path / "imported").exists()


def test_a_torchscript_file_is_refused(tmp_path):
    torch.jit.save(torch.jit.trace(nn.Linear(2, 2), torch.zeros(1, 2)), tmp_path / "ts.pt")
    with pytest.raises(ConfigError, match="TorchScript archive .* torch.save\\(model.state_dict\\(\\), PATH\\)"):
        load_weights(nn.Linear(2, 2), tmp_path / "ts.pt")


def test_unknown_zoo_name_keeps_its_close_matches():
    with pytest.raises(UnknownNameError, match="unknown model 'lenet55'; did you mean 'lenet5'"):
        create_model("lenet55")
