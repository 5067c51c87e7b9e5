"""Unstructured magnitude pruning: exact targets, masks held through training, schedules, save/load."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.exceptions import ConfigError
from slimkit.manifest import load_model, save_model
from slimkit.prune.magnitude import MagnitudeConfig, magnitude_prune_
from slimkit.prune.masks import L1Penalty, mask_hooks, sparsity_of
from slimkit.stages import STAGES, StageContext
from slimkit.train import TrainConfig, TrainHooks, fit


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


def lenet5() -> nn.Module:
    from slimkit.models import create_model

    return create_model("lenet5", num_classes=10, in_channels=1)


MODELS = {"mlp": mlp, "cnn": cnn}
X8 = torch.zeros(1, 1, 8, 8)  # one input of mlp and cnn
INPUTS = {mlp: X8, cnn: X8, lenet5: torch.zeros(1, 1, 28, 28)}


def tiny_data(n: int = 96, side: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, side, side, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return TensorDataset(x, y)


def context(tmp_path: Path, epochs: int = 2) -> StageContext:
    data = tiny_data()
    cfg = TrainConfig(epochs=epochs, lr=0.05, momentum=0.9, weight_decay=5e-3, batch_size=32)

    def finetune(model, hooks=None, epochs=None):
        run_cfg = cfg if epochs is None else cfg.model_copy(update={"epochs": epochs})
        return fit(model, data, run_cfg, hooks, progress=False)

    class Bundle:
        train = test = data

    return StageContext(example_inputs=torch.zeros(1, 1, 8, 8), data=Bundle(), train_config=cfg, run_dir=tmp_path,
                        baseline=None, finetune=finetune, evaluate=lambda m: 0.0)


@pytest.mark.parametrize("make", [mlp, cnn, lenet5], ids=["mlp", "cnn", "lenet5"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_layer_scope_prunes_exact_count(make, sparsity):
    model = make()
    report = magnitude_prune_(model, INPUTS[make], {"sparsity": sparsity})
    for name, row in report.layers.items():
        module = model.get_submodule(name)
        assert int((module.weight == 0).sum()) == round(sparsity * module.weight.numel())
        assert torch.equal(module.weight_mask == 0, module.weight == 0)
        assert row["nonzeros"] == module.weight.numel() - round(sparsity * module.weight.numel())


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_global_scope_reaches_overall_target_and_prunes_smallest(make):
    model = make()
    weights = torch.cat([m.weight.detach().abs().flatten() for m in model.modules() if hasattr(m, "weight")])
    magnitude_prune_(model, X8, {"sparsity": 0.8, "scope": "global"})
    kept = torch.cat([m.weight.detach().abs().flatten() for m in model.modules() if hasattr(m, "weight")])
    assert int((kept == 0).sum()) == round(0.8 * weights.numel())
    threshold = weights.sort().values[round(0.8 * weights.numel()) - 1]
    assert bool((kept[kept > 0] >= threshold).all())


def test_per_layer_globs_first_match_wins_and_unmatched_is_skipped():
    model = cnn()
    report = magnitude_prune_(model, X8, {"per_layer": {"0": 0.3, "[0-9]": 0.9}, "ignore": ("5",)})
    assert report.layers["0"]["sparsity"] == pytest.approx(0.3, abs=0.02)
    assert report.layers["2"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert "5" not in report.layers
    model = cnn()
    report = magnitude_prune_(model, X8, {"per_layer": {"2": 0.5}})
    assert set(report.layers) == {"2"} and set(report.skipped) == {"0", "5"} and report.changed == ["2"]


def test_all_ones_mask_changes_nothing():
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    magnitude_prune_(model, X8, {"sparsity": 0.0})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masks_hold_through_training_with_momentum_and_weight_decay(optimizer):
    model = cnn()
    magnitude_prune_(model, X8, {"sparsity": 0.7})
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    start = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    cfg = TrainConfig(epochs=2, optimizer=optimizer, lr=0.05, momentum=0.9, weight_decay=1e-2, batch_size=16)
    fit(model, tiny_data(), cfg, mask_hooks(), progress=False)
    for name, was_zero in zeros.items():
        weight = model.get_submodule(name).weight
        assert bool((weight[was_zero] == 0).all())
        assert not torch.equal(weight, start[name])  # the kept weights did train


def test_masks_survive_manifest_save_load(tmp_path):
    model = lenet5()
    magnitude_prune_(model, INPUTS[lenet5], {"sparsity": 0.9})
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert torch.equal(loaded.fc1.weight_mask, model.fc1.weight_mask)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("schedule", ["oneshot", "iterative", "agp", "dns"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_every_schedule_reaches_its_target(tmp_path, schedule, scope):
    model = cnn()
    config = STAGES.get("magnitude").config_cls.coerce(
        {"sparsity": 0.75, "scope": scope, "schedule": schedule, "rounds": 3, "round_epochs": 1, "epochs": 2,
         "frequency": 2})
    out = STAGES.get("magnitude").apply(model, config, context(tmp_path))
    layers = [m for m in out.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(m.weight.numel() for m in layers)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    if scope == "local":
        for m in layers:
            assert int((m.weight == 0).sum()) == round(0.75 * m.weight.numel())
    else:
        assert zeros == round(0.75 * total)
    assert all(torch.equal(m.weight_mask == 0, m.weight == 0) for m in layers)
    assert out.hooks is not None and out.persistent_hooks and out.details["sparsity"] == pytest.approx(
        zeros / total, abs=1e-6)


def test_dns_splices_weights_back(tmp_path):
    from slimkit.prune.schedules import DNSHook

    torch.manual_seed(1)
    model = mlp()
    config = MagnitudeConfig(sparsity=0.8, schedule="dns", epochs=3, frequency=1, dns_margin=0.05)
    hook = DNSHook(model, config)
    first = {n: m.clone() for n, m in hook.masks.items()}
    ctx = context(tmp_path)
    fit(model, ctx.data.train, TrainConfig(epochs=3, lr=0.2, batch_size=16), mask_hooks().merge(
        TrainHooks(after_step=(hook,))), progress=False)
    spliced = sum(int(((first[n] == 0) & (model.get_submodule(n).weight_mask == 1)).sum()) for n in first)
    assert spliced > 0
    assert sparsity_of(model)["total"] == pytest.approx(0.8, abs=1e-3)


def test_agp_curve():
    from slimkit.prune.schedules import agp_fraction

    values = [agp_fraction(p / 10) for p in range(11)]
    assert values[0] == 0 and values[-1] == 1 and values == sorted(values)


def test_l1_penalty_is_sum_of_abs_and_shrinks_weights():
    model = mlp()
    norm = lambda m: sum(float(x.weight.detach().abs().sum()) for x in m.modules() if isinstance(x, nn.Linear))  # noqa: E731
    assert float(L1Penalty(1e-3)(model).detach()) == pytest.approx(1e-3 * norm(model), rel=1e-5)
    plain, sparse = mlp(), mlp()
    sparse.load_state_dict(plain.state_dict())
    cfg = TrainConfig(epochs=2, lr=0.05, weight_decay=0, batch_size=16)
    fit(plain, tiny_data(), cfg, progress=False)
    fit(sparse, tiny_data(), cfg, TrainHooks(penalties=(L1Penalty(1e-2),)), progress=False)
    assert norm(sparse) < norm(plain)
    with pytest.raises(ValueError):
        L1Penalty(-1.0)


@pytest.mark.parametrize("bad", [
    {},
    {"sparsity": 1.0},
    {"per_layer": {"fc*": 1.5}},
    {"scope": "global", "per_layer": {"fc*": 0.5}},
    {"sparsity": 0.5, "schedule": "sometimes"},
    {"sparsity": 0.5, "ratio": 0.5},
])
def test_bad_configs_raise_config_error(bad):
    with pytest.raises(ConfigError):
        MagnitudeConfig.coerce(bad, where="stages[0].magnitude")


def test_selection_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="no Conv1d/Conv2d/Linear module matches"):
        magnitude_prune_(mlp(), X8, {"sparsity": 0.5, "layers": ("conv*",)})


def test_scope_layer_is_refused_with_the_new_spelling(tmp_path):
    from slimkit.recipe import load_recipe

    for cls in (MagnitudeConfig, STAGES.get("obd").config_cls, STAGES.get("dsd").config_cls):
        with pytest.raises(ConfigError, match=r"^stages\[0\]\.x\.scope: scope 'layer' is now spelled 'local'.*"
                                              r"write scope: local \(got 'layer'\)$"):
            cls.coerce({"sparsity": 0.5, "scope": "layer"}, where="stages[0].x")
    recipe = tmp_path / "old.yaml"
    recipe.write_text("name: old\nmodel: lenet5\ndata: digits\nstages:\n"
                      "  - name: prune\n    magnitude: {sparsity: 0.9, scope: layer}\n")
    with pytest.raises(ConfigError, match="scope 'layer' is now spelled 'local'") as err:
        load_recipe(recipe)
    assert "\n" not in str(err.value)
