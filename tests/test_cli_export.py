"""``slimkit export`` and the run directory's deployables, as a user meets them: a real int8 run,
its top-level files, the last line of ``compress``, the written files run in their engines, and
one-line errors with exit 2."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from _user_files import MYNET, make_image_folder
from slimkit.cli import main

INT8 = """
name: tiny-int8
description: one epoch, then int8 PTQ run in ONNX Runtime
model: lenet5
data: digits
train: {epochs: 1, lr: 0.05}
latency_runs: 3
stages:
  - name: int8
    int8: {engines: [onnxruntime], max_drop: 100, calibration_batches: 2}
"""


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    import contextlib
    import io

    root = tmp_path_factory.mktemp("export")
    (root / "int8.yaml").write_text(INT8)
    out = root / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["compress", "--recipe", str(root / "int8.yaml"), "--out", str(out), "--no-progress"]) == 0
    return out, printed.getvalue()


def _check_line(text: str) -> dict:
    found = re.search(r"check: (\S+) ([\d.]+)% on (\S+) test \((\d+) images\); PyTorch ([\d.]+)%; "
                      r"top-1 agreement ([\d.]+)%; max \|logit diff\| (\S+);", text)
    assert found, text
    engine, acc, data, n, ref, agree, diff = found.groups()
    return {"engine": engine, "accuracy": float(acc), "data": data, "samples": int(n), "reference": float(ref),
            "agreement": float(agree), "max_diff": float(diff)}


def test_run_directory_keeps_its_deployables_on_top_and_names_the_file_to_ship(int8_run):
    out, printed = int8_run
    report = json.loads((out / "report.json").read_text())
    names = [f["name"] for f in report["deployables"]["files"]]
    assert names == ["model.int8.onnx", "model.slim", "model.pt"]
    assert (out / "model.int8.onnx").read_bytes() == (out / "stages" / "01" / "model.int8.onnx").read_bytes()
    assert (out / "model.slim").stat().st_size == report["stages"][-1]["details"]["slim_bytes"]
    size = (out / "model.int8.onnx").stat().st_size
    last = printed.strip().splitlines()[-1]
    assert last.startswith(f"ship: {out / 'model.int8.onnx'} ({size:,} bytes, ") and "onnxruntime-int8" in last
    markdown = (out / "report.md").read_text()
    assert "## Deployable files" in markdown and "Ship `model.int8.onnx`" in markdown


def test_export_run_dir_int8_onnx_check_runs_the_runs_own_file(int8_run, capsys):
    out, _ = int8_run
    assert main(["export", str(out), "--format", "int8-onnx", "--check"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out / 'model.int8.onnx'}" in text and "the run's own int8 export" in text
    check = _check_line(text)
    row = json.loads((out / "report.json").read_text())["stages"][-1]
    assert check["engine"] == "onnxruntime-int8" and check["data"] == "digits" and check["samples"] == 360
    assert check["accuracy"] == pytest.approx(row["accuracy"], abs=0.006)  # the same file, the same test set
    assert check["agreement"] >= 95.0


def test_export_baseline_onnx_and_slim_agree_with_pytorch(int8_run, tmp_path, capsys):
    out, _ = int8_run
    baseline = out / "models" / "00-baseline.pt"
    accuracy = json.loads((out / "report.json").read_text())["stages"][0]["accuracy"]
    assert main(["export", str(baseline), "--format", "onnx", "-o", str(tmp_path / "b.onnx"), "--check"]) == 0
    check = _check_line(capsys.readouterr().out)
    assert check["engine"] == "onnxruntime-fp32" and check["agreement"] == 100.0 and check["max_diff"] < 1e-3
    assert check["accuracy"] == check["reference"] == pytest.approx(accuracy, abs=0.006)
    assert main(["export", str(baseline), "--format", "slim", "-o", str(tmp_path), "--check"]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "00-baseline.slim").is_file() and f"({(tmp_path / '00-baseline.slim').stat().st_size:,} bytes"\
        in text
    check = _check_line(text)
    assert check["agreement"] == 100.0 and check["max_diff"] == 0.0  # the container decodes exactly


def test_export_float_model_as_int8_onnx_calibrates_ptq(int8_run, tmp_path, capsys):
    out, _ = int8_run
    path = tmp_path / "ptq.int8.onnx"
    assert main(["export", str(out / "models" / "00-baseline.pt"), "--format", "int8-onnx", "-o", str(path),
                 "--check"]) == 0
    text = capsys.readouterr().out
    assert "calibrated int8 PTQ" in text and "512 training images" in text
    fp32 = (out / "models" / "00-baseline.pt").stat().st_size
    assert path.stat().st_size < 0.3 * fp32
    assert _check_line(text)["agreement"] >= 90.0


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("slimkit export: error: "), err
    return err


def test_bad_export_input_is_one_line_and_exit_2(int8_run, tmp_path, capsys):
    out, _ = int8_run
    assert "does not exist" in _one_line_error(["export", str(tmp_path / "nope.pt"), "--format", "onnx"], capsys)
    assert "did you mean 'onnx'" in _one_line_error(["export", str(out), "--format", "onx"], capsys)
    assert "without model.pt" in _one_line_error(["export", str(tmp_path), "--format", "onnx"], capsys)
    assert "--format int8-onnx" in _one_line_error(["export", str(out), "--format", "onnx"], capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _one_line_error(["export", str(out), "--format", "slim", "-o", str(blocker / "m.slim")], capsys)
    assert "cannot write" in err
    assert "required" in _one_line_error(["export", str(out)], capsys)


@pytest.mark.skipif(importlib.util.find_spec("executorch") is not None, reason="executorch is installed")
def test_export_executorch_without_the_package_names_it(int8_run, capsys):
    out, _ = int8_run
    err = _one_line_error(["export", str(out / "models" / "00-baseline.pt"), "--format", "executorch"], capsys)
    assert "executorch" in err and "slimkit[executorch]" in err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="needs slimkit[executorch]")
def test_export_executorch_int8_check(int8_run, tmp_path, capsys):
    out, _ = int8_run
    path = tmp_path / "m.int8.pte"
    assert main(["export", str(out / "models" / "00-baseline.pt"), "--format", "executorch-int8", "-o", str(path),
                 "--check"]) == 0
    check = _check_line(capsys.readouterr().out)
    assert check["engine"] == "executorch-int8" and check["agreement"] >= 90.0
    assert Path(path).stat().st_size < 0.4 * (out / "models" / "00-baseline.pt").stat().st_size






@pytest.mark.slow
def test_export_a_users_model_and_image_folder_run_with_no_extra_flags(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynet.py").write_text(MYNET)
    folder = make_image_folder(tmp_path / "images", train=8, test=4, size=16)
    out = tmp_path / "run"
    assert main(["compress", "--model", f"{tmp_path / 'mynet.py'}:MyNet", "--data", f"imagefolder:{folder}",
                 "--recipe", "slimming", "--out", str(out), "--no-progress", "--set", "train.epochs=1",
                 "train.batch_size=4", "stages[0].finetune.epochs=0", "stages[1].finetune.epochs=0",
                 "latency_runs=1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"ship: {out / 'model.onnx'} (")
    monkeypatch.chdir(tmp_path / "images")  # the recorded data and source are absolute paths
    for fmt, engine in (("int8-onnx", "onnxruntime-int8"), ("onnx", "onnxruntime-fp32")):
        assert main(["export", str(out), "--format", fmt, "--check"]) == 0, capsys.readouterr().err
        check = _check_line(capsys.readouterr().out)
        assert check["engine"] == engine and check["data"] == f"imagefolder:{folder}" and check["samples"] == 8
        if fmt == "onnx":
            assert check["agreement"] == 100.0 and check["accuracy"] == check["reference"]
    assert (out / "model.int8.onnx").is_file() and (out / "model.onnx").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["torchvision:mobilenet_v2", "timm:test_resnet"])
def test_export_library_model_files_with_no_extra_flags(source, tmp_path, capsys):
    pytest.importorskip(source.partition(":")[0])
    from slimkit.data import load_data
    from slimkit.manifest import data_spec, save_model, set_data_spec
    from slimkit.models import create_model

    folder = make_image_folder(tmp_path / "images", train=8, test=4, size=16)
    bundle = load_data(f"imagefolder:{folder}")
    model = create_model(source, num_classes=2, in_channels=3)
    set_data_spec(model, data_spec(bundle))
    save_model(model.eval(), tmp_path / "model.pt")
    for fmt in ("onnx", "int8-onnx"):
        assert main(["export", str(tmp_path / "model.pt"), "--format", fmt, "--check"]) == 0, capsys.readouterr().err
        check = _check_line(capsys.readouterr().out)
        assert check["data"] == f"imagefolder:{folder}" and check["samples"] == 8
        if fmt == "onnx":
            assert check["agreement"] == 100.0
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.int8.onnx").is_file()
