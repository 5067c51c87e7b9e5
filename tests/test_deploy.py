"""slimkit.deploy: the package layering, the engine registry, typed engine results, the dense
comparison, the run directory's deployables and (with ``slimkit[executorch]``) ExecuTorch."""

import ast
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import slimkit
from slimkit.deploy import (
    ENGINES,
    EngineComparison,
    EngineResult,
    TorchRunner,
    choose_engine,
    compare_engines,
    publish_deployables,
    register_engine,
    vs_dense,
)
from slimkit.deploy.engines import EngineSpec
from slimkit.exceptions import ConfigError
from slimkit.quantize import quantize_

SRC = Path(slimkit.__file__).parent
LAYERED = ("quantize", "export", "encode", "deploy")


def _package_imports() -> dict[str, set[str]]:
    """slimkit subpackage -> the slimkit subpackages its modules import (module-level and inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).parts
        if len(parts) < 2:
            continue  # top-level modules (cli, pipeline, ...) are not packages of the layering
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                bits = name.split(".")
                if bits[0] == "slimkit" and len(bits) > 1 and bits[1] != parts[0]:
                    graph.setdefault(parts[0], set()).add(bits[1])
    return graph


def test_no_import_cycles_among_quantize_export_encode_deploy():
    graph = _package_imports()
    edges = {a: graph.get(a, set()) & set(LAYERED) for a in LAYERED}

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return b in seen

    cycles = [(a, b) for a, b in itertools.combinations(LAYERED, 2) if reaches(a, b) and reaches(b, a)]
    assert cycles == []
    assert edges["quantize"] == set()  # the techniques import none of the formats that depend on them
    assert edges["deploy"] == {"quantize", "encode"} and edges["export"] == {"deploy"}


@pytest.fixture(scope="module")
def digits():
    from slimkit.data import load_data

    return load_data("digits")


@pytest.fixture(scope="module")
def models(digits):
    """A one-epoch LeNet-5 (float) and its int8 fake-quant copy."""
    import copy

    from slimkit.models import create_model
    from slimkit.train import fit

    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, in_channels=1)
    fit(model, Subset(digits.train, range(512)), {"epochs": 1, "optimizer": "adam", "lr": 1e-3}, progress=False)
    q = copy.deepcopy(model.eval())
    quantize_(q, digits.train[0][0][None], {"reduce_range": True},
              calibration=[digits.train[i][0][None] for i in range(64)])
    return model.eval(), q


@pytest.fixture
def scratch_engine():
    """Registers engines for one test and removes them afterwards."""
    names = []

    def register(name, **kw):
        names.append(name)
        return register_engine(name, **kw)

    yield register
    for name in names:
        ENGINES.remove(name)


def test_one_registration_adds_an_engine_to_the_comparison(models, digits, tmp_path, scratch_engine):
    float_model, q = models

    @scratch_engine("compressed-sim", family="compressed", integer=True, fp32="torch-fp32")
    def _runs_the_model(inp):
        return TorchRunner(inp.model)

    test = Subset(digits.test, range(64))
    results = compare_engines(q, float_model, test, torch.zeros(1, 1, 28, 28), tmp_path, engines=("compressed",))
    assert list(results) == ["torch-fakequant", "compressed-sim"]
    mine = results["compressed-sim"]
    assert mine.accuracy == results["torch-fakequant"].accuracy and mine.agreement_with_fakequant == 1.0
    assert choose_engine(results, 0.0).engine == "compressed-sim"
    dense = vs_dense(results, "compressed-sim", float_model, torch.zeros(1, 1, 28, 28), tmp_path, 1000)
    assert dense.dense_engine == "torch-fp32" and dense.speedup == pytest.approx(dense.dense_fp32_ms / mine.latency_ms)


def test_onnxruntime_comparison_is_typed_and_round_trips(models, digits, tmp_path):
    float_model, q = models
    test = Subset(digits.test, range(128))
    results = compare_engines(q, float_model, test, torch.zeros(1, 1, 28, 28), tmp_path, engines=("onnxruntime",))
    assert list(results) == ["torch-fakequant", "onnxruntime-fp32", "onnxruntime-int8"]
    ort = results["onnxruntime-int8"]
    assert isinstance(ort, EngineResult) and ort.integer and ort.agreement_with_fakequant >= 0.95
    assert ort.file_bytes == Path(ort.path).stat().st_size < 0.3 * results["onnxruntime-fp32"].file_bytes
    assert EngineComparison.from_dict(results.to_dict()) == results
    assert choose_engine(results.to_dict(), 0.0) == choose_engine(results, 0.0)


def test_an_engine_that_cannot_run_is_a_result_with_its_reason(models, digits, tmp_path, scratch_engine):
    float_model, q = models

    @scratch_engine("broken-int8", family="broken", integer=True)
    def _broken(inp):
        raise RuntimeError("no kernel for this op\nsecond line")

    spec = EngineSpec("needs-pkg", "x", True, "model", _broken, requires=("slimkit_no_such_package",), extra="x")
    assert "slimkit_no_such_package" in spec.missing() and "slimkit[x]" in spec.missing()
    results = compare_engines(q, float_model, Subset(digits.test, range(16)), torch.zeros(1, 1, 28, 28), tmp_path,
                              engines=("broken",))
    assert results["broken-int8"].error == "RuntimeError: no kernel for this op" and not results["broken-int8"].ran
    assert choose_engine(results, 0.0).engine is None


def test_unknown_engine_family_in_a_recipe_is_one_line():
    from slimkit.deploy.stages import Int8StageConfig

    with pytest.raises(ConfigError, match="did you mean 'onnxruntime'"):
        Int8StageConfig.coerce({"engines": ["onnxruntme"]}, where="stages[0].int8")


def test_int8_stage_skips_engines_that_requantize_for_sub_8_bit_grids():
    from slimkit.deploy.stages import requantizes

    assert requantizes("torch") and requantizes("executorch") and not requantizes("onnxruntime")


def _row(engine, artifacts):
    return {"engine": engine, "artifacts": {k: str(v) for k, v in artifacts.items()}}


def test_run_deployables_and_the_file_to_ship(models, tmp_path):
    from slimkit.deploy import export_onnx, write_slim
    from slimkit.manifest import save_model

    float_model, q = models
    x = torch.zeros(1, 1, 28, 28)
    # a float final model: model.onnx is written and shipped
    float_run = tmp_path / "float"
    save_model(float_model, float_run / "model.pt")
    run = publish_deployables(float_run, float_model, _row("pytorch-eager", {}), x, 1_724_320)
    assert [f.name for f in run.files] == ["model.onnx", "model.pt"] and run.ship.name == "model.onnx"
    assert run.ship.bytes == (float_run / "model.onnx").stat().st_size
    # an int8 final stage: its artifacts come to the top level; the chosen engine's file ships
    int8_run = tmp_path / "int8"
    stage = int8_run / "stages" / "01"
    save_model(q, int8_run / "model.pt")
    artifacts = {"model.slim": write_slim(q, stage / "model.slim").path,
                 "model.int8.onnx": export_onnx(q, x, stage / "model.int8.onnx")}
    run = publish_deployables(int8_run, q, _row("onnxruntime-int8", artifacts), x, 1_724_320)
    assert {f.name for f in run.files} == {"model.int8.onnx", "model.slim", "model.pt"}
    assert (int8_run / "model.int8.onnx").read_bytes() == (stage / "model.int8.onnx").read_bytes()
    assert run.ship.name == "model.int8.onnx" and "model.onnx" in run.skipped
    assert run.ship_line().startswith(f"ship: {int8_run / 'model.int8.onnx'} ({run.ship.bytes:,} bytes, ")
    # another engine chosen (no file of its own): the .slim container ships
    assert publish_deployables(int8_run, q, _row("torch-x86-int8", artifacts), x).ship.name == "model.slim"
    assert type(run).from_dict(run.to_dict()) == run


executorch_missing = importlib.util.find_spec("executorch") is None


@pytest.mark.skipif(not executorch_missing, reason="executorch is installed")
def test_executorch_engine_without_the_package_is_one_line(models, digits, tmp_path):
    from slimkit.deploy.executorch import require_executorch

    with pytest.raises(ConfigError, match=r"executorch .*pip install 'slimkit\[executorch\]'"):
        require_executorch()
    float_model, q = models
    results = compare_engines(q, float_model, Subset(digits.test, range(8)), torch.zeros(1, 1, 28, 28), tmp_path,
                              engines=("executorch",))
    assert "slimkit[executorch]" in results["executorch-int8"].error


@pytest.mark.slow
@pytest.mark.skipif(executorch_missing, reason="needs the optional extra slimkit[executorch]")
def test_executorch_xnnpack_program_equals_pytorch(models, digits, tmp_path):
    from slimkit.deploy.executorch import PteRunner, export_pte

    float_model, _ = models
    test = Subset(digits.test, range(96))
    x = torch.zeros(1, 1, 28, 28)
    ref, _ = TorchRunner(float_model).predict(test)
    fp32 = PteRunner(export_pte(float_model, x, tmp_path / "m.pte"))
    logits, _ = fp32.predict(test)
    assert torch.allclose(logits, ref, atol=1e-4) and fp32.latency_ms(x) > 0
    # int8 through the XNNPACK quantizer: tests/test_cli_export.py::test_export_executorch_int8_check


def test_export_leaves_the_model_unchanged(models, tmp_path):
    from slimkit.deploy import export_model

    _, q = models
    before = {k: v.clone() for k, v in q.state_dict().items()}
    export_model(q, "int8-onnx", tmp_path / "q.int8.onnx", torch.zeros(1, 1, 28, 28))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
