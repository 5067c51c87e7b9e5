"""Budget search: budgets, the space as recipe stages, latency tables, the searches, a real search end to end,
its recipe reproduced by ``slimkit compress``, and the same search through Ray Tune."""

import json

import pytest
import torch
import yaml
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.search import parse_budget, search
from slimkit.search.algorithms import evolve, greedy_moves, score, select_trial
from slimkit.search.latency import LatencyTable, layer_inputs, predictor_error, signature
from slimkit.search.space import Knob, build_space, choice_stages

# plaincnn-2 (two 3x3 conv blocks and a Linear, 20.6 KB in fp32) on the embedded digits; settings kept few
TINY = {"model": "plaincnn-2", "budget": "size_bytes=0.2x", "epochs": 1, "final_epochs": 1, "population": 6,
        "generations": 2, "max_steps": 3, "sensitivity_samples": 32, "greedy_candidates": 1, "evolution_trials": 1,
        "engine": "eager", "ratios": [0.5], "ranks": [0.5], "bits": [8, 4], "seed": 0}


def test_parse_budget():
    assert parse_budget("latency_p99_ms=0.5x") == ("latency_p99_ms", 0.5, True)
    assert parse_budget("size_bytes=20000") == ("size_bytes", 20000.0, False)
    assert parse_budget("energy_mj = 1e-2") == ("energy_mj", 0.01, False)
    for text, match in (("latency_p99=3", "did you mean 'latency_p99_ms'"), ("size_bytes", "METRIC=VALUE"),
                        ("macs=1.5x", "factor in \\(0, 1\\)"), ("macs=0", "must be > 0")):
        with pytest.raises(ConfigError, match=match):
            parse_budget(text)


def test_space_spells_recipe_stages_the_pipeline_accepts():
    from slimkit.models import create_model
    from slimkit.recipe import parse_recipe

    model = create_model("plaincnn-2", in_channels=1).eval()
    knobs = build_space(model, torch.zeros(1, 1, 28, 28), ("channels", "rank", "bits"), (0.5,), (0.5,), (8, 4))
    ids = [k.id for k in knobs]
    assert "channels:features.block1.0" in ids and "rank:features.block2.0" in ids and "bits:classifier" in ids
    assert not any(k.id == "channels:classifier" for k in knobs)  # the logits keep their width
    choice = tuple(len(k.settings) - 1 for k in knobs)
    stages = choice_stages(knobs, choice, finetune_epochs=2)
    assert [next(k for k in s if k not in ("name", "finetune")) for s in stages] == ["structured", "decompose", "int8"]
    assert stages[1]["finetune"] == {"epochs": 2} and "finetune" not in stages[2]
    assert stages[2]["int8"]["overrides"]["classifier"] == 4
    recipe = parse_recipe({"name": "x", "model": "plaincnn-2", "stages": stages})
    assert [s.kind for s in recipe.stages] == ["structured", "decompose", "int8"]
    assert choice_stages(knobs, tuple(0 for _ in knobs)) == []  # the identity choice changes nothing


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so its channels cannot be pruned by the graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x.relu()
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_gets_no_channel_knobs_and_says_why():
    skipped = {}
    knobs = build_space(Branchy(), torch.zeros(1, 16, 8, 8), ("channels", "rank"), skipped=skipped)
    assert [k.id for k in knobs] == ["rank:conv"] and "torch.fx" in skipped["channels"]


def test_latency_table_is_cached_by_layer_shape(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.zeros(1, 1, 8, 8)
    calls = layer_inputs(model, x)
    assert [n for n, _, _ in calls] == ["0", "2", "4", "6"]
    assert signature(calls[1][1], calls[1][2]) == signature(calls[2][1], calls[2][2])  # same shape, one entry
    table = LatencyTable(tmp_path / "lat.json", "eager", runs=5)
    total = table.model_sum_ms(model, x)
    assert table.measured == 4 and total >= 0  # overhead + 3 distinct layer shapes
    again = LatencyTable(tmp_path / "lat.json", "eager", runs=5)
    assert again.model_sum_ms(model, x) == pytest.approx(total) and again.measured == 0
    err = predictor_error([{"predicted": 1.1, "measured": 1.0}, {"predicted": 0.7, "measured": 1.0}])
    assert err["mean_abs_error_pct"] == pytest.approx(20.0) and err["max_abs_error_pct"] == pytest.approx(30.0)


def _toy():
    knobs = [Knob("channels", f"l{i}", (0.0, 0.25, 0.5, 0.75)) for i in range(4)]
    # layer i saves (i + 1) units per notch and adds kl (4 - i) * 0.1 per notch: the last layer is least sensitive
    table = {k.id: {str(s): {"drop": 0.0, "kl": (4 - i) * 0.1 * n} for n, s in enumerate(k.settings[1:], 1)}
             for i, k in enumerate(knobs)}

    def predict(choice):
        return 100.0 - sum((i + 1) * c for i, c in enumerate(choice))

    return knobs, table, predict


def test_greedy_takes_the_least_sensitive_notches_first():
    knobs, table, predict = _toy()
    # ranked by kl per unit saved: l3 (0.1 / 4), l2 (0.2 / 3), l1 (0.3 / 2), l0 (0.4 / 1); the k-th move starts
    # from the k-th notch and adds the best others until 95 is reached; the second equals the first (dropped)
    moves = greedy_moves(knobs, table, (0, 0, 0, 0), predict, goal=95.0, k=3)
    assert moves == [(0, 0, 1, 1), (0, 1, 0, 1)]
    assert all(predict(m) <= 95.0 for m in moves)


def test_evolution_is_feasible_and_deterministic():
    knobs, table, predict = _toy()
    a = evolve(knobs, table, predict, target=90.0, seed=3, population=8, generations=4, keep=3)
    b = evolve(knobs, table, predict, target=90.0, seed=3, population=8, generations=4, keep=3)
    assert a == b and a and all(predict(c) <= 90.0 for c in a)
    assert score(knobs, table, a[0]) <= score(knobs, table, a[-1])


def test_select_trial_takes_the_most_accurate_trial_within_the_target():
    trials = [{"id": "uniform", "val_accuracy": 93.0, "measured": 0.69},
              {"id": "backoff", "val_accuracy": 90.0, "measured": 0.86},  # slower and less accurate: dominated
              {"id": "over", "val_accuracy": 99.0, "measured": 1.20},  # best, but over the target
              {"id": "tie", "val_accuracy": 93.0, "measured": 0.80}]
    assert select_trial(trials, target=0.9)["id"] == "uniform"  # the tie goes to the lower metric
    assert select_trial(trials[1:], target=0.9)["id"] == "tie"
    assert select_trial(trials, target=0.5)["id"] == "uniform"  # none fits: the lowest metric
    assert select_trial(trials, target=2.0)["id"] == "over"
    with pytest.raises(ValueError):
        select_trial([], 1.0)


@pytest.fixture(scope="module")
def sequential_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("search-seq")
    return out, search({**TINY, "runner": "sequential"}, out, log=None)


@pytest.mark.slow
def test_size_budget_search_meets_it_end_to_end(sequential_search):
    from slimkit.manifest import load_model
    from slimkit.measure.energy import model_weight_bytes

    out, result = sequential_search
    saved = json.loads((out / "search.json").read_text())
    assert saved["budget"] == {"metric": "size_bytes", "value": pytest.approx(0.2 * 20600), "given": "size_bytes=0.2x",
                               "relative_to_baseline": True}
    assert saved["baseline"]["size_bytes"] == 20600
    chosen = saved["chosen"]
    assert chosen["meets_budget"] and chosen["size_bytes"] <= saved["budget"]["value"]
    final = load_model(out / "final" / "model.pt")
    assert model_weight_bytes(final) == chosen["size_bytes"]  # measured on the model the recipe produced
    assert chosen["accuracy"] == json.loads((out / "final" / "report.json").read_text())["stages"][-1]["accuracy"]
    front = saved["pareto"]
    assert all(a["size_bytes"] <= b["size_bytes"] and a["accuracy"] < b["accuracy"] for a, b in zip(front, front[1:]))
    for name in ("recipe.yaml", "pareto.png", "sensitivity.png", "sensitivity.json", "search.md", "report.html"):
        assert (out / name).is_file(), name
    assert {r["technique"] for r in saved["sensitivity"]} == {"channels", "rank", "bits"}
    # the choice is the finalist with the best mean validation accuracy over its fine-tune seeds
    finals = chosen["finalists"]
    assert len(finals) >= 2 and all(len(f["val_accuracies"]) == 3 for f in finals)
    within = {t["id"] for t in saved["trials"] if t["measured"] <= saved["budget"]["value"]}
    assert {f["trial"] for f in finals} <= within
    assert chosen["trial"] == max(finals, key=lambda f: f["val_accuracy"])["trial"]
    first = {t["id"]: t["val_accuracy"] for t in saved["trials"]}
    assert all(f["val_accuracies"][0] == first[f["trial"]] for f in finals)  # seed 0, same epochs: the trial itself
    assert any(len(set(f["val_accuracies"])) > 1 for f in finals)  # other seeds and validation draws differ


@pytest.mark.slow
def test_recipe_yaml_reproduces_the_chosen_model(sequential_search, tmp_path):
    from slimkit.cli import main

    out, result = sequential_search
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["baseline"] == str(out / "baseline.pt")
    assert main(["compress", "--recipe", str(out / "recipe.yaml"), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())["stages"][-1]
    assert again["bytes"] == result["chosen"]["size_bytes"]
    assert again["accuracy"] == pytest.approx(result["chosen"]["accuracy"])


@pytest.mark.slow
def test_ray_tune_trials_give_the_sequential_result(sequential_search, tmp_path):
    ray = pytest.importorskip("ray")
    out, sequential = sequential_search
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        through_ray = search({**TINY, "runner": "ray"}, tmp_path, log=None)
    finally:
        ray.shutdown()
    assert through_ray["runner"] == "ray" and sequential["runner"] == "sequential"
    assert any((tmp_path / "ray").iterdir())  # Ray Tune wrote its experiment there
    strip = [{k: t[k] for k in ("choice", "val_accuracy", "test_accuracy", "measured")} for t in sequential["trials"]]
    assert [{k: t[k] for k in ("choice", "val_accuracy", "test_accuracy", "measured")}
            for t in through_ray["trials"]] == strip
    assert through_ray["chosen"]["settings"] == sequential["chosen"]["settings"]
    assert through_ray["chosen"]["finalists"] == sequential["chosen"]["finalists"]
    assert through_ray["chosen"]["size_bytes"] == sequential["chosen"]["size_bytes"]


@pytest.mark.slow
def test_latency_budget_is_resolved_and_predicted_from_one_baseline_measurement(tmp_path):
    # the predictor is calibrated on the very measurement that resolves the budget: a second timing of the
    # same model would differ by the machine's noise, and the search would aim below (or above) 0.5x
    cfg = {**TINY, "budget": "latency_p99_ms=0.5x", "techniques": ["channels"], "strategy": "greedy", "max_steps": 1,
           "final_epochs": 0, "runner": "sequential"}
    result = search(cfg, tmp_path, log=None)
    base = result["baseline"]["latency_p99_ms"]
    assert result["budget"]["value"] == pytest.approx(0.5 * base)
    assert result["latency_predictor"]["baseline_predicted_p99_ms"] == pytest.approx(base, rel=1e-9)
    assert result["chosen"]["latency_p99_ms"] > 0 and result["trials"]
    # a relative budget is judged by the final model's paired p99 ratio against the baseline; eager: no rounding
    chosen_ratio = result["chosen"]["p99_over_baseline_paired"]
    assert result["chosen"]["meets_budget"] == (chosen_ratio <= 0.5) and result["chosen"]["verdict"]
    assert result["round_to"] == 1
    # the chosen settings are a trial's, the best on validation among those measured within the target, and
    # every uniform choice that fits was a trial (the result can never be one a uniform choice dominates)
    target = result["budget"]["value"] * (1 - result["config"]["margin"])
    fits = [t for t in result["trials"] if t["measured"] <= target]
    by_id = {t["id"]: t for t in result["trials"]}
    chosen = by_id[result["chosen"]["trial"]]
    assert chosen["settings"] == result["chosen"]["settings"]
    if fits:
        assert chosen["measured"] <= target and chosen["val_accuracy"] == max(t["val_accuracy"] for t in fits)
    channel_knobs = {k["id"] for k in result["knobs"] if k["id"].startswith("channels:")}
    uniform_fits = [p for p in result["latency_predictor"]["pairs"] if p["measured"] <= target
                    and set(p["settings"]) == channel_knobs and set(p["settings"].values()) == {"-50% ch"}]
    assert len(uniform_fits) == len([t for t in result["trials"] if t["source"] == "uniform"])
    if result["chosen"]["backoff_trial"]:
        assert by_id[result["chosen"]["backoff_trial"]]["source"] == "backoff"


class Widths(nn.Module):
    """Two convolutions of widths ``a`` and ``b``, each followed by a chain of tanh the latency table does not hold:
    their cost scales with the width, so the additive prediction (a constant residual) misses pruned models."""

    def __init__(self, a: int = 64, b: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, a, 3, padding=1)
        self.conv2 = nn.Conv2d(a, b, 3, padding=1)
        self.fc = nn.Linear(b, 10)

    def forward(self, x):
        x = self.conv1(x)
        for _ in range(12):
            x = torch.tanh(x)
        x = self.conv2(x)
        for _ in range(12):
            x = torch.tanh(x)
        return self.fc(x.mean((2, 3)))


X16 = torch.zeros(1, 3, 16, 16)


def _e2e(model):
    """Real ONNX Runtime timing of ``model``, its median standing in for the p99: the fit is the same, and on a
    shared machine a p99 measures the scheduler (the same 20 ms for every width here), a median the model."""
    from slimkit.search.latency import end_to_end

    median = end_to_end(model.eval(), X16, "onnxruntime", blocks=1, runs=100)["median_ms"]
    return {"median_ms": median, "p99_ms": median}


def test_latency_predictor_calibrated_on_measured_models_predicts_held_out_ones(tmp_path):
    """The refit line passes through what was measured and predicts a held-out model on it, where the
    baseline-only (additive) prediction is off by the closed-form amount. The per-layer sums are the table's
    real ONNX Runtime timings; the "measured" p99s follow a known line of them (2 ms per summed ms plus 0.05 ms
    per inference), so what is asserted does not depend on this machine's timing noise."""
    pytest.importorskip("onnxruntime")
    from slimkit.search.latency import LatencyPredictor

    base, quarter, half = Widths(64, 64), Widths(16, 16), Widths(32, 32)
    table = LatencyTable(tmp_path / "lat.json", "onnxruntime", runs=50)
    sums = {m: table.model_sum_ms(m.eval(), X16) for m in (base, quarter, half)}

    def measured(m):
        return 2.0 * sums[m] + 0.05

    predictor = LatencyPredictor(table, base, X16, {"median_ms": measured(base), "p99_ms": measured(base)})
    assert predictor.p99_ms(base) == pytest.approx(measured(base), rel=1e-9)
    additive = abs(predictor.p99_ms(half) - measured(half)) / measured(half)
    # additive: sum + (the baseline's measured - its sum), so it misses by the difference of the two sums
    assert additive == pytest.approx(abs(sums[base] - sums[half]) / measured(half), rel=1e-6)
    predictor.add_point(predictor.sum_ms(quarter), measured(quarter))
    # two points, two parameters: the line passes through both measurements, and the held-out model is on it
    assert predictor.p99_ms(base) == pytest.approx(measured(base), rel=1e-6)
    assert predictor.p99_ms(quarter) == pytest.approx(measured(quarter), rel=1e-6)
    assert predictor.p99_ms(half) == pytest.approx(measured(half), rel=1e-6)


def _widths_space():
    from slimkit.search.algorithms import back_off

    knobs = [Knob("channels", "conv1", (0.0, 0.5, 0.75)), Knob("channels", "conv2", (0.0, 0.5, 0.75))]
    # conv2's notches cost more accuracy than conv1's: back-off undoes them first
    table = {"channels:conv1": {"0.5": {"drop": 1.0, "kl": 0.1}, "0.75": {"drop": 3.0, "kl": 0.3}},
             "channels:conv2": {"0.5": {"drop": 2.0, "kl": 0.4}, "0.75": {"drop": 6.0, "kl": 1.0}}}
    seen: dict = {}

    def measure(choice):
        if choice not in seen:
            width = [int(64 * (1 - k.settings[i])) for k, i in zip(knobs, choice)]
            seen[choice] = _e2e(Widths(*width))["p99_ms"]
        return seen[choice]

    return back_off, knobs, table, measure, seen


def test_back_off_relaxes_the_costliest_notches_while_the_measured_latency_fits():
    pytest.importorskip("onnxruntime")
    back_off, knobs, table, measure, seen = _widths_space()
    start, identity = (2, 2), (0, 0)
    # a budget nothing could break: every notch is undone, the costliest (conv2 -75 % -> -50 %) first
    relaxed, steps = back_off(knobs, table, start, measure, target=1e9)
    assert relaxed == identity and all(s["accepted"] for s in steps) and len(steps) == 4
    assert steps[0]["knob"] == "channels:conv2" and steps[0]["choice"] == [2, 1]
    # a budget the start already breaks: nothing changes, nothing is measured but the start
    assert back_off(knobs, table, start, measure, target=0.0) == (start, [])
    # between the start and the baseline (four times the start's work in each chain): the baseline is out of
    # reach, and every accepted step fits by its own measurement while every rejected one does not
    target = 0.5 * (measure(start) + measure(identity))
    relaxed, steps = back_off(knobs, table, start, measure, target)
    assert relaxed != identity and all(a <= b for a, b in zip(relaxed, start))
    assert measure(relaxed) <= target
    assert all((s["measured"] <= target) == s["accepted"] for s in steps) and steps
    # capped: no more measurements than allowed
    assert len(back_off(knobs, table, start, measure, 1e9, max_measurements=1)[1]) == 1


def test_adaptive_batchnorm_re_estimates_statistics_on_the_batches():
    from slimkit.search.sensitivity import adapt_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(8, 1, 6, 6) * 3 + 1
    before = model[1].running_mean.clone()
    assert adapt_batchnorm(model, [x[:4], x[4:]]) is model and not model.training
    with torch.no_grad():
        means = model[0](x).mean((0, 2, 3))
    # two equal batches averaged cumulatively: the mean over all of them, not the baseline's zeros
    assert torch.allclose(model[1].running_mean, means, atol=1e-5) and not torch.allclose(before, means)
    assert model[1].momentum == 0.1 and model[1].num_batches_tracked == 2


def test_paired_timing_compares_models_under_the_same_load():
    pytest.importorskip("onnxruntime")
    from slimkit.search.latency import paired_p99_ratio

    big, small = Widths(64, 64), Widths(16, 16)
    same = paired_p99_ratio(big, big, X16, "onnxruntime", blocks=3, runs=50)
    # a model against itself, block against block (wide bounds: a block's p99 may catch a load spike in CI)
    assert 0.25 < same < 4.0
    # a sixteenth of the convolution work and a quarter of the element-wise work
    assert paired_p99_ratio(small, big, X16, "onnxruntime", blocks=3, runs=50) < same


@pytest.mark.slow
def test_latency_search_with_paired_timing_reports_p99_relative_to_the_baseline(tmp_path):
    cfg = {**TINY, "budget": "latency_p99_ms=0.5x", "techniques": ["channels"], "strategy": "greedy", "max_steps": 1,
           "final_epochs": 0, "runner": "sequential", "paired_timing": True,
           "backoff_measurements": 1, "uniform_seeds": False, "sensitivity_samples": 16}
    result = search(cfg, tmp_path, log=None)
    assert result["config"]["paired_timing"] and result["trials"]
    assert result["chosen"]["latency_p99_ms"] > 0 and len(result["chosen"]["backoff"]) <= 1


def test_finalists_are_the_best_trials_within_the_target_and_the_best_uniform_one():
    from slimkit.search.algorithms import pick_finalists

    trials = [{"id": "u5", "source": "uniform", "val_accuracy": 90.0, "measured": 0.5},
              {"id": "u2", "source": "uniform", "val_accuracy": 97.0, "measured": 1.5},  # over the target
              {"id": "g1", "source": "greedy", "val_accuracy": 95.0, "measured": 0.9},
              {"id": "e1", "source": "evolution", "val_accuracy": 96.0, "measured": 0.8},
              {"id": "e2", "source": "evolution", "val_accuracy": 95.0, "measured": 0.7},
              {"id": "u4", "source": "uniform", "val_accuracy": 91.0, "measured": 0.7}]
    # the two best within 1.0 (the tie at 95 goes to the lower metric), then the best uniform within it
    assert [t["id"] for t in pick_finalists(trials, 1.0, 2)] == ["e1", "e2", "u4"]
    assert [t["id"] for t in pick_finalists(trials, 1.0, 5)] == ["e1", "e2", "g1", "u4", "u5"]
    assert [t["id"] for t in pick_finalists(trials, 0.6, 3)] == ["u5"]
    assert pick_finalists(trials, 0.1, 3) == []


@pytest.mark.slow
def test_cli_search_as_a_user_types_it(tmp_path, capsys):
    from slimkit.cli import main

    out = tmp_path / "s"
    assert main(["search", "--model", "plaincnn-2", "--budget", "size_bytes=0.5x", "--techniques", "channels",
                 "--epochs", "1", "--trial-epochs", "1", "--final-epochs", "1", "--population", "4",
                 "--generations", "1", "--runner", "sequential", "--engine", "eager", "--finalists", "2",
                 "--finalist-seeds", "2", "--out", str(out)]) == 0
    saved = json.loads((out / "search.json").read_text())
    assert saved["config"]["finalists"] == 2 and saved["config"]["finalist_seeds"] == 2
    assert saved["chosen"]["meets_budget"] and saved["chosen"]["size_bytes"] <= saved["budget"]["value"]
    finals = saved["chosen"]["finalists"]
    assert len(finals) >= 2 and all(len(f["val_accuracies"]) == 2 for f in finals)
    assert "meets it" in capsys.readouterr().out
    assert main(["compress", "--recipe", str(out / "recipe.yaml"), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0  # the file the search wrote, fed back to slimkit
    again = json.loads((tmp_path / "again" / "report.json").read_text())["stages"][-1]
    assert again["accuracy"] == pytest.approx(saved["chosen"]["accuracy"])
