"""Search knobs for ONNX Runtime keep channel counts in multiples of 8, and a relative latency budget is judged by a
paired ratio against the baseline."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from slimkit.models import create_model
from slimkit.prune import structured_
from slimkit.recipe import parse_recipe
from slimkit.search.run import meets_latency_budget
from slimkit.search.space import apply_stages, build_space, choice_stages, kept_count, uniform_choice

X = torch.zeros(1, 1, 28, 28)


def _widths(model: nn.Module) -> tuple[int, ...]:
    return tuple(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def _build(name: str, base: nn.Module, knobs, choice, tmp_path) -> nn.Module:
    recipe = parse_recipe({"name": "x", "model": name, "stages": choice_stages(knobs, choice)})
    return apply_stages(copy.deepcopy(base), recipe, X, SimpleNamespace(train=[], test=None), tmp_path)


@pytest.mark.parametrize("name", ["resnet20-cifar", "mobilenet_v2"])
def test_every_channel_knob_setting_keeps_multiples_of_8(name, tmp_path):
    base = create_model(name, num_classes=10, in_channels=1).eval()
    assert all(w % 8 == 0 for w in _widths(base))
    knobs = build_space(base, X, ("channels",), (0.25, 0.5, 0.75), round_to=8)
    assert knobs and all(k.round_to == 8 for k in knobs)
    for i, knob in enumerate(knobs):
        seen = {_widths(base)}
        for index in range(1, len(knob.settings)):
            choice = tuple(index if j == i else 0 for j in range(len(knobs)))
            assert choice_stages(knobs, choice)[0]["structured"]["round_to"] == 8  # the recipe says so too
            widths = _widths(_build(name, base, knobs, choice, tmp_path))
            assert all(w % 8 == 0 for w in widths), (knob.id, knob.settings[index], widths)
            # every setting prunes, and no two settings of a knob build the same model
            assert widths not in seen, (knob.id, knob.settings[index])
            seen.add(widths)
    # ResNet-20's 16-channel groups: -25 % would keep 12 -> 16 (nothing), -75 % 4 -> 8 (as -50 %): only -50 % is left
    if name == "resnet20-cifar":
        assert next(k for k in knobs if k.target == "conv1").settings == (0.0, 0.5)


@pytest.mark.parametrize("name", ["resnet20-cifar", "mobilenet_v2"])
def test_uniform_choice_is_uniform_pruning_with_the_same_rounding(name, tmp_path):
    base = create_model(name, num_classes=10, in_channels=1).eval()
    knobs = build_space(base, X, ("channels",), (0.25, 0.5, 0.75), round_to=8)
    for ratio in (0.25, 0.5, 0.75):
        pruned = copy.deepcopy(base)
        structured_(pruned, X, {"ratio": ratio, "criterion": "l1", "round_to": 8})
        assert _widths(_build(name, base, knobs, uniform_choice(knobs, ratio), tmp_path)) == _widths(pruned), ratio


def test_kept_count_rounds_up_to_the_multiple():
    assert [kept_count(96, r) for r in (0.25, 0.4, 0.5)] == [72, 58, 48]
    assert [kept_count(96, r, 8) for r in (0.25, 0.4, 0.5)] == [72, 64, 48]
    assert kept_count(16, 0.25, 8) == 16 and kept_count(16, 0.75, 8) == 8 and kept_count(24, 0.5, 8) == 16
    assert kept_count(10, 0.95) == 1  # at least 10 % of the group is kept
    assert kept_count(6, 0.5, 8, partitions=4) == 16  # 3 of 6 kept in each of 4 partitions would be 12 in all


def test_relative_latency_budget_is_judged_by_the_paired_ratio():
    # the absolute p99 over the budget resolved from the baseline's reading, but block against block the model is
    # at 0.47x the baseline: it meets a 0.5x budget (the machine was busier when the model was timed)
    assert meets_latency_budget(0.66, budget_ms=0.635, paired_ratio=0.47, factor=0.5)
    # and the other way round: under the absolute budget, over it when paired
    assert not meets_latency_budget(0.60, budget_ms=0.635, paired_ratio=0.52, factor=0.5)
    # an absolute budget (no factor) is judged on the absolute reading, the ratio aside
    assert meets_latency_budget(0.60, budget_ms=0.635, paired_ratio=0.9)
    assert not meets_latency_budget(0.66, budget_ms=0.635, paired_ratio=0.3)


class Widths(nn.Module):
    """Two 3 x 3 convolutions of widths ``a`` and ``b`` and a Linear classifier."""

    def __init__(self, a: int, b: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, a, 3, padding=1)
        self.conv2 = nn.Conv2d(a, b, 3, padding=1)
        self.fc = nn.Linear(b, 10)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x).relu()).relu().mean((2, 3)))


X16 = torch.zeros(1, 3, 16, 16)


def test_latency_predictor_switches_to_the_feature_that_predicted_the_measured_models(tmp_path):
    """p99s that follow the MACs exactly (2 ns per MAC): after one measured model the MACs' held-out error is 0, the
    table's (real ONNX Runtime per-layer timings) is not, so ``auto`` predicts by MACs, exactly; ``table`` does not
    switch."""
    pytest.importorskip("onnxruntime")
    from slimkit.search.latency import LatencyPredictor, LatencyTable, layer_macs

    base, quarter, half = Widths(64, 64), Widths(16, 16), Widths(32, 32)
    # conv1 3 -> a (3 x 3), conv2 a -> b (3 x 3) on 16 x 16 pixels, fc b -> 10: the closed form
    assert layer_macs(half, X16) == 256 * 32 * 3 * 9 + 256 * 32 * 32 * 9 + 10 * 32

    def p99(m):
        return 2e-6 * layer_macs(m, X16)

    table = LatencyTable(tmp_path / "lat.json", "onnxruntime", runs=20)
    for feature in ("auto", "table"):
        predictor = LatencyPredictor(table, base, X16, {"median_ms": p99(base), "p99_ms": p99(base)}, feature)
        assert predictor.active == "table"
        predictor.add_features_point(predictor.features(quarter), p99(quarter))
        assert predictor.held_out["macs"][0] == pytest.approx(0.0, abs=1e-9) and predictor.held_out["table"][0] > 0
        assert predictor.active == ("macs" if feature == "auto" else "table")
        if feature == "auto":
            assert predictor.from_features(predictor.features(half)) == pytest.approx(p99(half), rel=1e-6)
            assert predictor.feature_errors()["active_feature"] == "macs"
