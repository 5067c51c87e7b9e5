"""Every public pruning verb keeps one contract: ``verb_(model, example_inputs, config, **data) -> Report``.

Each verb is called on the same small conv net with ``example_inputs`` as a tensor and as a
tuple of tensors; the report's common fields are checked against real measurements of the
model before and after, and both spellings must give the same report.
"""

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.exceptions import ConfigError
from slimkit.prune import apply_structured_, iterative_prune_, magnitude_prune_, plan_structured, structured_
from slimkit.prune.dsd import dsd_, fit_train
from slimkit.prune.l0 import add_l0_gates_, fold_l0_
from slimkit.prune.reconstruction import reconstruct_prune_
from slimkit.prune.second_order import lobs_prune_, obd_prune_
from slimkit.reports import ModelSize, Report
from slimkit.train import TrainConfig, fit

X = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
DATA = TensorDataset(torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2)),
                     torch.arange(32) % 3)
BATCHES = [(DATA.tensors[0][:16], DATA.tensors[1][:16]), (DATA.tensors[0][16:], DATA.tensors[1][16:])]
TRAIN = TrainConfig(epochs=1, lr=0.01, batch_size=16)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3)).eval()


def finetune(model, hooks=None, epochs=None):
    return fit(model, DATA, TRAIN if epochs is None else TRAIN.model_copy(update={"epochs": epochs}), hooks,
               progress=False)


def gated_channels(model: nn.Module) -> None:
    """L0 channel gates on the model, three of the first layer's closed (the fold cuts them)."""
    add_l0_gates_(model, X, {"target": "channels"})
    gate = model[1].l0_gate
    alpha = gate.log_alpha.detach().clone()
    alpha[[0, 3, 5]] = -10.0
    gate.set_log_alpha_(alpha)


def structured_in_two_steps(model, x):
    return apply_structured_(model, x, plan_structured(model, x, {"ratio": 0.5}))


#: verb -> (setup before the call or None, the call, how the size must move: "masks", "smaller", None)
VERBS = {
    "magnitude_prune_": (None, lambda m, x: magnitude_prune_(m, x, {"sparsity": 0.5}), "masks"),
    "iterative_prune_": (None, lambda m, x: iterative_prune_(m, x, {"sparsity": 0.6, "rounds": 2,
                                                                    "round_epochs": 1}, finetune=finetune), "masks"),
    "obd_prune_": (None, lambda m, x: obd_prune_(m, x, {"sparsity": 0.5}, batches=BATCHES), "masks"),
    "lobs_prune_": (None, lambda m, x: lobs_prune_(m, x, {"sparsity": 0.5, "rounds": 1}, batches=BATCHES), "masks"),
    "structured_": (None, lambda m, x: structured_(m, x, {"ratio": 0.5, "criterion": "taylor"}, batches=BATCHES),
                    "smaller"),
    "apply_structured_": (None, structured_in_two_steps, "smaller"),
    "reconstruct_prune_": (None, lambda m, x: reconstruct_prune_(m, x, {"method": "thinet", "ratio": 0.5},
                                                                 batches=BATCHES), "smaller"),
    "dsd_": (None, lambda m, x: dsd_(m, x, {"sparsity": 0.5}, train=fit_train(DATA, progress=False),
                                     train_config=TRAIN), None),
    "add_l0_gates_": (None, lambda m, x: add_l0_gates_(m, x, {"target": "weights"}), None),
    "fold_l0_": (gated_channels, lambda m, x: fold_l0_(m, x), "smaller"),
}


def run(verb: str, form: str) -> tuple[nn.Module, ModelSize, Report]:
    setup, call, _ = VERBS[verb]
    model = net()
    if setup is not None:
        setup(model)
    before = ModelSize.of(model, X)
    torch.manual_seed(0)
    report = call(model, X if form == "tensor" else (X,))
    return model, before, report


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_returns_a_report_for_a_tensor_and_for_a_tuple(verb):
    reports = {}
    for form in ("tensor", "tuple"):
        model, before, report = run(verb, form)
        assert isinstance(report, Report)
        assert report.verb == ("structured_" if verb == "apply_structured_" else verb)
        assert report.before == before and report.after == ModelSize.of(model, X)
        names = {n for n, _ in net().named_modules()}
        assert report.changed and set(report.changed) <= names, report.changed
        assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in report.skipped.items())
        data = json.loads(json.dumps(report.to_dict()))
        assert data["verb"] == report.verb and data["after"] == dataclasses.asdict(report.after)
        assert data["changed"] == report.changed and data["skipped"] == report.skipped
        reports[form] = data
    assert reports["tensor"] == reports["tuple"]
    move = VERBS[verb][2]
    if move == "masks":
        assert report.after.params == report.before.params and report.after.nonzeros < report.before.nonzeros
    elif move == "smaller":
        assert report.after.params < report.before.params and report.after.macs < report.before.macs
        assert report.after.bytes < report.before.bytes


class TwoInputs(nn.Module):
    """``head(conv_a(a) + conv_b(b))``: a model that takes a tuple of inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.conv_b = nn.Conv2d(1, 4, 3), nn.Conv2d(2, 4, 3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv_a(a) + self.conv_b(b))


def test_mask_verbs_measure_a_model_with_two_inputs():
    model = TwoInputs()
    inputs = (torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 8, 8))
    reference = ModelSize.of(copy.deepcopy(model), inputs)
    report = magnitude_prune_(model, inputs, {"sparsity": 0.5})
    assert report.before == reference and report.after.macs == reference.macs
    assert set(report.changed) == {"conv_a", "conv_b", "head.1"} and report.sparsity == 0.5


@pytest.mark.parametrize("bad", ["x", [1, 2], ()])
def test_bad_example_inputs_are_one_line(bad):
    with pytest.raises(ConfigError, match="^example_inputs must be a Tensor or a tuple of Tensors") as err:
        magnitude_prune_(net(), bad, {"sparsity": 0.5})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="^example_inputs must be a Tensor or a tuple of Tensors"):
        structured_(net(), bad, {"ratio": 0.5})
