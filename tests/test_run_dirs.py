"""Run directories that never mix, --set, --dry-run, progress in a log, and one-line errors with exit 2."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from slimkit.cli import main
from slimkit.exceptions import ConfigError, CorruptFileError, ModelStateError
from slimkit.recipe import apply_sets, list_recipes, load_recipe, parse_recipe

# Baseline not trained (epochs 0) and one cheap stage: the run-directory logic is what is under test.
RECIPE = """
name: rd
model: lenet-300-100
train: {epochs: 0}
latency_runs: 2
stages:
  - name: prune
    magnitude: {sparsity: 0.5}
"""


def _one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rd")
    recipe = root / "rd.yaml"
    recipe.write_text(RECIPE)
    out = root / "out"
    assert main(["compress", "--recipe", str(recipe), "--out", str(out), "--no-progress", "--device", "cpu",
                 "--seed", "3"]) == 0
    return recipe, out


def _copy(out, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(out, dest)
    return dest


def test_the_run_records_its_recipe_log_and_timing_threads(run):
    recipe, out = run
    report = json.loads((out / "report.json").read_text())
    recorded = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recorded == report["recipe"] and recorded["train"]["seed"] == 3
    assert parse_recipe(recorded).to_dict() == recorded, "recipe.yaml must run again as it is"
    assert report["overrides"]["flags"]["seed"] == 3 and report["device"] == "cpu"
    assert report["latency_threads"] == 1 and recorded["latency_threads"] == 1
    assert "with 1 torch thread(s) (recipe `latency_threads`)" in (out / "report.md").read_text()
    log = (out / "run.log").read_text()
    assert "[0] baseline" in log and "[1] prune: magnitude" in log


def test_a_new_run_into_a_used_directory_is_refused(run, capsys):
    recipe, out = run
    before = (out / "report.json").read_bytes()
    err = _one_line_error(capsys, main(["compress", "--recipe", str(recipe), "--out", str(out)]))
    assert "--resume" in err and "--overwrite" in err
    assert (out / "report.json").read_bytes() == before


def test_overwrite_clears_what_the_old_run_left(run, tmp_path, capsys):
    recipe, out = run
    used = _copy(out, tmp_path)
    (used / "model.slim").write_bytes(b"old")
    (used / "stages" / "07").mkdir(parents=True)
    bare = tmp_path / "bare.yaml"
    bare.write_text("name: bare\nmodel: lenet-300-100\ntrain: {epochs: 0}\nlatency_runs: 2\n")
    assert main(["compress", "--recipe", str(bare), "--out", str(used), "--overwrite", "--no-progress"]) == 0
    assert not (used / "model.slim").exists() and not (used / "stages" / "07").exists()
    assert not (used / "models" / "01-prune.pt").exists()
    assert [s["name"] for s in json.loads((used / "report.json").read_text())["stages"]] == ["baseline"]


def test_overwrite_refuses_a_directory_no_run_wrote(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    err = _one_line_error(capsys, main(["compress", "--out", str(tmp_path), "--overwrite"]))
    assert "no slimkit run" in err and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flags,named", [
    (["--set", "stages[0].magnitude.sparsity=0.6"], "stages[0].magnitude.sparsity: the run used 0.5, this command "
                                                    "asks for 0.6"),
    (["--epochs", "2"], "train.epochs: the run used 0, this command asks for 2"),
    (["--model", "lenet5"], "model: the run used 'lenet-300-100', this command asks for 'lenet5'"),
    (["--seed", "4"], "train.seed: the run used 3"),
    (["--latency-threads", "2"], "latency_threads: the run used 1, this command asks for 2"),
    (["--overwrite"], "contradict"),
])
def test_resume_refuses_a_different_recipe_naming_the_difference(run, flags, named, capsys):
    recipe, out = run
    before = (out / "report.json").read_bytes()
    err = _one_line_error(capsys, main(["compress", "--recipe", str(recipe), "--out", str(out), "--resume",
                                        "--seed", "3", *flags]))
    assert named in err
    assert (out / "report.json").read_bytes() == before


@pytest.mark.slow
def test_resume_may_append_a_stage(run, tmp_path, capsys):
    recipe, out = run
    used = _copy(out, tmp_path)
    assert main(["compress", "--recipe", str(recipe), "--out", str(used), "--resume", "--seed", "3",
                 "--no-progress", "--set", "stages=[{magnitude: {sparsity: 0.5}, name: prune}, {encode: {}}]"]) == 0
    assert "prune: done in an earlier run" in capsys.readouterr().out
    rows = json.loads((used / "report.json").read_text())["stages"]
    assert [r["name"] for r in rows] == ["baseline", "prune", "encode"]


@pytest.mark.parametrize("make_out,message", [
    (lambda p: (p / "file").write_text("x") and p / "file", "is a file"),
    (lambda p: (p / "file").write_text("x") and p / "file" / "run", "cannot write there"),
])
def test_out_on_a_file_or_an_unwritable_path(tmp_path, make_out, message, capsys):
    err = _one_line_error(capsys, main(["compress", "--out", str(make_out(tmp_path))]))
    assert message in err


def test_a_run_that_stops_before_computing_leaves_nothing_in_the_way(tmp_path, capsys):
    out = tmp_path / "run"
    for _ in range(2):  # the second attempt meets the same data error, not a "used directory" refusal
        err = _one_line_error(capsys, main(["train", "--data", "mnist", "--data-dir", str(tmp_path / "nowhere"),
                                            "--out", str(out)]))
        assert "nowhere" in err
    assert not out.exists()
    out.mkdir()
    (out / "recipe.yaml").write_text("name: x\n")
    (out / "run.log").write_text("an attempt that stopped early\n")
    bare = tmp_path / "bare.yaml"
    bare.write_text("name: bare\nmodel: lenet-300-100\ntrain: {epochs: 0}\nlatency_runs: 2\n")
    assert main(["compress", "--recipe", str(bare), "--out", str(out), "--no-progress"]) == 0
    assert "an attempt" not in (out / "run.log").read_text()


def test_set_reaches_any_field_and_reports_bad_paths():
    recipe = load_recipe("deep-compression", sets=["stages[0].finetune.epochs=1", "train.batch_size=32",
                                                   "stages[2].finetune={epochs: 2}", "train.lr=1e-3"])
    assert recipe.stages[0].finetune.epochs == 1 and recipe.stages[2].finetune.epochs == 2
    assert recipe.train.batch_size == 32 and recipe.train.lr == 1e-3
    assert recipe.overrides["set"][0] == "stages[0].finetune.epochs=1"
    for sets, message in [
        (["stages[0].finetune.epoch=1"], "stages[0].finetune.epoch: unknown key"),
        (["stages[9].finetune.epochs=1"], "stages[9] does not exist (the recipe has 3 stages)"),
        (["stages[0].share.bits=4"], "stages[0] is a 'magnitude' stage; set stages[0].magnitude.<field>"),
        (["train.epochs.x=1"], "train.epochs is 15, not a mapping"),
        (["train.batch_size=0"], "train.batch_size: must be greater than or equal to 1 (got 0)"),
        (["epochs"], "expected PATH=VALUE"),
        (["model=nope-net"], "unknown model 'nope-net'"),
    ]:
        with pytest.raises(ConfigError, match=None) as info:
            load_recipe("deep-compression", sets=sets)
        assert message in str(info.value), (sets, str(info.value))


def test_set_does_not_touch_its_input():
    data = {"name": "x", "train": {"epochs": 3}}
    assert apply_sets(data, ["train.epochs=1"])["train"]["epochs"] == 1 and data["train"]["epochs"] == 3


@pytest.mark.parametrize("name", [n for n, _ in list_recipes()])
def test_every_builtin_recipe_round_trips_through_its_recorded_form(name):
    recipe = load_recipe(name).to_dict()
    assert parse_recipe(yaml.safe_load(yaml.safe_dump(recipe, sort_keys=False))).to_dict() == recipe


def test_dry_run_finds_a_bn_stage_on_a_model_without_bn_before_training(tmp_path, capsys):
    out = tmp_path / "never"
    err = _one_line_error(capsys, main(["compress", "--recipe", "slimming", "--model", "lenet5", "--dry-run",
                                        "--out", str(out)]))
    # the first stage already: L1 on BN gammas would add nothing to a model without BatchNorm
    assert "--dry-run: stages[0] (sparse-train: sparse-train) does not fit lenet5" in err and "BatchNorm" in err
    said = capsys.readouterr().out
    assert not out.exists() and "training" not in said


def test_dry_run_of_a_fitting_recipe_checks_every_stage(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["compress", "--dry-run", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "[0] baseline: lenet5 on digits" in said and "traced" in said
    for line in ("[1] prune: magnitude fits", "[2] share: share fits", "[3] encode: encode fits"):
        assert line in said
    assert not out.exists()


@pytest.mark.slow
def test_dry_run_trains_nothing_even_where_a_stage_trains_a_student(tmp_path, capsys):
    """kd / takd stages and a two-stage hint fine-tune train through ctx.finetune: a dry run's trains nothing."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from slimkit.dryrun import dry_run

    pairs = [["features.block1", "conv1"]]
    recipe = parse_recipe({"name": "dry-distill", "model": "lenet5", "stages": [
        {"name": "student", "distill": {"student": "plaincnn-4-8", "epochs": 3}},
        {"name": "takd", "takd": {"student": "plaincnn-2-4", "assistants": ["plaincnn-3-6"], "epochs": 3}},
        {"name": "hints", "train": {}, "finetune": {"epochs": 2, "distill": {
            "method": "hint", "teacher": "baseline", "options": {"pairs": pairs, "two_stage": True}}}},
    ]})
    steps = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: steps.append(1))
    try:
        dry_run(recipe, log=print)
    finally:
        handle.remove()
    said = capsys.readouterr().out
    assert "[1] student: distill fits" in said and "[3] hints: train fits" in said
    assert steps == [], f"the dry run took {len(steps)} optimizer steps"


def test_progress_in_a_log_is_one_line_per_ten_seconds(capsys):
    from slimkit.data import load_data
    from slimkit.models import create_model
    from slimkit.train import LineProgress, fit

    data = load_data("digits")
    model = create_model("lenet-300-100", in_channels=1)
    fit(model, data.train, {"epochs": 2, "batch_size": 256}, progress=True, desc="tiny")
    err = capsys.readouterr().err  # not a terminal under pytest: the plain-line progress
    assert "\r" not in err and err.count("\n") == 1 and err.startswith("tiny: step 12/12, epoch 2/2, loss ")
    every = LineProgress(total=5, desc="x", interval=0.0)
    for _ in range(5):
        every.update()
    every.close()
    assert capsys.readouterr().err.count("\n") == 5


def test_a_corrupt_image_in_a_folder_is_one_line(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / split / label / f"{i}.png")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    err = _one_line_error(capsys, main(["train", "--data", f"imagefolder:{tmp_path}", "--epochs", "1",
                                        "--out", str(tmp_path / "run"), "--no-progress"]))
    assert "broken.png is not a readable image" in err
    assert "error: imagefolder:" in (tmp_path / "run" / "run.log").read_text(), "the run's log keeps the error"


def test_deliberate_errors_below_the_cli_are_slimkit_errors_that_stay_value_errors():
    from slimkit.encode.container import encode_model
    from slimkit.prune.criteria import CRITERIA, ScoreContext
    from slimkit.prune.masks import L1Penalty, set_mask
    from slimkit.quantize.kmeans import kmeans_1d
    from slimkit.quantize.sharing import share_weights_

    with pytest.raises(ConfigError, match="k >= 1"):
        kmeans_1d(np.ones(4), 0)
    with pytest.raises(ConfigError, match="at least one value"):
        kmeans_1d(np.ones(0), 2)
    with pytest.raises(ConfigError, match="mask shape"):
        set_mask(nn.Linear(2, 2), torch.ones(3))
    with pytest.raises(ConfigError, match="L1 strength"):
        L1Penalty(-1.0)
    with pytest.raises(ConfigError, match="taylor needs"):
        CRITERIA.get("taylor")(nn.Linear(2, 2), None, ScoreContext())  # no inputs: checked before the graph
    model = nn.Sequential(nn.Linear(8, 4))
    share_weights_(model, torch.zeros(1, 8), {"linear_bits": 2})
    with torch.no_grad():
        model[0].weight.add_(0.5)  # off the codebook
    with pytest.raises(ModelStateError, match="codebook"):
        encode_model(model)
    assert issubclass(ModelStateError, ValueError) and issubclass(CorruptFileError, ValueError)


def test_bare_slimkit_prints_help_and_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: slimkit" in out and "compress" in out and "stages" in out
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("slimkit ")


@pytest.mark.parametrize("argv,message", [
    (["compress", "--bogus"], "slimkit compress: error: unrecognized arguments: --bogus; see slimkit compress --help"),
    (["compres"], "invalid choice: 'compres'"),
    (["compress", "--threads", "0"], "must be at least 1"),
    (["compress", "--device", "tpu"], "--device 'tpu': must be cpu, cuda or cuda:N"),
    (["stages", "prnue"], "unknown stage 'prnue'"),
    (["models", "nothing*"], "no zoo model matches"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    assert message in _one_line_error(capsys, main(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    assert "no CUDA device" in _one_line_error(capsys, main(["compress", "--device", "cuda", "--dry-run"]))


def test_stages_lists_every_registered_kind_with_defaults(capsys):
    from slimkit.stages import STAGES

    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for kind in STAGES.names():
        assert f"\n{kind}: " in f"\n{out}"
    assert "  sparsity: float | None = None" in out and "  linear_bits: int = 5" in out


def test_models_shows_parameters_and_input(capsys):
    assert main(["models", "lenet*"]) == 0
    out = capsys.readouterr().out
    assert "431,080" in out and "266,610" in out and "[N, 1, H, W]" in out


def test_profile_times_on_one_thread_by_default(capsys):
    assert main(["profile", "--model", "lenet5", "--input-shape", "1,1,28,28", "--num-classes", "10"]) == 0
    assert "1 thread(s)" in capsys.readouterr().out
