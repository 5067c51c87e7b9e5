"""The verb contract for quantization, sharing, binarization, hashing, DCT and decomposition.

Every verb is ``verb_(model, example_inputs, config, **data) -> Report``: it takes a tensor or a
tuple of tensors, and its report names what changed and what was skipped, measures the model
before and after (equal to a fresh :meth:`ModelSize.of`) and serialises to JSON. The stored-bytes
rules these packages register give exactly the figures of the per-technique functions they
replace (the reference formulas below are those functions as they were).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from slimkit.decompose import apply_decomposition, decompose_, plan_decomposition
from slimkit.encode.dct import dct_compress_
from slimkit.exceptions import ConfigError
from slimkit.measure.size import state_dict_bytes
from slimkit.measure.storage import stored_bytes
from slimkit.models import create_model
from slimkit.quantize import binarize_, hash_weights_, prepare_qat_, quantize_, share_weights_
from slimkit.quantize.binary import binary_layers
from slimkit.quantize.fake import layer_stored_bytes, quant_layers
from slimkit.quantize.hashed import hashed_modules
from slimkit.reports import ModelSize, Report


def body() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4))


class TwoInputs(nn.Module):
    """``body(x) + gate(z)``: a model called with a tuple of two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.body = body()
        self.gate = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.gate(z)


X = torch.randn(4, 3, 6, 6)
Z = torch.randn(4, 2)

# verb name -> call(model, example_inputs); quantize_ / prepare_qat_ with float activations on the
# two-input model (calibration batches are single tensors), calibrated on the single-input one
VERBS = {
    "quantize_": lambda m, ex: quantize_(m, ex, {"reduce_range": False, "act_bits": None if isinstance(ex, tuple)
                                                 else 8}, calibration=None if isinstance(ex, tuple) else [X]),
    "prepare_qat_": lambda m, ex: prepare_qat_(m, ex, {"bits": 4, "act_bits": None if isinstance(ex, tuple) else 8},
                                               calibration=None if isinstance(ex, tuple) else [X]),
    "binarize_": lambda m, ex: binarize_(m, ex, {"mode": "xnor"}),
    "share_weights_": lambda m, ex: share_weights_(m, ex, {"conv_bits": 2, "linear_bits": 2, "max_iter": 20}),
    "hash_weights_": lambda m, ex: hash_weights_(m, ex, {"conv_ratio": 0.5, "linear_ratio": 0.25}),
    "dct_compress_": lambda m, ex: dct_compress_(m, ex, {"conv_bits": 2, "linear_bits": 2, "max_iter": 20}),
    "decompose_": lambda m, ex: decompose_(m, ex, {"method": "tucker", "rank": 0.5, "only_if_smaller": False}),
}


@pytest.mark.parametrize("inputs", ["tensor", "tuple"])
@pytest.mark.parametrize("verb", sorted(VERBS))
def test_verb_contract(verb, inputs):
    torch.manual_seed(0)
    model, example = (body(), X) if inputs == "tensor" else (TwoInputs(), (X, Z))
    original = copy.deepcopy(model)
    report = VERBS[verb](model, example)
    assert isinstance(report, Report) and report.verb == verb
    modules = dict(model.named_modules())
    assert report.changed and all(name in modules for name in report.changed)
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in report.skipped.items())
    assert not set(report.changed) & set(report.skipped)
    assert report.before == ModelSize.of(original, example)
    assert report.after == ModelSize.of(model, example)
    assert report.after.bytes == stored_bytes(model)
    plain = json.loads(json.dumps(report.to_dict()))
    assert plain["verb"] == verb and plain["changed"] == report.changed
    assert plain["before"]["params"] == report.before.params and plain["after"]["macs"] == report.after.macs
    model.eval()(*((example,) if isinstance(example, torch.Tensor) else example))  # still runs


def test_decompose_plan_then_apply_is_the_verb():
    torch.manual_seed(0)
    model = body()
    twin = copy.deepcopy(model)
    settings = {"method": "tucker", "rank": 0.5, "only_if_smaller": False}
    plan = plan_decomposition(model, (X,), settings)
    assert set(plan.ranks) == {"0", "3"} and {"6", "8"} <= set(plan.skipped)
    assert torch.equal(model[0].weight, twin[0].weight) and isinstance(model[0], nn.Conv2d)  # planning changes nothing
    applied = apply_decomposition(model, X, plan)
    verb = decompose_(twin, X, settings)
    assert applied.to_dict() == verb.to_dict()
    torch.testing.assert_close(model(X), twin(X))


def test_decompose_errors_name_the_verb_not_a_recipe_path():
    with pytest.raises(ConfigError, match=r"^decompose\.layers: no layer"):
        decompose_(body(), X, {"method": "tucker", "layers": ["nothing*"]})
    with pytest.raises(ConfigError, match="example_inputs must be a Tensor or a tuple of Tensors"):
        decompose_(body(), [1, 2], {"method": "tucker"})


def test_quantize_refuses_missing_calibration_before_changing_the_model():
    model = body()
    with pytest.raises(ConfigError, match="no calibration data"):
        quantize_(model, X, {"bits": 8})
    assert not quant_layers(model) and isinstance(model[1], nn.BatchNorm2d)


# --- stored bytes: the registered rules give the figures of the functions they replaced ---------------


def quantized_bytes_before(model: nn.Module) -> int:
    """``slimkit.quantize.uniform.stored_bytes`` as it was."""
    layers = quant_layers(model)
    total = sum(layer_stored_bytes(layer) for layer in layers.values())
    for key, tensor in model.state_dict().items():
        if key.rpartition(".")[0] not in layers:
            total += tensor.numel() * tensor.element_size()
    return total


def binary_bytes_before(model: nn.Module) -> int:
    """``slimkit.quantize.binary.binary_stored_bytes`` as it was."""
    layers = binary_layers(model)
    total = 0
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf == "weight":
            total += (tensor.numel() + 7) // 8 + 4 * tensor.shape[0]
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def hashed_bytes_before(model: nn.Module) -> int:
    """``slimkit.quantize.hashed.hashed_stored_bytes`` as it was."""
    return state_dict_bytes(model) + 4 * len(hashed_modules(model))


ZOO = ["lenet5", "resnet20-cifar", "mobilenet-v1"]


def _zoo(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_channels=1).eval(), torch.randn(2, 1, 28, 28)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("settings", [{"bits": 8, "reduce_range": False},
                                      {"bits": 4, "symmetric": False, "scale_dtype": "float32", "fold_bn": False},
                                      {"bits": 2, "per_channel": False, "act_bits": None, "overrides": {"*fc*": 8}}])
def test_quantized_stored_bytes_unchanged(name, settings):
    model, x = _zoo(name)
    quantize_(model, x[:1], settings, calibration=[x])
    assert quant_layers(model)
    assert stored_bytes(model) == quantized_bytes_before(model)


@pytest.mark.parametrize("name", ZOO)
def test_qat_stored_bytes_unchanged(name):
    model, x = _zoo(name)
    report = prepare_qat_(model, x[:1], {"bits": 4}, calibration=[x])
    assert stored_bytes(model) == quantized_bytes_before(model) == report.after.bytes


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("mode", ["bwn", "xnor"])
def test_binary_stored_bytes_unchanged(name, mode):
    model, x = _zoo(name)
    binarize_(model, x[:1], {"mode": mode})
    assert stored_bytes(model) == binary_bytes_before(model)


@pytest.mark.parametrize("name", ZOO)
def test_hashed_stored_bytes_unchanged(name):
    model, x = _zoo(name)
    hash_weights_(model, x[:1], {"conv_ratio": 0.25, "linear_ratio": 0.1})
    assert stored_bytes(model) == hashed_bytes_before(model)
