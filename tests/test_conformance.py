"""Conformance: every registered stage, on a few tiny zoo models, held to one contract.

The cases are generated from ``STAGES.names()`` (as timm tests every registered model and
scikit-learn checks every estimator), so a new stage is checked without touching this file.
For every stage:

- its config: the default (or the one settings entry of :data:`SETTINGS`) builds, round-trips
  through ``to_dict()`` / ``model_dump()`` and ``coerce``, and a bad config (an unknown key, a
  value of the wrong type) is one ``ConfigError`` line, also from the ``slimkit`` command;
- on each model of :data:`ZOO`, applied with the runner's own context
  (:func:`slimkit.pipeline.stage_context`): the output is a :class:`StageOutput` with a valid
  ``phase`` and JSON details, torch's thread count and quantized engine are as they were,
  and the model saves, loads (:mod:`slimkit.manifest`) and gives the same outputs and
  accuracy; a stage that cannot apply to a model refuses with one line
  (:data:`REFUSALS`);
- in the real runner (:func:`slimkit.pipeline.run_recipe`, one-step fine-tune): the report row
  has every field the baseline row has, is plain JSON, and the stage's saved model reloads to
  the row's accuracy.

The checks are functions that raise :class:`ContractError`; the parametrized tests call them,
and the last tests show each one catching a stage that breaks the contract.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from slimkit.config import Config
from slimkit.data import load_data
from slimkit.exceptions import ConfigError, SlimkitError
from slimkit.manifest import data_spec, load_model, save_model, set_data_spec
from slimkit.models import MODELS, create_model
from slimkit.pipeline import RunPaths, run_recipe, stage_context
from slimkit.prune.masks import mask_hooks
from slimkit.recipe import parse_recipe
from slimkit.stages import STAGES, StageOutput, StageSpec
from slimkit.train import TrainConfig, TrainHooks, evaluate, fit

pytestmark = pytest.mark.slow

#: role -> (zoo name, model_args, image side): a plain chain, a residual net, a depthwise net, a LeNet
ZOO: dict[str, tuple[str, dict[str, Any], int]] = {
    "chain": ("plaincnn-2", {"widths": [4, 8]}, 8),
    "residual": ("resnet20-cifar", {}, 8),
    "depthwise": ("mobilenet-v1", {"width_mult": 0.25}, 8),
    "lenet": ("lenet5", {}, 28),
}
#: the one table of per-stage settings: a stage not listed runs with its defaults. Listed: what
#: has no default (a student, a sparsity), or the smallest settings that keep the suite fast.
SETTINGS: dict[str, dict[str, Any]] = {
    "distill": {"student": "plaincnn-4-8"},
    "takd": {"student": "plaincnn-2-4", "assistants": ["plaincnn-4-8"]},
    "magnitude": {"sparsity": 0.5},
    "obd": {"sparsity": 0.5, "samples": 32},
    "lobs": {"sparsity": 0.5, "samples": 32, "rounds": 1, "ignore": ["fc1"]},
    "reconstruct": {"samples": 32},
    "share": {"max_iter": 20},
    "dct": {"max_iter": 20},
    "encode": {"runtime": False},
    "decompose": {"rank": 0.25},
    "int8": {"calibration_batches": 1, "engines": ["onnxruntime"]},
    "qat": {"calibration_batches": 1, "engines": ["onnxruntime"]},
}
#: (stage, role) -> what the one-line refusal must say: the stage cannot apply to that model
REFUSALS: dict[tuple[str, str], str] = {
    ("sparse-train", "lenet"): "BatchNorm",
}
#: the phases a stage may report, read from the contract itself
PHASES = typing.get_args(typing.get_type_hints(StageOutput)["phase"])
#: training inside a case: one full-batch step per epoch over the tiny split
TRAIN = {"epochs": 1, "batch_size": 4096, "lr": 0.05}
TRAIN_IMAGES, TEST_IMAGES = 256, 128


class ContractError(AssertionError):
    """A stage broke the contract; the message names the stage, the model, the check and why."""


def _fail(where: str, check: str, reason: str) -> typing.NoReturn:
    raise ContractError(f"{where}: {check}: {reason}")


def _one_line(err: BaseException) -> bool:
    text = str(err)
    return bool(text.strip()) and "\n" not in text.strip() and "Traceback" not in text


def stage_settings(name: str) -> dict[str, Any]:
    return dict(SETTINGS.get(name, {}))


# --------------------------------------------------------------------------- checks: the config


def check_config(spec: StageSpec, settings: dict[str, Any]) -> Config:
    """The stage's config builds from ``settings`` and round-trips; its defaults build unless listed."""
    where = f"stage {spec.name}"
    cls = spec.config_cls
    if not (isinstance(cls, type) and issubclass(cls, Config)):
        _fail(where, "config class", f"{cls!r} is not a slimkit.config.Config")
    if not spec.doc or not (cls.__doc__ or "").strip():
        _fail(where, "docstring", "the stage function and its config class each need a docstring (its first line "
                                  "is what `slimkit stages` lists)")
    if not settings:
        try:
            cls.coerce({})
        except ConfigError as err:
            _fail(where, "default config", f"does not build ({err}); give the field a default or list the stage "
                                           "in SETTINGS")
    else:
        try:
            cls.coerce({})
        except ConfigError as err:
            if not _one_line(err):
                _fail(where, "default config", f"refused with more than one line: {err!r}")
    from slimkit.catalog import describe_stage

    listed = describe_stage(spec)
    unlisted = [f for f in cls.model_fields if f"  {f}:" not in listed]
    if unlisted:
        _fail(where, "slimkit stages", f"does not list the settings {', '.join(unlisted)}")
    try:
        config = cls.coerce(settings, where=f"stages[0].{spec.name}")
    except ConfigError as err:
        _fail(where, "settings", f"SETTINGS[{spec.name!r}] does not build: {err}")
    if not config.model_config.get("frozen"):
        _fail(where, "config", "is not frozen")
    as_dict = config.to_dict()
    try:
        text = json.dumps(as_dict, allow_nan=False)
    except (TypeError, ValueError) as err:
        _fail(where, "to_dict", f"is not plain JSON: {err}")
    for label, data in (("to_dict", json.loads(text)), ("model_dump", config.model_dump())):
        try:
            again = cls.coerce(data)
        except ConfigError as err:
            _fail(where, label, f"does not coerce back: {err}")
        if again != config:
            _fail(where, label, f"round trip changed the config: {config!r} -> {again!r}")
    if cls.coerce(config) is not config:
        _fail(where, "coerce", "does not pass an instance through")
    return config


def check_bad_config(spec: StageSpec, settings: dict[str, Any]) -> None:
    """An unknown key and a wrong-typed value are each refused with one ConfigError line naming the path."""
    where = f"stage {spec.name}"
    prefix = f"stages[0].{spec.name}"
    bad = {**settings, "no_such_setting": 1}
    try:
        spec.config_cls.coerce(bad, where=prefix)
    except ConfigError as err:
        if not _one_line(err) or f"{prefix}.no_such_setting" not in str(err):
            _fail(where, "unknown key", f"the error must be one line naming {prefix}.no_such_setting, got {err!r}")
    else:
        _fail(where, "unknown key", "an unknown key was accepted (a misspelt setting would be silently ignored)")
    refused = 0
    for field, info in spec.config_cls.model_fields.items():
        if info.annotation in (Any, object):
            continue
        try:
            spec.config_cls.coerce({**settings, field: object()}, where=prefix)
        except ConfigError as err:
            refused += 1
            if not _one_line(err) or f"{prefix}.{field}" not in str(err):
                _fail(where, f"wrong type for {field}", f"the error must be one line naming {prefix}.{field}, "
                                                        f"got {err!r}")
        except Exception as err:  # noqa: BLE001 - whatever escaped is the finding
            _fail(where, f"wrong type for {field}", f"raised {type(err).__name__} instead of ConfigError: {err}")
        else:
            _fail(where, f"wrong type for {field}", "an arbitrary object was accepted")
    if spec.config_cls.model_fields and not refused:
        _fail(where, "wrong type", "no field refuses a value of the wrong type")


# --------------------------------------------------------------------------- checks: one stage on one model


@dataclasses.dataclass
class Case:
    """What a case needs: the model, the tiny data, the runner's context and where to write."""

    model: nn.Module
    data: Any
    ctx: Any
    stage: Any
    image_size: int
    tmp: Path


def tiny_data(image_size: int) -> Any:
    """The digits bundle at ``image_size``, cut to its first TRAIN_IMAGES / TEST_IMAGES images."""
    full = load_data("digits", image_size=image_size)
    return dataclasses.replace(full, train=Subset(full.train, range(TRAIN_IMAGES)),
                               test=Subset(full.test, range(TEST_IMAGES)))


def make_case(name: str, settings: dict[str, Any], role: str, tmp: Path, trained: dict[str, dict]) -> Case:
    """A fresh (briefly trained) model of ``role`` and the context the runner would give stage ``name``."""
    zoo, args, size = ZOO[role]
    data = tiny_data(size)
    model = create_model(zoo, num_classes=data.num_classes, in_channels=data.in_channels, **args)
    model.load_state_dict(trained[role])
    set_data_spec(model, data_spec(data, None, size))
    model.eval()
    recipe = parse_recipe({"name": f"conformance-{name}", "model": zoo, "model_args": args, "image_size": size,
                           "train": TRAIN, "stages": [{name: settings}]})
    example = torch.zeros(1, *data.input_shape)
    ctx = stage_context(recipe, data, example, RunPaths(tmp), copy.deepcopy(model), 1, recipe.stages[0],
                        progress=False, resume=False, kept=mask_hooks())
    return Case(model, data, ctx, recipe.stages[0], size, tmp)


def apply_stage(spec: StageSpec, case: Case, role: str) -> StageOutput | None:
    """Apply the stage as the runner does (apply, then finalize); None when it refused as :data:`REFUSALS` says."""
    where = f"stage {spec.name} on {role}"
    expected = REFUSALS.get((spec.name, role))
    try:
        with kept_global_state(where):
            output = spec.apply(case.model, case.stage.config, case.ctx)
            check_output(output, where)
            if output.finalize is not None:
                output = output.finalize(output.model)
                check_output(output, where + " (finalized)")
    except ContractError:
        raise
    except SlimkitError as err:
        if not _one_line(err):
            _fail(where, "refusal", f"must be one line, got {err!r}")
        if expected is None:
            _fail(where, "applies", f"refused: {err} (if it cannot apply, add it to REFUSALS)")
        if expected.lower() not in str(err).lower():
            _fail(where, "refusal", f"expected the reason to mention {expected!r}, got: {err}")
        return None
    except Exception as err:  # noqa: BLE001 - whatever escaped is the finding
        first = (str(err).strip().splitlines() or [""])[0][:300]
        _fail(where, "applies", f"raised {type(err).__name__}: {first} (a stage that cannot apply must refuse "
                                "with a one-line slimkit error)")
    if expected is not None:
        _fail(where, "refusal", f"REFUSALS expects a refusal ({expected!r}) but the stage applied; remove the entry")
    return output


def _global_state() -> dict[str, Any]:
    return {"torch threads": torch.get_num_threads(), "quantized engine": torch.backends.quantized.engine}


@contextmanager
def kept_global_state(where: str):
    """The block must leave torch's thread count and quantized engine as it found them (restored either way)."""
    before = _global_state()
    try:
        yield
    finally:
        after = _global_state()
        torch.set_num_threads(before["torch threads"])
        torch.backends.quantized.engine = before["quantized engine"]
    changed = [f"{key} {before[key]!r} -> {after[key]!r}" for key in before if before[key] != after[key]]
    if changed:
        _fail(where, "global state", f"left changed: {', '.join(changed)} (set it in a context manager that "
                                     "restores it)")


def check_output(output: Any, where: str) -> None:
    """The fields of a :class:`StageOutput` hold what the contract says they hold."""
    if not isinstance(output, StageOutput):
        _fail(where, "output", f"returned {type(output).__name__}, not a StageOutput")
    if not isinstance(output.model, nn.Module):
        _fail(where, "output.model", f"is {type(output.model).__name__}, not an nn.Module")
    if output.phase not in PHASES:
        _fail(where, "phase", f"must be one of {', '.join(PHASES)}, got {output.phase!r}")
    try:
        json.dumps(output.details, allow_nan=False)
    except (TypeError, ValueError) as err:
        _fail(where, "details", f"are not plain JSON ({err})")
    if output.stored_bytes is not None and (isinstance(output.stored_bytes, bool)
                                            or not isinstance(output.stored_bytes, int) or output.stored_bytes <= 0):
        _fail(where, "stored_bytes", f"must be a positive int or None, got {output.stored_bytes!r}")
    if output.accuracy is not None and not (isinstance(output.accuracy, (int, float))
                                            and math.isfinite(output.accuracy) and 0 <= output.accuracy <= 100):
        _fail(where, "accuracy", f"must be a percentage or None, got {output.accuracy!r}")
    if output.engine is not None and not (isinstance(output.engine, str) and output.engine):
        _fail(where, "engine", f"must be a non-empty name or None, got {output.engine!r}")
    if output.latency_ms is not None and not (isinstance(output.latency_ms, (int, float)) and output.latency_ms > 0):
        _fail(where, "latency_ms", f"must be positive or None, got {output.latency_ms!r}")
    if output.hooks is not None and not isinstance(output.hooks, TrainHooks):
        _fail(where, "hooks", f"must be TrainHooks or None, got {type(output.hooks).__name__}")
    if not isinstance(output.persistent_hooks, bool):
        _fail(where, "persistent_hooks", f"must be a bool, got {output.persistent_hooks!r}")
    for key, path in (output.artifacts or {}).items():
        if not (isinstance(key, str) and isinstance(path, str) and Path(path).is_file()):
            _fail(where, "artifacts", f"{key!r}: {path!r} is not a written file")
    if output.finalize is not None and not callable(output.finalize):
        _fail(where, "finalize", "must be callable or None")


def check_reloads(model: nn.Module, data: Any, path: Path, where: str) -> float:
    """``model`` saves (:func:`save_model`), loads (:func:`load_model`), gives the same outputs and accuracy."""
    model.eval()
    try:
        save_model(model, path)
    except Exception as err:  # noqa: BLE001
        _fail(where, "saves", f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
    try:
        loaded = load_model(path)
    except Exception as err:  # noqa: BLE001
        _fail(where, "loads", f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
    x = torch.stack([data.test[i][0] for i in range(16)])
    with torch.inference_mode():
        before, after = model(x), loaded(x)
    if before.shape != after.shape:
        _fail(where, "reloads", f"outputs of shape {tuple(before.shape)} became {tuple(after.shape)}")
    scale = float(before.abs().max()) or 1.0
    if not torch.allclose(before, after, rtol=1e-4, atol=1e-5 * scale):
        diff = float((before - after).abs().max())
        _fail(where, "reloads", f"the loaded model's outputs differ by up to {diff:.3g} (scale {scale:.3g}); "
                                "something the model needs is not in its saved file")
    accuracy, again = evaluate(model, data.test), evaluate(loaded, data.test)
    if accuracy != again:
        _fail(where, "evaluates", f"accuracy {accuracy:.2f} % became {again:.2f} % after saving and loading")
    return accuracy


def check_stage_on_model(spec: StageSpec, settings: dict[str, Any], role: str, tmp: Path,
                         trained: dict[str, dict]) -> StageOutput | None:
    """Everything a stage must do on one model; returns its output (None: refused as expected)."""
    case = make_case(spec.name, settings, role, tmp, trained)
    output = apply_stage(spec, case, role)
    if output is not None:
        check_reloads(output.model, case.data, tmp / f"{spec.name}-{role}.pt", f"stage {spec.name} on {role}")
    return output


# --------------------------------------------------------------------------- checks: in the runner


def _no_figures(monkeypatch) -> None:
    """The runner writes report.json and report.md for every stage as always; the plots (a second or more
    each with matplotlib, the same code for every stage) are left out to keep the suite fast."""
    import slimkit.report as report

    real = report.write_report
    monkeypatch.setattr(report, "write_report", lambda run_dir, rep, *, figures=True: real(run_dir, rep,
                                                                                            figures=False))


def check_in_runner(name: str, settings: dict[str, Any], tmp: Path, role: str = "chain") -> dict[str, Any]:
    """``run_recipe`` with just this stage and a one-step fine-tune: the row is complete, JSON, and reloads."""
    where = f"stage {name} in the runner ({role})"
    zoo, args, size = ZOO[role]
    recipe = parse_recipe({"name": f"conformance-{name}", "model": zoo, "model_args": args, "image_size": size,
                           "train": TRAIN, "latency_runs": 1,
                           "stages": [{"name": "under-test", name: settings, "finetune": {"epochs": 1}}]})
    try:
        report = run_recipe(recipe, tmp, progress=False, log=lambda _m: None)
    except SlimkitError as err:
        _fail(where, "runs", f"refused: {err}")
    baseline, row = report["stages"][0], report["stages"][-1]
    missing = sorted(set(baseline) - set(row))
    if missing:
        _fail(where, "report row", f"lacks the fields {', '.join(missing)} that the baseline row has")
    if row["phase"] not in PHASES:
        _fail(where, "phase", f"the row's phase must be one of {', '.join(PHASES)}, got {row['phase']!r}")
    try:
        plain = json.loads(json.dumps(row, allow_nan=False))
    except (TypeError, ValueError) as err:
        _fail(where, "report row", f"is not plain JSON ({err})")
    written = json.loads((tmp / "report.json").read_text())["stages"][-1]
    if written != plain:
        changed = sorted(k for k in plain if written.get(k) != plain[k])
        _fail(where, "report.json", f"the written row differs from the returned one in {', '.join(changed)}")
    for field in ("params", "nonzeros", "macs", "bytes"):
        if not (isinstance(row[field], int) and row[field] >= 0):
            _fail(where, "report row", f"{field} must be a count, got {row[field]!r}")
    saved = RunPaths(tmp).stage_model(1, "under-test")
    try:
        loaded = load_model(saved)
    except Exception as err:  # noqa: BLE001
        _fail(where, "loads", f"{saved.name}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
    data = load_data("digits", image_size=size)
    accuracy = round(evaluate(loaded, data.test), 4)
    if row["engine"] == "pytorch-eager" and accuracy != row["accuracy"]:
        _fail(where, "evaluates", f"the saved model scores {accuracy} %, the row says {row['accuracy']} %")
    return row


# --------------------------------------------------------------------------- the generated tests

STAGE_NAMES = STAGES.names()


def trained_states() -> dict[str, dict]:
    """Each zoo model after one full-batch step on the tiny split (so that predictions differ between inputs)."""
    torch.manual_seed(0)
    states = {}
    for role, (zoo, args, size) in ZOO.items():
        data = tiny_data(size)
        model = create_model(zoo, num_classes=data.num_classes, in_channels=data.in_channels, **args)
        fit(model, data.train, TrainConfig(**TRAIN), progress=False)
        states[role] = {k: v.clone() for k, v in model.state_dict().items()}
    return states


@pytest.fixture(scope="module")
def trained() -> dict[str, dict]:
    return trained_states()


def test_the_zoo_and_the_tables_name_registered_things():
    for zoo, _args, _size in ZOO.values():
        assert zoo in MODELS, f"ZOO names {zoo!r}, which is not a registered model"
    for name in SETTINGS:
        assert name in STAGES, f"SETTINGS names {name!r}, which is not a registered stage"
    for name, role in REFUSALS:
        assert name in STAGES and role in ZOO, f"REFUSALS names ({name!r}, {role!r}), which is not a case"
    assert set(PHASES) == {"simulated", "materialized"}


def test_phase_is_required_by_the_contract():
    """A stage must say which phase its model is in: StageOutput has no default phase to fall back on."""
    field = next(f for f in dataclasses.fields(StageOutput) if f.name == "phase")
    assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, (
        f"StageOutput.phase defaults to {field.default!r}; a stage that forgets it claims that phase")


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_config(name):
    check_config(STAGES.get(name), stage_settings(name))


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_bad_config_is_one_line(name):
    check_bad_config(STAGES.get(name), stage_settings(name))


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_bad_config_is_one_line_from_the_command(name, tmp_path, capsys, monkeypatch):
    """``slimkit compress --recipe bad.yaml`` prints one error line and exits 2, before any training."""
    import yaml

    from slimkit.cli import main

    monkeypatch.chdir(tmp_path)
    bad = {"name": "bad", "model": "plaincnn-2", "stages": [{name: {**stage_settings(name), "no_such_setting": 1}}]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["compress", "--recipe", "bad.yaml", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"stages[0].{name}.no_such_setting" in err, err


@pytest.mark.parametrize("role", list(ZOO))
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_on_model(name, role, tmp_path, trained):
    check_stage_on_model(STAGES.get(name), stage_settings(name), role, tmp_path, trained)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_in_the_runner(name, tmp_path, monkeypatch):
    _no_figures(monkeypatch)
    check_in_runner(name, stage_settings(name), tmp_path)


# --------------------------------------------------------------------------- the checks catch a broken stage


class _Loose(Config):
    """A config that accepts any key: a misspelt setting would vanish."""

    model_config = {**Config.model_config, "extra": "allow"}


class _NoSettings(Config):
    """No settings."""


def _no_phase(model, config, ctx):
    return StageOutput(model=model, phase=None)


def _claims_a_phase_that_does_not_exist(model, config, ctx):
    return StageOutput(model=model, phase="pruned")


def _tensor_details(model, config, ctx):
    return StageOutput(model=model, phase="simulated", details={"kept": torch.tensor(0.5)})


def _hook_that_is_not_saved(model, config, ctx):
    """A 'technique' held by a forward hook: the saved file does not carry it, so the loaded model differs."""
    model.register_forward_hook(lambda module, inputs, output: -output)
    return StageOutput(model=model, phase="simulated")


def _leaves_threads_changed(model, config, ctx):
    torch.set_num_threads(torch.get_num_threads() + 1)
    return StageOutput(model=model, phase="materialized")


def _raw_error(model, config, ctx):
    return model.no_such_attribute


@contextmanager
def registered(name: str, fn, config_cls: type[Config] = _NoSettings):
    """``fn`` registered as stage ``name`` for the ``with`` block only."""
    with STAGES.temporarily(name, StageSpec(name, config_cls, fn, "a deliberately broken stage")) as spec:
        yield spec
    assert name not in STAGES


@pytest.mark.parametrize(("fn", "message"), [
    (_no_phase, "phase: must be one of simulated, materialized, got None"),
    (_claims_a_phase_that_does_not_exist, "phase: must be one of simulated, materialized, got 'pruned'"),
    (_tensor_details, "details: are not plain JSON"),
    (_hook_that_is_not_saved, "reloads: the loaded model's outputs differ"),
    (_raw_error, "applies: raised AttributeError"),
    (_leaves_threads_changed, "global state: left changed: torch threads 1 -> 2"),
])
def test_the_checks_catch_a_broken_stage(fn, message, monkeypatch, tmp_path, trained):
    with registered("broken-for-test", fn) as spec:
        with pytest.raises(ContractError, match=rf"stage broken-for-test on lenet: {message}"):
            check_stage_on_model(STAGES.get("broken-for-test"), {}, "lenet", tmp_path, trained)
        assert STAGES.get("broken-for-test") is spec


def test_the_checks_catch_a_config_that_accepts_unknown_keys(monkeypatch):
    with registered("loose-for-test", lambda m, c, x: StageOutput(model=m, phase="simulated"),
                    _Loose) as spec:
        with pytest.raises(ContractError, match="stage loose-for-test: unknown key: an unknown key was accepted"):
            check_bad_config(spec, {})


def test_the_runner_check_catches_a_stage_whose_saved_model_does_not_score_its_row(monkeypatch, tmp_path):
    _no_figures(monkeypatch)
    with registered("broken-for-test", _hook_that_is_not_saved):
        with pytest.raises(ContractError, match=r"stage broken-for-test in the runner \(chain\): evaluates: "
                                                r"the saved model scores"):
            check_in_runner("broken-for-test", {}, tmp_path)
