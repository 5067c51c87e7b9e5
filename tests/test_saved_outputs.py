"""Everything slimkit writes opens again with no extra flags: `slimkit eval` / `profile` / `decode` on the
model files of every built-in recipe and of runs on a user's own model file, torchvision and timm models
and an image folder; and a model/data mismatch is one line, never a wrong score."""

import json
import re
import textwrap
from importlib import resources

import pytest
import torch
import yaml

from _user_files import MYNET, make_image_folder
from slimkit.cli import main
from slimkit.data import load_data
from slimkit.manifest import save_model
from slimkit.models import create_model
from slimkit.pipeline import run_recipe
from slimkit.recipe import list_recipes, parse_recipe
from slimkit.train import evaluate

SHORT = ["--set", "train.epochs=1", "train.batch_size=4", "stages[0].finetune.epochs=0", "stages[1].finetune.epochs=0",
         "latency_runs=1", "--no-progress"]




def _model_files(out):
    return sorted(p for p in out.rglob("*") if p.suffix in (".pt", ".slim") and "checkpoints" not in p.parts)


def _eval_accuracy(path, capsys, *flags):
    assert main(["eval", str(path), *flags]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    return float(re.search(r": ([0-9.]+)% on ", text).group(1))


def _opens_with_no_flags(out, report, capsys):
    """eval and profile work on every model file of the run; eager-measured stages score what the report says."""
    rows = {f"{i:02d}-{row['name']}.pt": row for i, row in enumerate(report["stages"])}
    files = _model_files(out)
    assert any(p.name == "model.pt" for p in files)
    for path in files:
        accuracy = _eval_accuracy(path, capsys)
        row = rows.get(path.name)
        if row is not None and row["engine"] == "pytorch-eager":
            assert accuracy == pytest.approx(row["accuracy"], abs=0.01), path
        assert main(["profile", str(path), "--no-latency"]) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        if row is not None:
            assert f"{row['params']:,}" in printed, path
    return files


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def own_model_run(tmp_path_factory, folder):
    root = tmp_path_factory.mktemp("own")
    (root / "mynet.py").write_text(MYNET)
    out = root / "run"
    assert main(["compress", "--model", f"{root / 'mynet.py'}:MyNet", "--data", f"imagefolder:{folder}",
                 "--recipe", "slimming", "--model-arg", "width=6", "--image-size", "16", "--out", str(out),
                 *SHORT]) == 0
    return root, out, json.loads((out / "report.json").read_text())


@pytest.mark.slow  # shares one compress run (module fixture)
def test_a_users_model_file_and_image_folder_compress_then_open_anywhere(own_model_run, folder, tmp_path,
                                                                        monkeypatch, capsys):
    root, out, report = own_model_run
    assert report["model"] == f"{root / 'mynet.py'}:MyNet"
    assert [row["name"] for row in report["stages"]] == ["baseline", "sparse-train", "prune"]
    monkeypatch.chdir(tmp_path)  # recorded paths are absolute: works from anywhere, and without --data
    files = _opens_with_no_flags(out, report, capsys)
    assert {p.name for p in files} >= {"model.pt", "00-baseline.pt", "01-sparse-train.pt", "02-prune.pt"}
    assert main(["eval", str(out / "model.pt")]) == 0
    assert f"on imagefolder:{folder} test (4 images)" in capsys.readouterr().out


@pytest.mark.slow  # shares one compress run (module fixture)
def test_a_model_evaluated_on_other_data_is_one_line(own_model_run, folder, tmp_path, capsys):
    _, out, _ = own_model_run
    model = str(out / "model.pt")
    assert main(["eval", model, "--image-size", "20"]) == 2
    err = capsys.readouterr().err
    assert "trained on imagefolder:" in err and "(3x16x16, 2 classes)" in err and "gives 3x20x20" in err
    assert "--image-size 16" in err and err.count("\n") == 1
    assert main(["eval", model, "--data", "digits"]) == 2
    assert "digits gives 1x28x28 inputs" in capsys.readouterr().err
    three = make_image_folder(tmp_path / "three", classes=("a", "b", "c"), train=1, test=1)
    assert main(["eval", model, "--data", f"imagefolder:{three}", "--image-size", "16"]) == 2
    assert "has 3 classes" in capsys.readouterr().err


@pytest.mark.slow  # shares one compress run (module fixture)
def test_a_moved_image_folder_is_one_line(own_model_run, tmp_path, capsys):
    _, out, _ = own_model_run
    from slimkit.manifest import atomic_save, read_payload

    payload = read_payload(out / "model.pt")
    payload["data"]["dataset"] = f"imagefolder:{tmp_path / 'gone'}"
    atomic_save(payload, tmp_path / "moved.pt")
    assert main(["eval", str(tmp_path / "moved.pt")]) == 2
    assert "which is not there any more; pass --data imagefolder:PATH" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("source,weights", [("torchvision:mobilenet_v2", True), ("timm:test_resnet", False)])
def test_library_models_compress_then_open(source, weights, folder, tmp_path, capsys):
    flags = []
    if weights:
        torch.manual_seed(3)
        trained = create_model(source, num_classes=2, in_channels=3)
        torch.save(trained.state_dict(), tmp_path / "weights.pt")
        flags = ["--weights", str(tmp_path / "weights.pt")]
    out = tmp_path / "run"
    assert main(["compress", "--model", source, "--data", f"imagefolder:{folder}", "--recipe", "slimming",
                 "--out", str(out), *flags, *SHORT]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == source
    if weights:  # the baseline is exactly the given weights, not trained
        data = load_data(f"imagefolder:{folder}")
        assert report["stages"][0]["accuracy"] == pytest.approx(evaluate(trained.eval(), data.test), abs=0.01)
    _opens_with_no_flags(out, report, capsys)


NARROW_VGG = textwrap.dedent("""
    from slimkit.models.cifar import VGG, VGG_CONFIGS


    def vgg16_narrow(num_classes, in_channels):
        return VGG([c if c == "M" else c // 16 for c in VGG_CONFIGS["vgg16"]], num_classes, in_channels)
""")


def _zero_epochs(node):
    if isinstance(node, dict):
        return {k: 0 if str(k).endswith("epochs") else _zero_epochs(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_zero_epochs(v) for v in node]
    return node


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, _ in list_recipes()])
def test_every_builtin_recipe_writes_models_that_open_with_no_flags(name, folder, tmp_path, capsys):
    """The real files each recipe's stages write (no training: epochs 0; a small image folder), opened by
    `slimkit eval` and `slimkit profile` alone. VGG-16 runs 16x narrower to keep it short."""
    data = yaml.safe_load((resources.files("slimkit") / "recipes" / f"{name}.yaml").read_text())
    data = _zero_epochs(data)
    data.update(data=f"imagefolder:{folder}", image_size=32, latency_runs=1)
    if data.get("model") == "vgg16-cifar":  # the same VGG class and layer names, 16x narrower, from a user file
        (tmp_path / "narrow_vgg.py").write_text(NARROW_VGG)
        data["model"] = f"{tmp_path / 'narrow_vgg.py'}:vgg16_narrow"
    out = tmp_path / "run"
    report = run_recipe(parse_recipe(data, name), out, progress=False, log=lambda _msg: None)
    files = _opens_with_no_flags(out, report, capsys)
    for path in files:
        if path.suffix == ".slim":  # decode needs no flags either, and what it writes opens the same way
            assert main(["decode", str(path)]) == 0
            decoded = path.with_name(f"{path.stem}.decoded.pt")
            assert _eval_accuracy(decoded, capsys) == _eval_accuracy(path, capsys)


def test_a_training_checkpoint_or_a_pickled_module_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    from slimkit.train import TrainConfig, fit

    data = load_data("digits")
    fit(create_model("lenet-300-100", num_classes=10, in_channels=1), torch.utils.data.Subset(data.train, range(8)),
        TrainConfig(epochs=1, batch_size=8), checkpoint=ckpt / "baseline.pt", progress=False)
    assert main(["eval", str(ckpt / "baseline.pt")]) == 2
    err = capsys.readouterr().err
    assert "is a training checkpoint" in err and str(tmp_path / "run" / "model.pt") in err and err.count("\n") == 1
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    assert main(["eval", str(tmp_path / "pickled.pt")]) == 2
    err = capsys.readouterr().err
    assert "pickled Python object (torch.nn.modules.linear.Linear)" in err and "weights_only" not in err
    assert err.count("\n") == 1
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "plain.pt")
    assert main(["profile", str(tmp_path / "plain.pt")]) == 2
    assert "plain state dict" in capsys.readouterr().err


def test_the_recorded_source_of_a_baseline_file_wins_over_model(tmp_path):
    lenet = create_model("lenet5", num_classes=10, in_channels=1)
    save_model(lenet, tmp_path / "lenet.pt")
    recipe = parse_recipe({"name": "b", "model": "resnet18", "baseline": str(tmp_path / "lenet.pt"),
                           "latency_runs": 1})
    report = run_recipe(recipe, tmp_path / "run", progress=False, log=lambda _msg: None)
    assert report["model"] == "lenet5"
    assert json.loads((tmp_path / "run" / "report.json").read_text())["model"] == "lenet5"


@pytest.mark.slow  # shares one compress run (module fixture)
def test_a_run_on_a_users_model_file_resumes_with_no_extra_flags(own_model_run, folder, capsys):
    root, out, report = own_model_run
    assert main(["compress", "--model", f"{root / 'mynet.py'}:MyNet", "--data", f"imagefolder:{folder}",
                 "--recipe", "slimming", "--model-arg", "width=6", "--image-size", "16", "--out", str(out),
                 "--resume", *SHORT]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count("done in an earlier run") == 2
    again = json.loads((out / "report.json").read_text())
    assert [r["accuracy"] for r in again["stages"]] == [r["accuracy"] for r in report["stages"]]


def test_a_plain_state_dict_evaluates_with_its_model_source(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("lenet-300-100", num_classes=10, in_channels=1).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    expected = evaluate(model, load_data("digits").test)
    assert _eval_accuracy(tmp_path / "weights.pt", capsys, "--model", "lenet-300-100") == pytest.approx(expected,
                                                                                                         abs=0.01)
    assert main(["eval", str(tmp_path / "weights.pt"), "--model", "lenet5"]) == 2
    err = capsys.readouterr().err
    assert "weights" in err and "do not fit lenet5: missing" in err and err.count("\n") == 1
