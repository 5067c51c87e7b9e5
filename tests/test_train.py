"""The training loop: learning, hooks, atomic checkpoints and exact resume."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.train import StepInfo, TrainConfig, TrainHooks, evaluate, fit


def _toy_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _toy_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))


def test_fit_learns_a_separable_problem():
    data = _toy_data()
    model = _toy_model()
    before = evaluate(model, data)
    fit(model, data, {"epochs": 5, "lr": 0.1, "batch_size": 32}, progress=False)
    after = evaluate(model, data)
    assert after > 90.0 > before


def test_hooks_run_in_their_places():
    calls = {"penalty": 0, "grad": 0, "after": []}

    def penalty(model):
        calls["penalty"] += 1
        return sum(p.abs().sum() for p in model.parameters()) * 0.0

    def grad_hook(model):
        assert all(p.grad is not None for p in model.parameters())
        calls["grad"] += 1

    def after(model, info: StepInfo):
        calls["after"].append((info.step, info.total_steps, info.epoch))

    hooks = TrainHooks(penalties=(penalty,), grad_hooks=(grad_hook,), after_step=(after,))
    fit(_toy_model(), _toy_data(64), {"epochs": 2, "batch_size": 16}, hooks, progress=False)
    assert calls["penalty"] == calls["grad"] == 8
    assert calls["after"][0] == (1, 8, 0) and calls["after"][-1] == (8, 8, 1)


def test_merged_hooks_run_once_each():
    """A hook in both sets (the runner's masks, returned again by a stage) runs once per step, at its first place."""
    calls = []

    def grad_a(model):
        calls.append("a")

    def grad_b(model):
        calls.append("b")

    def penalty(model):
        calls.append("p")
        return torch.zeros(())

    kept = TrainHooks(grad_hooks=(grad_a,), penalties=(penalty,))
    stage = TrainHooks(grad_hooks=(grad_a, grad_b), penalties=(penalty,))
    merged = kept.merge(stage).merge(stage).merge(None)
    assert merged.grad_hooks == (grad_a, grad_b) and merged.penalties == (penalty,)
    fit(_toy_model(), _toy_data(16), {"epochs": 1, "batch_size": 16}, merged, progress=False)
    assert calls == ["p", "a", "b"]  # one step: the penalty once, then each gradient hook once, in order
    loss = lambda out, y, x: out.sum()  # noqa: E731
    assert TrainHooks(loss=loss).merge(TrainHooks()).loss is loss  # the other set's loss wins only when it has one


def test_trainer_takes_a_config_for_one_call():
    """ctx.finetune's ``config=``: a stage with its own rates (DSD) trains through it instead of calling fit."""
    from slimkit.finetune import trainer

    data = _toy_data(64)
    finetune = trainer(data, TrainConfig(epochs=0))
    model = _toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    finetune(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "epochs=0: nothing trains"
    seen = []
    hooks = TrainHooks(after_step=(lambda m, info: seen.append(info.total_steps),))
    finetune(model, hooks, config=TrainConfig(epochs=2, batch_size=32, lr=0.1))
    assert seen == [4, 4, 4, 4]
    finetune(model, hooks, epochs=1, config=TrainConfig(epochs=2, batch_size=32))
    assert seen[4:] == [2, 2], "epochs overrides the call's config"


def test_replacement_loss_is_used():
    seen = []

    def loss(outputs, targets, inputs):
        seen.append(inputs.shape[0])
        return outputs.pow(2).mean()

    model = _toy_model()
    fit(model, _toy_data(64), {"epochs": 1, "batch_size": 32, "lr": 0.5}, TrainHooks(loss=loss), progress=False)
    assert seen == [32, 32]


def test_resume_reaches_the_same_weights(tmp_path):
    data = _toy_data()
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=32)
    straight = fit(_toy_model(), data, cfg, checkpoint=tmp_path / "a.pt", progress=False)

    # Interrupt in the middle of the third epoch, then resume with the same settings.
    def interrupt(model, info: StepInfo):
        if info.epoch == 2 and info.step % 8 == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_toy_model(), data, cfg, TrainHooks(after_step=(interrupt,)), checkpoint=tmp_path / "b.pt",
            progress=False)
    state = torch.load(tmp_path / "b.pt", weights_only=False)
    assert state["epoch"] == 1, "the last complete epoch (0-based) is checkpointed"
    resumed = fit(_toy_model(), data, cfg, checkpoint=tmp_path / "b.pt", resume=True, progress=False)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp")), "no temporary files left behind"


def test_corrupt_checkpoint_is_reported(tmp_path):
    import pytest

    from slimkit.exceptions import CorruptFileError

    path = tmp_path / "c.pt"
    torch.save({"epoch": 0}, path)
    with pytest.raises(CorruptFileError, match="delete it"):
        fit(_toy_model(), _toy_data(), {"epochs": 2}, checkpoint=path, resume=True, progress=False)


def test_step_schedule_and_adam_config_validate():
    import pytest

    from slimkit.exceptions import ConfigError

    assert TrainConfig.coerce({"lr": "1e-4"}).lr == 1e-4  # YAML reads 1e-4 as a string: accepted on purpose
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig.coerce({"optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig.coerce({"epochz": 3})
    model = _toy_model()
    fit(model, _toy_data(64), {"epochs": 2, "optimizer": "adam", "schedule": "step", "step_size": 1, "lr": 1e-3},
        progress=False)
