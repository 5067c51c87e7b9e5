"""Knowledge distillation: loss math, teacher isolation, feature pairs, stages, TAKD, plain CNNs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.distill import ATLoss, FeatureTap, HintLoss, HintRegressor, KDLoss, RKDLoss, attention_map
from slimkit.distill.methods import build_hooks, prepare_distillation, resolve_teacher
from slimkit.distill.spec import DISTILL_METHODS, DistillSpec
from slimkit.distill.takd import build_student, count_params, size_assistants, takd_chain
from slimkit.exceptions import ConfigError, UnknownNameError
from slimkit.finetune import training_context
from slimkit.manifest import load_model, save_model
from slimkit.models import create_model
from slimkit.models.plain import parse_plain_name, plain_cnn
from slimkit.stages import STAGES, StageContext
from slimkit.train import TrainConfig, fit

# ------------------------------------------------------------------------------ helpers


class Bundle:
    """A tiny stand-in for slimkit.data's bundle: 28x28x1 images, 3 classes."""

    def __init__(self, n: int = 48, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, 1, 28, 28, generator=g)
        y = torch.arange(n) % classes
        x[:, :, :8, :8] += y.view(-1, 1, 1, 1).float()  # a learnable signal
        self.train = TensorDataset(x, y)
        self.test = TensorDataset(x[:16], y[:16])
        self.num_classes = classes
        self.in_channels = 1
        self.input_shape = (1, 28, 28)


def make_ctx(tmp_path: Path, baseline: nn.Module | None = None, epochs: int = 1) -> StageContext:
    """A real context: its finetune trains on the bundle, its evaluate scores the test split."""
    return training_context(Bundle(), TrainConfig(epochs=epochs, lr=0.05, batch_size=16), baseline=baseline,
                            run_dir=tmp_path)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.9), (20.0, 1.0), (2.0, 0.0)])
def test_kd_loss_matches_direct_computation(temperature, alpha):
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    p_t = torch.softmax(t / temperature, 1)
    p_s = torch.softmax(s / temperature, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    ce = -torch.log_softmax(s, 1)[torch.arange(8), y].mean()
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce
    got = KDLoss(temperature, alpha)(s, t, y)
    assert torch.allclose(got, expected, atol=1e-5)


def test_kd_loss_gives_teacher_no_gradient():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    KDLoss()(s, t, torch.tensor([0, 1, 2, 0])).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"temperature": -1.0}, {"alpha": 1.5}, {"alpha": -0.1}])
def test_kd_loss_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError) as err:
        KDLoss(**kwargs)
    assert "\n" not in str(err.value)


def test_kd_loss_rejects_mismatched_classes():
    with pytest.raises(ConfigError, match="same classes"):
        KDLoss()(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))


def test_attention_map_is_normalized_and_scale_invariant():
    f = torch.randn(3, 6, 5, 5)
    a = attention_map(f)
    assert a.shape == (3, 25)
    assert torch.allclose(a.norm(dim=1), torch.ones(3))
    assert torch.allclose(attention_map(5 * f), a, atol=1e-6)
    # direct computation, p = 2
    q = f.pow(2).mean(1).flatten(1)
    assert torch.allclose(a, q / q.norm(dim=1, keepdim=True), atol=1e-6)


def test_at_loss_handles_different_channels_and_sizes():
    s = torch.randn(2, 4, 14, 14, requires_grad=True)
    t = torch.randn(2, 16, 7, 7)
    loss = ATLoss()([s], [t])
    loss.backward()
    expected = 500 * (attention_map(s.detach(), size=(7, 7)) - attention_map(t)).pow(2).mean()
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    assert s.grad is not None


def test_rkd_loss_is_invariant_to_scale_and_positive_otherwise():
    e = torch.randn(8, 5)
    assert RKDLoss()([e], [3 * e]).item() == pytest.approx(0.0, abs=1e-5)
    assert RKDLoss()([e], [torch.randn(8, 7)]).item() > 0


# ------------------------------------------------------------------------------ feature pairs and hints


def test_feature_tap_unknown_name_fails_with_close_names():
    model = plain_cnn("plaincnn-2-4", num_classes=3, in_channels=1)
    with pytest.raises(UnknownNameError) as err:
        FeatureTap(model, ["features.blok2"], role="student")
    message = str(err.value)
    assert "\n" not in message
    assert "'features.block2'" in message and "student has no module 'features.blok2'" in message


def test_feature_tap_takes_outputs_in_order_and_removes_hooks():
    model = plain_cnn("plaincnn-2-4", num_classes=3, in_channels=1)
    tap = FeatureTap(model, ["features.block2", "features.block1"])
    model(torch.zeros(2, 1, 28, 28))
    feats = tap.take()
    assert [tuple(f.shape) for f in feats] == [(2, 4, 14, 14), (2, 2, 28, 28)]
    tap.remove()
    model(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ConfigError, match="produced no output"):
        tap.take()


@pytest.mark.parametrize("s_shape,t_shape", [((8, 14, 14), (32, 7, 7)), ((4, 7, 7), (16, 14, 14)),
                                             ((4, 5, 5), (4, 5, 5)), ((10,), (20,))])
def test_hint_regressor_adapts_channels_and_size(s_shape, t_shape):
    reg = HintRegressor(s_shape, t_shape)
    out = reg(torch.randn(3, *s_shape))
    assert tuple(out.shape) == (3, *t_shape)


def test_hint_regressor_rejects_map_to_vector():
    with pytest.raises(ConfigError, match="cannot regress"):
        HintRegressor((4, 7, 7), (10,))


def test_hint_loss_is_mse_of_regressed_features():
    loss = HintLoss([(2, 4, 4)], [(3, 2, 2)])
    s, t = torch.randn(2, 2, 4, 4), torch.randn(2, 3, 2, 2)
    expected = F.mse_loss(F.adaptive_avg_pool2d(loss.regressors[0].proj(s), 2), t)
    assert torch.allclose(loss([s], [t]), expected)


# ------------------------------------------------------------------------------ methods through the trainer

TEACHER_PAIRS = {
    "hint": [{"student": "features.block2", "teacher": "features.block3"}],
    "at": [{"student": "features.block1", "teacher": "features.block2"}],
}


@pytest.mark.parametrize("method,options", [
    ("kd", {}),
    ("kd", {"cache": True}),
    ("hint", {"pairs": TEACHER_PAIRS["hint"]}),
    ("hint", {"pairs": TEACHER_PAIRS["hint"], "kd": True}),
    ("at", {"pairs": TEACHER_PAIRS["at"]}),
    ("rkd", {}),
    ("rkd", {"pairs": [["features.block2", "features.block4"]]}),
])
def test_method_trains_student_and_leaves_teacher_untouched(tmp_path, method, options):
    teacher = create_model("plaincnn-4", num_classes=3, in_channels=1)
    teacher.train()  # the hooks must switch it to eval themselves
    ctx = make_ctx(tmp_path, baseline=teacher)
    student = plain_cnn("plaincnn-2-4", num_classes=3, in_channels=1)
    before_t, before_s = snapshot(teacher), snapshot(student)
    hooks = build_hooks({"method": method, "options": options}, student, ctx=ctx)
    fit(student, ctx.data.train, ctx.train_config, hooks, progress=False)
    after_t = snapshot(teacher)
    for key, value in before_t.items():  # weights AND BN running stats unchanged
        assert torch.equal(value, after_t[key]), key
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())
    # hooks are removed from both models after the run
    assert not any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in teacher.modules())


def test_hint_regressors_are_trained(tmp_path):
    teacher = create_model("plaincnn-4", num_classes=3, in_channels=1)
    ctx = make_ctx(tmp_path, baseline=teacher)
    student = plain_cnn("plaincnn-2-4", num_classes=3, in_channels=1)
    hooks = build_hooks({"method": "hint", "options": {"pairs": TEACHER_PAIRS["hint"]}}, student, ctx=ctx)
    (regressor_holder,) = hooks.modules
    before = snapshot(regressor_holder)
    fit(student, ctx.data.train, ctx.train_config, hooks, progress=False)
    assert any(not torch.equal(v, regressor_holder.state_dict()[k]) for k, v in before.items())


def test_hint_two_stage_pretrains_then_returns_kd(tmp_path):
    teacher = create_model("plaincnn-4", num_classes=3, in_channels=1)
    ctx = make_ctx(tmp_path, baseline=teacher)
    student = plain_cnn("plaincnn-2-4", num_classes=3, in_channels=1)
    before = snapshot(student)
    spec = {"method": "hint", "options": {"pairs": TEACHER_PAIRS["hint"], "two_stage": True, "hint_epochs": 1}}
    with pytest.raises(ConfigError, match="prepare_distillation"):
        build_hooks(spec, student, ctx=ctx)  # builds only: it does not silently skip stage 1
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    # the method's hook builder never trains, two-stage or not
    DISTILL_METHODS.get("hint")(DistillSpec.coerce(spec), student, teacher, ctx)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    hooks = prepare_distillation(spec, student, ctx=ctx)
    after = student.state_dict()
    assert not torch.equal(before["features.block1.0.weight"], after["features.block1.0.weight"])
    assert torch.equal(before["classifier.weight"], after["classifier.weight"])  # past the guided layer: no gradient
    assert hooks.modules == () and hooks.loss is not None


def test_two_stage_pretraining_trains_through_the_context(tmp_path):
    """A context that must not train (a dry run's) pre-trains nothing: stage 1 goes through ctx.finetune."""
    import dataclasses

    from slimkit.stages import no_training

    teacher = create_model("plaincnn-4", num_classes=3, in_channels=1)
    ctx = dataclasses.replace(make_ctx(tmp_path, baseline=teacher), finetune=no_training)
    student = plain_cnn("plaincnn-2-4", num_classes=3, in_channels=1)
    before = snapshot(student)
    spec = {"method": "hint", "options": {"pairs": TEACHER_PAIRS["hint"], "two_stage": True, "hint_epochs": 1}}
    prepare_distillation(spec, student, ctx=ctx)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_teacher_logit_cache_reuses_logits(tmp_path):
    teacher = create_model("plaincnn-2", num_classes=3, in_channels=1)
    student = plain_cnn("plaincnn-2-4", num_classes=3, in_channels=1)
    hooks = build_hooks({"method": "kd", "options": {"cache": True}}, student, teacher)
    runner = hooks.loss.teacher
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])
    first = hooks.loss(student(x), y, x)
    second = hooks.loss(student(x), y, x)
    assert runner.misses == 4 and runner.hits == 4
    assert torch.allclose(first, second)


@pytest.mark.parametrize("spec,error,match", [
    ({"method": "kdd"}, UnknownNameError, "did you mean 'kd'"),
    ({"method": "kd", "options": {"pairs": []}}, ConfigError, "has no option"),
    ({"method": "at"}, ConfigError, "non-empty list"),
    ({"method": "at", "options": {"pairs": [{"student": "features.nope", "teacher": "features.block1"}]}},
     UnknownNameError, "student has no module 'features.nope'"),
    ({"method": "at", "options": {"pairs": [{"student": "features.block1", "teacher": "feature.block1"}]}},
     UnknownNameError, "teacher has no module 'feature.block1'; close names: 'features.block1'"),
])
def test_bad_distill_specs_fail_with_one_line(tmp_path, spec, error, match):
    teacher = create_model("plaincnn-2", num_classes=3, in_channels=1)
    student = plain_cnn("plaincnn-2-4", num_classes=3, in_channels=1)
    with pytest.raises(error, match=match) as err:
        build_hooks(spec, student, teacher, make_ctx(tmp_path))
    assert "\n" not in str(err.value)


def test_student_cannot_be_its_own_teacher():
    model = plain_cnn("plaincnn-2-4", num_classes=3, in_channels=1)
    with pytest.raises(ConfigError, match="teacher is the student"):
        build_hooks({"method": "kd"}, model, model)


def test_distill_in_finetune_uses_the_pre_compression_model(tmp_path):
    """``distill: {teacher: baseline}`` inside a fine-tune: the teacher is ctx.baseline, not the pruned model."""
    baseline = create_model("plaincnn-2", num_classes=3, in_channels=1)
    pruned = copy.deepcopy(baseline)
    with torch.no_grad():  # "prune": zero half of conv1's filters
        pruned.features.block1[0].weight[:8] = 0
    ctx = make_ctx(tmp_path, baseline=baseline)
    spec = DistillSpec(method="kd", teacher="baseline", alpha=1.0, temperature=2.0)
    assert resolve_teacher(spec, ctx) is baseline
    hooks = DISTILL_METHODS.get(spec.method)(spec, pruned, resolve_teacher(spec, ctx), ctx)
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
    baseline.eval()
    pruned.eval()
    with torch.no_grad():
        expected = KDLoss(2.0, 1.0)(pruned(x), baseline(x), y)
        got = hooks.loss(pruned(x), y, x)
    assert torch.allclose(got, expected)
    assert got > 0  # the pruned model differs from its teacher
    # a saved teacher works too
    path = save_model(baseline, tmp_path / "teacher.pt")
    loaded = resolve_teacher(DistillSpec(teacher=str(path)), ctx)
    assert torch.allclose(loaded(x), baseline(x), atol=1e-6)


# ------------------------------------------------------------------------------ stages and TAKD


def test_distill_stage_replaces_model_with_trained_student(tmp_path):
    teacher = create_model("plaincnn-4", num_classes=3, in_channels=1).eval()
    ctx = make_ctx(tmp_path, baseline=teacher)
    spec = STAGES.get("distill")
    cfg = spec.config_cls.coerce({"student": "plaincnn-2-4", "method": "kd", "epochs": 1}, where="stages[1].distill")
    out = spec.apply(teacher, cfg, ctx)
    assert out.model is not teacher
    assert [m.out_channels for m in out.model.modules() if isinstance(m, nn.Conv2d)] == [2, 4]
    assert out.details["teacher"]["params"] == count_params(teacher)
    assert out.details["student_params"] == count_params(out.model)
    assert out.hooks is not None and out.hooks.loss is not None


@pytest.mark.parametrize("settings,match", [
    ({"student": "plaincnn-2-4", "method": "hnit"}, "did you mean 'hint'"),
    ({"student": "auto"}, "student: auto needs between"),
    ({"student": "plaincnn-2-4", "epochs": -1}, "stages\\[1\\].distill.epochs"),
])
def test_distill_stage_config_errors(settings, match):
    with pytest.raises(ConfigError, match=match) as err:
        STAGES.get("distill").config_cls.coerce(settings, where="stages[1].distill")
    assert "\n" not in str(err.value)


def test_size_assistants_lie_between_teacher_and_student():
    teacher = create_model("lenet5", num_classes=10, in_channels=1)
    names = size_assistants(teacher, "plaincnn-2-4", 10, 1, count=2)
    params = [count_params(build_student(n, 10, 1)) for n in names]
    p_t, p_s = count_params(teacher), count_params(build_student("plaincnn-2-4", 10, 1))
    assert p_t > params[0] > params[1] > p_s
    # geometric spacing: each step about (p_t / p_s) ** (1/3)
    step = (p_t / p_s) ** (1 / 3)
    assert p_t / params[0] == pytest.approx(step, rel=0.35)
    with pytest.raises(ConfigError, match="plain CNN"):
        size_assistants(teacher, "lenet-300-100", 10, 1)


def test_takd_chain_and_stage(tmp_path):
    teacher = create_model("plaincnn-4", num_classes=3, in_channels=1).eval()
    ctx = make_ctx(tmp_path, baseline=teacher)
    chain = takd_chain(teacher, ["plaincnn-6-12", "plaincnn-2-4"], ctx.data, ctx.train_config,
                       example_inputs=ctx.example_inputs)
    assert [m.role for m in chain] == ["teacher", "assistant", "student"]
    assert all(m.macs and m.macs > 0 and m.params > 0 for m in chain)
    spec = STAGES.get("takd")
    out = spec.apply(teacher, spec.config_cls.coerce({"student": "plaincnn-2-4", "epochs": 1}), ctx)
    roles = [row["role"] for row in out.details["chain"]]
    assert roles == ["teacher", "assistant", "student"]
    assert out.details["chain"][-1]["params"] == count_params(out.model)
    assert out.details["chain"][0]["params"] > out.details["chain"][1]["params"] > out.details["chain"][2]["params"]


# ------------------------------------------------------------------------------ plain CNN zoo


@pytest.mark.parametrize("name", ["plaincnn-2", "plaincnn-5", "plaincnn-10", "plaincnn-3-5-7"])
def test_plain_cnn_runs_and_round_trips(tmp_path, name):
    model = plain_cnn(name, num_classes=4, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    path = save_model(model, tmp_path / "m.pt")
    loaded = load_model(path)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


@pytest.mark.parametrize("name", ["plaincnn-0", "plaincnn-11", "plaincnn-a-b", "plaincnn-" + "-".join(["4"] * 11)])
def test_plain_cnn_bad_names(name):
    with pytest.raises(ConfigError) as err:
        parse_plain_name(name)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ through the recipe runner


def _conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.slow
def test_runner_distills_pruned_model_from_pre_pruning_baseline(tmp_path):
    """``distill:`` in a structured-pruning stage's fine-tune gets the dense model as teacher."""
    from slimkit.distill.methods import build_kd
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import parse_recipe

    seen = {}

    def spy(spec, student, teacher, ctx):
        seen["student"], seen["teacher"] = _conv_widths(student), _conv_widths(teacher)
        return build_kd(spec, student, teacher, ctx)

    recipe = parse_recipe({
        "name": "prune-kd", "model": "plaincnn-2", "data": "digits", "image_size": 8, "latency_runs": 1,
        "train": {"epochs": 1, "batch_size": 256},
        "stages": [{"structured": {"ratio": 0.5}, "finetune": {"epochs": 1, "distill": {"method": "kd"}}}],
    })
    with DISTILL_METHODS.temporarily("kd", spy):
        report = run_recipe(recipe, tmp_path / "run", progress=False, log=lambda _m: None)
    assert seen["teacher"] == [16, 16]
    assert seen["student"] == [8, 8]
    assert len(report["stages"]) == 2


@pytest.mark.slow
def test_takd_recipe_runs_end_to_end(tmp_path):
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import load_recipe

    recipe = load_recipe("takd")
    data = recipe.to_dict()
    data["train"]["epochs"] = 1
    for stage in data["stages"]:
        stage["distill"]["epochs"] = 1
    from slimkit.recipe import parse_recipe

    small = parse_recipe({**data, "model": "plaincnn-4", "image_size": 8, "latency_runs": 1})
    report = run_recipe(small, tmp_path / "run", progress=False, log=lambda _m: None)
    names = [row["name"] for row in report["stages"]]
    assert names == ["baseline", "assistant", "student"]
    params = [row["params"] for row in report["stages"]]
    assert params[0] > params[1] > params[2]
