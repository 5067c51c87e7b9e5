"""Quantization stages through the runner (int8, qat, binarize), sensitivity / auto bits, and
bit-packed storage of quantized and binary layers in the .slim container."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.deploy.stages import Int8StageConfig
from slimkit.encode import load, save
from slimkit.encode.container import read_state
from slimkit.exceptions import ConfigError
from slimkit.quantize import binarize_, quantize_
from slimkit.quantize.fake import quant_layers
from slimkit.quantize.packing import pack_bits, packed_nbytes, unpack_bits
from slimkit.quantize.sensitivity import Sensitivity, choose_bits, fold_copy, layer_sensitivity


# --- runner ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline_path(tmp_path_factory):
    """A LeNet-5 trained for one epoch on digits, saved once for every runner test."""
    from slimkit.data import load_data
    from slimkit.manifest import save_model
    from slimkit.models import create_model
    from slimkit.train import TrainConfig, fit

    data = load_data("digits")
    model = create_model("lenet5", num_classes=data.num_classes, in_channels=data.in_channels)
    fit(model, data.train, TrainConfig(epochs=1, lr=0.01, seed=0), progress=False)
    path = tmp_path_factory.mktemp("baseline") / "lenet5.pt"
    save_model(model.eval(), path)
    return str(path)


def _run(tmp_path, baseline, stage: dict):
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import parse_recipe

    recipe = parse_recipe({"name": "q-test", "model": "lenet5", "data": "digits", "baseline": baseline,
                           "train": {"epochs": 1, "lr": 0.01}, "latency_runs": 3, "stages": [stage]})
    report = run_recipe(recipe, tmp_path / "run", progress=False, log=lambda _m: None)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["stages"][-1]["name"] == report["stages"][-1][
        "name"]
    return report["stages"][0], report["stages"][-1]


def test_int8_stage_reports_deployed_integer_model(tmp_path, baseline_path):
    base, row = _run(tmp_path, baseline_path, {"name": "int8", "int8": {"bits": 8, "engines": ["onnxruntime"],
                                                                          "max_drop": 100, "reduce_range": False}})
    assert row["engine"] == "onnxruntime-int8"
    assert row["accuracy"] == pytest.approx(row["details"]["engines"]["onnxruntime-int8"]["accuracy"], abs=1e-3)
    assert abs(row["accuracy"] - base["accuracy"]) < 3.0
    assert row["bytes_counted"] == "stored artifact" and 3.5 < row["ratio"] < 4.1
    onnx_path = row["artifacts"]["model.int8.onnx"]
    assert onnx_path.endswith("model.int8.onnx") and (tmp_path / "run").exists()
    import os

    assert os.path.isfile(onnx_path)
    slim = row["artifacts"]["model.slim"]
    assert os.path.getsize(slim) == row["details"]["slim_bytes"]
    # a one-epoch model; the 99 % agreement of a trained one is asserted in test_export_onnx. The exact
    # figure moves with the torch thread count earlier tests leave behind; a wrong model agrees on ~10 %.
    assert row["details"]["engines"]["onnxruntime-int8"]["agreement_with_fakequant"] >= 0.90
    assert [r["bits"] for r in row["details"]["layers"]] == [8, 8, 8, 8]
    # the combined effect against the dense fp32 baseline, timed in the same engine
    dense = row["details"]["vs_dense_fp32"]
    assert dense["dense_engine"] == "onnxruntime-fp32" and dense["deployed_engine"] == "onnxruntime-int8"
    assert dense["dense_fp32_bytes"] == 431_080 * 4 and dense["deployed_bytes"] == row["bytes"]
    assert dense["speedup"] == pytest.approx(dense["dense_fp32_ms"] / dense["deployed_ms"])
    # the first stage's float input is the baseline: its ORT fp32 timing is reused, not measured again
    assert dense["dense_fp32_ms"] == row["details"]["engines"]["onnxruntime-fp32"]["latency_ms"]
    markdown = (tmp_path / "run" / "report.md").read_text()
    ort = row["details"]["engines"]["onnxruntime-int8"]
    assert "## int8: engines" in markdown and "Against the dense fp32 baseline: onnxruntime-int8" in markdown
    ort_row = f"| onnxruntime-int8 | yes | {ort['accuracy']:.2f} | {ort['latency_ms']:.3f} | {ort['file_bytes']:,} |"
    assert ort_row in markdown
    assert "## int8: per layer" in (tmp_path / "run" / "report.md").read_text()


def test_qat_stage_finetunes_then_deploys(tmp_path, baseline_path):
    _, row = _run(tmp_path, baseline_path, {"name": "qat4", "qat": {"bits": 4, "engines": ["onnxruntime"],
                                                                      "max_drop": 100},
                                            "finetune": {"epochs": 1, "lr": 0.002}})
    assert row["engine"] == "onnxruntime-int8" and row["phase"] == "simulated"
    assert row["details"]["ptq_accuracy"] is not None
    assert all(r["bits"] == 4 for r in row["details"]["layers"])
    assert row["ratio"] > 6  # 4-bit codes: about 8x minus scales and biases
    assert (tmp_path / "run" / "stages" / "01" / "model.int8.onnx").is_file()


def test_binarize_stage_bwn(tmp_path, baseline_path):
    _, row = _run(tmp_path, baseline_path, {"name": "bwn", "binarize": {"mode": "bwn"},
                                            "finetune": {"epochs": 1, "optimizer": "adam", "lr": 0.001}})
    assert row["engine"] == "torch" and row["accuracy"] == pytest.approx(row["details"]["simulated_accuracy"])
    assert row["bytes"] < row["details"]["slim_bytes"] + 200 and row["ratio"] > 5
    assert set(row["details"]["layers"]) == {"conv2", "fc1"}


def test_reduced_range_int8_is_still_offered_to_torch_x86(tmp_path, baseline_path):
    _, row = _run(tmp_path, baseline_path, {"name": "int8", "int8": {
        "bits": 8, "engines": ["torch"], "max_drop": 100, "reduce_range": True}})
    details = row["details"]
    assert details["reduce_range"] is True and {r["bits"] for r in details["layers"]} == {7}
    assert "torch_skipped" not in details and "accuracy" in details["engines"]["torch-x86-int8"]


def test_int8_auto_bits_meets_budget_and_reports_sensitivity(tmp_path, baseline_path):
    _, row = _run(tmp_path, baseline_path, {"name": "auto", "int8": {
        "bits": "auto", "size_ratio": 6, "engines": ["onnxruntime"], "max_drop": 100, "sensitivity_samples": 128,
        "overrides": {"conv1": 8}, "reduce_range": False}})
    details = row["details"]
    assert details["auto_bits"]["planned_bytes"] <= details["auto_bits"]["budget_bytes"]
    assert set(details["sensitivity"]) == {"conv2", "fc1", "fc2"}  # conv1 pinned by the override
    bits = details["layer_bits"]
    assert bits["conv1"] == 8 and min(bits.values()) < 8
    assert details["auto_bits"]["predicted_kl"] > 0.0
    for name in ("conv2", "fc1", "fc2"):
        cells = details["sensitivity"][name]
        assert set(cells) == {"8", "4", "2"} and cells["2"]["kl"] > cells["8"]["kl"] > 0.0
    rows = {r["layer"]: r for r in details["layers"]}
    assert "drop@4b" not in rows["conv1"] and rows["fc1"]["kl@4b"] > 0.0 and "drop@4b" in rows["fc1"]
    assert "| drop@4b |" in (tmp_path / "run" / "report.md").read_text()  # columns of any row, not only the first
    assert "| kl@4b |" in (tmp_path / "run" / "report.md").read_text()
    # the planned size is the stored size (packed codes + scales + biases + activation grids)
    assert row["bytes"] == details["auto_bits"]["planned_bytes"]


# --- configs -----------------------------------------------------------------------------
@pytest.mark.parametrize("settings,needle", [
    ({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"bits": "auto"}, "exactly one"),
    ({"bits": "auto", "size_ratio": 4, "size_budget_bytes": 10}, "exactly one"),
    ({"bits": 8, "size_ratio": 4}, "only apply"), ({"bits": "auto", "size_ratio": 4, "auto_bits": [8, 1]}, "auto_bits"),
    ({"observer": "kl"}, "observer"),
])
def test_bad_int8_configs_fail_with_one_line(settings, needle):
    with pytest.raises(ConfigError) as err:
        Int8StageConfig.coerce(settings, where="stages[0].int8")
    message = str(err.value)
    assert needle in message and "stages[0].int8" in message and "\n" not in message


# --- sensitivity -------------------------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def test_sensitivity_table_leaves_model_unchanged_and_grows_with_fewer_bits():
    model = fold_copy(_net())
    x = torch.randn(256, 1, 8, 8)
    before = model(x)
    table = layer_sensitivity(model, x, candidates=(8, 4, 2))
    assert set(table) == {"0", "3", "6", "8"} and all(set(r) == {8, 4, 2} for r in table.values())
    assert torch.equal(model(x), before) and not quant_layers(model)
    assert all(abs(r[8].drop) <= 2.0 for r in table.values())
    assert sum(r[2].drop for r in table.values()) >= sum(r[8].drop for r in table.values())
    assert all(r[2].kl > r[4].kl > r[8].kl > 0.0 for r in table.values())


def test_sensitivity_on_a_dataset_uses_its_labels_and_the_same_samples_for_every_trial():
    model = fold_copy(_net())
    x = torch.randn(256, 1, 8, 8)
    wrong = (model(x).argmax(1) + 1) % 4  # labels the float model never predicts: float accuracy 0 %
    table = layer_sensitivity(model, torch.utils.data.TensorDataset(x, wrong), candidates=(2,), batch_size=16)
    by_tensor = layer_sensitivity(model, x, candidates=(2,))
    assert max(r[2].drop for r in by_tensor.values()) > 0  # 2 bits changes predictions: agreement drops
    assert max(r[2].drop for r in table.values()) <= 0 < -min(r[2].drop for r in table.values())
    assert {n: r[2].kl for n, r in table.items()} == pytest.approx({n: r[2].kl for n, r in by_tensor.items()})


def _saturated_net():
    """Accuracy is 100 % at every width: class 0 has a +4 bias, above anything the weights add.

    Layer "0" has one weight of 8 per row on an input that is always 0: it changes no output
    but stretches the per-row min-max grid, so the live weights (|w| <= 0.25) are rounded
    coarsely at 8 bits and to zero at 4 and 2 (large error). Layer "2" has no outlier (small
    error). Per weight, layer "0"'s relative noise is the smaller (the exact outlier dominates
    ||W||^2): the all-zero accuracy column plus the weight-noise tie-break would lower it first.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16, bias=False), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        net[0].weight.uniform_(-0.25, 0.25)
        net[0].weight[:, 0] = 8.0
        net[2].weight.uniform_(-0.25, 0.25)
        net[2].bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    x = torch.rand(256, 16) * 2 - 1
    x[:, 0] = 0.0
    return net, x


def test_kl_ranks_layers_when_accuracy_saturates():
    from slimkit.quantize.sensitivity import weight_noise

    net, x = _saturated_net()
    table = layer_sensitivity(net, x, candidates=(8, 4, 2))
    assert all(cell.drop == 0.0 for row in table.values() for cell in row.values())
    for bits in (8, 4, 2):
        assert table["0"][bits].kl > 2 * table["2"][bits].kl > 0.0
    assert all(row[2].kl >= row[4].kl >= row[8].kl for row in table.values())
    assert weight_noise(net[0], 4) / net[0].weight.numel() < weight_noise(net[2], 4) / net[2].weight.numel()
    # lowering one layer 8 -> 4 bits fits the budget: the one whose outputs barely move goes first
    full = choose_bits(net, table, budget_bytes=10**9, act_bits=None).stored_bytes
    plan = choose_bits(net, table, budget_bytes=full - 1, act_bits=None)
    assert plan.bits == {"0": 8, "2": 4} and plan.predicted_drop == 0.0
    assert plan.predicted_kl == pytest.approx(table["0"][8].kl + table["2"][4].kl)
    assert "kl " in plan.steps[0] and "drop +0.00" in plan.steps[0]


@pytest.mark.parametrize("data,needle", [(torch.empty(0, 16), "at least one sample"),
                                         ([[0.0] * 16], "input tensor or a dataset")])
def test_bad_sensitivity_data_is_one_clear_line(data, needle):
    net, _ = _saturated_net()
    with pytest.raises(ConfigError, match=needle) as err:
        layer_sensitivity(net, data)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("budget_fraction", [0.9, 0.6, 0.35])
def test_choose_bits_meets_the_budget_exactly_as_stored(budget_fraction):
    model = fold_copy(_net())
    x = torch.randn(64, 1, 8, 8)
    table = layer_sensitivity(model, x, candidates=(8, 4, 2))
    at8 = choose_bits(model, table, budget_bytes=10**9)
    assert set(at8.bits.values()) == {8} and not at8.steps
    budget = int(at8.stored_bytes * budget_fraction)
    plan = choose_bits(model, table, budget_bytes=budget)
    assert plan.stored_bytes <= budget
    from slimkit.measure.storage import stored_bytes

    quantize_(model, x, {"bits": 8, "overrides": plan.overrides(), "reduce_range": False}, calibration=[x])
    assert stored_bytes(model) == plan.stored_bytes
    assert {n: m.bits for n, m in quant_layers(model).items()} == plan.bits


def _cells(drops, kls):
    return {b: Sensitivity(drop=d, kl=k) for b, d, k in zip((8, 4, 2), drops, kls)}


@pytest.mark.parametrize("table,lowered", [
    # KL ranks, even against the accuracy drop
    ({"0": _cells((0, 0, 0), (0, 5.0, 50)), "3": _cells((0, 0, 0), (0, 5.0, 50)),
      "6": _cells((0, 9.0, 90), (0, 0.1, 1.0)), "8": _cells((0, 0, 0), (0, 9.0, 90))}, "6"),
    # equal KL: the accuracy drop decides
    ({"0": _cells((0, 5.0, 50), (0, 1.0, 1.0)), "3": _cells((0, 5.0, 50), (0, 1.0, 1.0)),
      "6": _cells((0, 0.1, 1.0), (0, 1.0, 1.0)), "8": _cells((0, 9.0, 90), (0, 1.0, 1.0))}, "6"),
])
def test_choose_bits_lowers_the_least_sensitive_layer_first(table, lowered):
    model = fold_copy(_net())
    full = choose_bits(model, table, budget_bytes=10**9).stored_bytes
    plan = choose_bits(model, table, budget_bytes=full - 100)
    assert plan.bits == {n: 4 if n == lowered else 8 for n in table} and len(plan.steps) == 1


def test_choose_bits_unreachable_budget_is_one_clear_line():
    model = fold_copy(_net())
    table = {"6": {8: Sensitivity(0.0, 0.0), 2: Sensitivity(1.0, 0.1)}}
    with pytest.raises(ConfigError, match="cannot be met") as err:
        choose_bits(model, table, budget_bytes=100)
    assert "\n" not in str(err.value)


# --- bit-packed storage in the .slim container ---------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    for count in (1, 7, 64, 1001):
        codes = rng.integers(0, 2**bits, size=count).astype(np.uint8)
        blob = pack_bits(codes, bits)
        assert len(blob) == packed_nbytes(count, bits) == (count * bits + 7) // 8
        assert np.array_equal(unpack_bits(blob, bits, count), codes)


def _small():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 16, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel,symmetric", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_quantized_model_round_trips_through_the_container(tmp_path, bits, per_channel, symmetric, scale_dtype):
    model = _small()
    x = torch.randn(16, 1, 8, 8)
    quantize_(model, x, {"bits": bits, "per_channel": per_channel, "symmetric": symmetric, "scale_dtype": scale_dtype,
                      "overrides": {"0": 8}, "reduce_range": False}, calibration=[x])
    model.eval()
    infos = save(model, tmp_path / "q.slim")
    packed = {i.name: i for i in infos if i.kind == "packed"}
    assert set(packed) == {"0.weight", "3.weight", "6.weight", "8.weight"}
    assert packed["6.weight"].format == f"int{bits}"
    weights = model[6].weight.numel()
    # codes take bits/8 bytes per weight (+ scales, zero points and record framing)
    assert weights * bits // 8 < packed["6.weight"].bytes < weights * bits // 8 + 9 * 32 + 64
    loaded = load(tmp_path / "q.slim", model=_small())
    assert type(loaded[6]).__name__ == "QuantLinear" and loaded[6].bits == bits
    assert torch.equal(loaded(x), model(x))
    for name, layer in quant_layers(model).items():
        q0, s0, z0 = layer.quantized_weight()
        q1, s1, z1 = quant_layers(loaded)[name].quantized_weight()
        assert torch.equal(q0, q1) and torch.equal(s0, s1) and torch.equal(z0, z1)


@pytest.mark.parametrize("mode", ["bwn", "xnor"])
def test_binary_model_round_trips_at_one_bit(tmp_path, mode):
    model = _small()
    binarize_(model, torch.zeros(1, 1, 8, 8), {"mode": mode})
    model.eval()
    x = torch.randn(16, 1, 8, 8)
    infos = save(model, tmp_path / "b.slim")
    packed = {i.name: i for i in infos if i.kind == "packed"}
    assert set(packed) == {"3.weight", "6.weight"} and all(i.format == "binary" for i in packed.values())
    weights = model[6].weight.numel()
    assert weights // 8 <= packed["6.weight"].bytes <= weights // 8 + 4 * 32 + 64
    loaded = load(tmp_path / "b.slim", model=_small())
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-6, atol=1e-6)
    for name in ("3", "6"):
        assert torch.equal(torch.sign(loaded.get_submodule(name).weight), torch.where(
            model.get_submodule(name).weight >= 0, 1.0, -1.0))


def test_packed_record_damage_is_detected(tmp_path):
    model = _small()
    x = torch.randn(4, 1, 8, 8)
    quantize_(model, x, {"bits": 4}, calibration=[x])
    save(model, tmp_path / "q.slim")
    data = bytearray((tmp_path / "q.slim").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.slim").write_bytes(bytes(data))
    from slimkit.exceptions import CorruptFileError

    with pytest.raises(CorruptFileError, match="CRC"):
        read_state(tmp_path / "bad.slim")


def test_version_1_packed_records_still_decode():
    """A PACKED record as format version 1 wrote it (f32 scales, i32 zero points even when symmetric)."""
    import struct

    from slimkit.quantize.packed_record import decode_packed
    from slimkit.quantize.packing import to_unsigned

    q = np.array([[-127, 0, 5], [3, 127, -64]], dtype=np.int32)
    scale = np.array([0.01, 0.02], dtype="<f4")
    codes = pack_bits(to_unsigned(q, 8), 8)
    payload = (struct.pack("<BBBB", 0, 8, 1, 2) + struct.pack("<II", 2, 3) + struct.pack("<I", 2) + scale.tobytes()
               + struct.pack("<I", 2) + np.zeros(2, "<i4").tobytes() + struct.pack("<I", len(codes)) + codes)
    state = decode_packed(payload, "record 1 (fc.weight)", "fc.")
    expected = torch.from_numpy(q.astype(np.float32)) * torch.from_numpy(scale.copy()).reshape(-1, 1)
    assert torch.equal(state["fc.weight"], expected)
    assert torch.equal(state["fc.w_zero"], torch.zeros(2, dtype=torch.int32))
