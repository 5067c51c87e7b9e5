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
    quantize_(model, {"per_channel": per_channel}, calibration=digits.train)
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
    quantize_(model, {}, calibration=[x])
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
    quantize_(model, {"act_bits": 4}, calibration=[x])
    with pytest.raises(ConfigError, match="act_bits"):
        export_onnx(model, x[:1], tmp_path / "m.onnx")


def test_choose_engine_prefers_fastest_meeting_target():
    results = {"a": {"integer": True, "accuracy": 90.0, "latency_ms": 1.0},
               "b": {"integer": True, "accuracy": 95.0, "latency_ms": 2.0},
               "torch-fp32": {"integer": False, "accuracy": 96.0, "latency_ms": 3.0}}
    assert choose_engine(results, 94.0)[0] == "b"
    assert choose_engine(results, 80.0)[0] == "a"
    assert choose_engine(results, 99.0)[0] is None
