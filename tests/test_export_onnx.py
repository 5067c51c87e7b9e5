"""ONNX export with slimkit's grids: ONNX Runtime int8 agrees with the fake-quant simulation."""

import pytest
import torch
from torch import nn

from slimkit.export import OnnxRunner, choose_engine, export_onnx
from slimkit.quantize.uniform import quantize_


def _tiny():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 14 * 14, 10))


@pytest.fixture(scope="module")
def digits():
    from slimkit.data import load_data

    return load_data("digits")


@pytest.fixture(scope="module")
def trained_lenet(digits):
    from slimkit.models import create_model
    from slimkit.train import fit

    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, in_channels=1)
    return fit(model, digits.train, {"epochs": 2, "optimizer": "adam", "lr": 1e-3}, progress=False).eval()


@pytest.mark.parametrize("per_channel", [True, False])
def test_onnx_int8_agrees_with_fakequant(trained_lenet, digits, tmp_path, per_channel):
    import copy

    from slimkit.train import predict

    model = copy.deepcopy(trained_lenet)
    quantize_(model, torch.zeros(1, 1, 28, 28), {"per_channel": per_channel}, calibration=digits.train)
    sim_logits, labels = predict(model, digits.test)
    path = export_onnx(model, sim_logits.new_zeros(1, 1, 28, 28), tmp_path / "model.int8.onnx")
    ort_logits, _ = OnnxRunner(path).predict(digits.test)
    agreement = float((ort_logits.argmax(1) == sim_logits.argmax(1)).float().mean())
    assert agreement >= 0.99
    fp32_path = export_onnx(trained_lenet, sim_logits.new_zeros(1, 1, 28, 28), tmp_path / "model.fp32.onnx")
    assert path.stat().st_size < 0.3 * fp32_path.stat().st_size


def test_tiny_model_exports_integer_weights(tmp_path):
    import onnx

    model = _tiny().eval()
    x = torch.randn(16, 1, 28, 28)
    quantize_(model, x, {}, calibration=[x])
    path = export_onnx(model, x[:1], tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    int_inits = [i for i in graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                 and len(i.dims) > 1]
    assert len(int_inits) == 3  # two convs + one linear stored as int8 codes
    out = OnnxRunner(path)(x)
    assert (out.argmax(1) == model(x).argmax(1)).float().mean() >= 0.9


def test_export_refuses_low_bit_activations(tmp_path):
    from slimkit.exceptions import ConfigError

    model = _tiny().eval()
    x = torch.randn(4, 1, 28, 28)
    quantize_(model, x, {"act_bits": 4}, calibration=[x])
    with pytest.raises(ConfigError, match="act_bits"):
        export_onnx(model, x[:1], tmp_path / "m.onnx")


def test_choose_engine_prefers_fastest_meeting_target():
    results = {"a": {"integer": True, "accuracy": 90.0, "latency_ms": 1.0},
               "b": {"integer": True, "accuracy": 95.0, "latency_ms": 2.0},
               "torch-fp32": {"integer": False, "accuracy": 96.0, "latency_ms": 3.0}}
    assert choose_engine(results, 94.0)[0] == "b"
    assert choose_engine(results, 80.0)[0] == "a"
    assert choose_engine(results, 99.0)[0] is None


def _saturating_layer(kind: str):
    """A layer whose weights all sit at the grid's ends and whose inputs near the top of their range:
    the worst case for int16 pair sums (255 * 127 * 2 > 32767)."""
    torch.manual_seed(0)
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(64, 8, bias=False)), torch.rand(32, 64) * 0.2 + 0.8
    else:
        model, x = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1, bias=False)), torch.rand(32, 16, 6, 6) * 0.2 + 0.8
    with torch.no_grad():
        model[0].weight.copy_(torch.sign(torch.randn_like(model[0].weight)))
    return model.eval(), x


def _ort_error(model, x, tmp_path) -> float:
    with torch.no_grad():
        sim = model(x)
    path = export_onnx(model, x[:1], tmp_path / "m.onnx")
    return float((OnnxRunner(path)(x) - sim).abs().max() / sim.abs().max())


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_reduced_range_int8_runs_exactly_in_onnx_runtime(tmp_path, kind):
    model, x = _saturating_layer(kind)
    report = quantize_(model, x, {"reduce_range": True}, calibration=[x])
    codes, _, _ = model[0].quantized_weight()
    assert report.layers["0"]["bits"] == 7 and int(codes.abs().max()) == 63
    assert _ort_error(model, x, tmp_path) < 1e-4


def test_full_range_int8_saturates_on_cpus_without_vnni(tmp_path):
    from slimkit.quantize.cpu import int8_dot_saturates

    saturates, why = int8_dot_saturates()
    if not saturates:
        pytest.skip(why)
    model, x = _saturating_layer("linear")
    quantize_(model, x, {"reduce_range": False}, calibration=[x])
    assert _ort_error(model, x, tmp_path) > 0.05  # what reduce_range: auto protects against on this CPU


def test_reduce_range_auto_follows_the_cpu():
    from slimkit.quantize.cpu import int8_dot_saturates

    model, x = _saturating_layer("linear")
    report = quantize_(model, x, {}, calibration=[x])
    assert report.reduce_range is int8_dot_saturates()[0]
    assert report.reduce_range_reason.startswith("reduce_range: auto")
    assert report.layers["0"]["bits"] == (7 if report.reduce_range else 8)
