"""The command line as a user meets it: a real run, its files, and one-line errors with exit 2."""

import json

import pytest

from slimkit.cli import main

TINY = """
name: tiny
description: one epoch and a one-epoch fine-tune
model: lenet5
data: digits
train: {epochs: 1, lr: 0.05}
latency_runs: 3
stages:
  - name: tune
    train: {}
    finetune: {epochs: 1, lr: 0.01}
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY)
    out = root / "out"
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--no-progress"]) == 0
    return recipe, out


def test_compress_writes_the_run_directory(tiny_run, capsys):
    _, out = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["baseline", "tune"]
    for row in report["stages"]:
        for key in ("name", "accuracy", "params", "nonzeros", "macs", "bytes", "latency_ms", "ratio"):
            assert key in row
        assert row["params"] == 431080 and row["bytes"] == 431080 * 4
        assert 0 <= row["accuracy"] <= 100 and row["ratio"] == 1.0
    assert report["stages"][1]["accuracy"] > 80
    assert "| tune " in (out / "report.md").read_text()
    assert (out / "accuracy_vs_size.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "model.pt").is_file() and (out / "checkpoints" / "baseline.pt").is_file()


def test_report_and_eval_commands(tiny_run, capsys):
    _, out = tiny_run
    assert main(["report", str(out)]) == 0
    assert "| baseline" in capsys.readouterr().out
    assert main(["eval", str(out / "model.pt")]) == 0
    accuracy = json.loads((out / "report.json").read_text())["stages"][-1]["accuracy"]
    assert f"{accuracy:.2f}%" in capsys.readouterr().out


def test_resume_of_a_finished_run_loads_every_stage(tiny_run, capsys):
    recipe, out = tiny_run
    before = json.loads((out / "report.json").read_text())["stages"]
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--resume", "--no-progress"]) == 0
    after = json.loads((out / "report.json").read_text())["stages"]
    assert [r["accuracy"] for r in after] == [r["accuracy"] for r in before]
    assert "done in an earlier run" in capsys.readouterr().out


def test_profile_prints_layers(capsys):
    assert main(["profile", "--model", "lenet5", "--input-shape", "1,1,28,28", "--num-classes", "10",
                 "--layers", "--no-latency"]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "288,000" in out  # conv1: 20 x 24 x 24 outputs x 25 taps
    assert "431,080" in out and "2,293,000" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["profile", "--model", "lenet5", "--input-shape", "1,a,28,28"], "--input-shape '1,a,28,28'"),
        (["profile", "--model", "lenet55", "--input-shape", "1,1,28,28"], "unknown model 'lenet55'"),
        (["compress", "--model", "resnet2O-cifar"], "unknown model 'resnet2o-cifar'"),
        (["compress", "--data", "cifar11"], "unknown dataset 'cifar11'"),
        (["compress", "--recipe", "nope"], "unknown recipe 'nope'"),
        (["train", "--data", "mnist", "--data-dir", "/nonexistent/slimkit"], "/nonexistent/slimkit"),
        (["report", "/nonexistent/run"], "no report.json"),
        (["eval", "/nonexistent/model.pt"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run directories (runs/<name>) of earlier runs must not decide the error
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.lower() in err.lower()
    assert err.count("\n") == 1 and "Traceback" not in err


def test_malformed_recipe_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages:\n  - train: {}\n    finetune: {epochs: -3}\n")
    assert main(["compress", "--recipe", str(bad)]) == 2
    assert "stages[0].finetune.epochs" in capsys.readouterr().err


def test_recipes_lists_the_builtins(capsys):
    assert main(["recipes"]) == 0
    assert "deep-compression" in capsys.readouterr().out


def test_every_flag_of_every_command_has_help_text():
    import argparse

    from slimkit.cli import build_parser

    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, sub_name)
            elif not action.help and not isinstance(action, argparse._HelpAction):
                missing.append(f"slimkit {name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "")
    assert not missing, f"flags without help: {missing}"


def test_compress_without_a_subcommand_flag_is_refused_not_run(capsys):
    """Bare `slimkit` prints help (tested in test_run_dirs); flags need their subcommand."""
    assert main(["--recipe", "kd"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'kd'" in err and "see slimkit --help" in err and err.count("\n") == 1
