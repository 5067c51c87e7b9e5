"""The runner: masks from an earlier stage survive every later fine-tune, with momentum and weight decay."""

import pytest

from slimkit.manifest import load_model
from slimkit.pipeline import run_recipe
from slimkit.recipe import parse_recipe


def test_sparsity_survives_a_later_stage_finetune(tmp_path):
    recipe = parse_recipe({
        "name": "masks-kept",
        "model": "lenet-300-100",
        "train": {"epochs": 1, "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4},
        "latency_runs": 2,
        "stages": [
            {"name": "prune", "magnitude": {"sparsity": 0.8}},
            {"name": "tune", "train": {}, "finetune": {"epochs": 1, "lr": 0.01}},
        ],
    })
    report = run_recipe(recipe, tmp_path, progress=False, log=lambda _m: None)
    baseline, pruned, tuned = report["stages"]
    assert pruned["nonzeros"] < 0.25 * baseline["nonzeros"]
    assert tuned["nonzeros"] == pruned["nonzeros"], "the later fine-tune must not revive pruned weights"
    assert tuned["accuracy"] > 50
    # zeroed weights do not shrink activations: same peak; lenet-300-100's largest pair is fc1's in + out
    assert baseline["peak_activation_bytes"] == pruned["peak_activation_bytes"] == (784 + 300) * 4
    assert "act. peak" in (tmp_path / "report.md").read_text()
    final = load_model(tmp_path / "model.pt")
    for layer in (final.fc1, final.fc2):
        assert int((layer.weight != 0).sum()) == int(layer.weight_mask.sum())


def test_weight_sharing_stays_in_force_in_a_later_stage_finetune(tmp_path):
    import torch

    recipe = parse_recipe({
        "name": "sharing-kept",
        "model": "lenet-300-100",
        "train": {"epochs": 1, "lr": 0.02},
        "latency_runs": 2,
        "stages": [
            {"name": "prune", "magnitude": {"sparsity": 0.8}},
            {"name": "share", "share": {"linear_bits": 4}},
            {"name": "tune", "train": {}, "finetune": {"epochs": 1, "lr": 0.01}},
        ],
    })
    run_recipe(recipe, tmp_path, progress=False, log=lambda _m: None)
    final = load_model(tmp_path / "model.pt")
    for layer in (final.fc1, final.fc2, final.fc3):
        weights = layer.weight[layer.weight != 0]
        assert len(torch.unique(weights)) <= 16, "a later fine-tune must move centroids, not single weights"


def test_a_resumed_run_keeps_sharing_of_a_loaded_stage(tmp_path):
    """Interrupted after the share stage: the resumed run loads it and must still keep its centroids."""
    import torch

    stages = [{"name": "prune", "magnitude": {"sparsity": 0.8}}, {"name": "share", "share": {"linear_bits": 4}}]
    base = {"name": "sharing-resumed", "model": "lenet-300-100", "train": {"epochs": 1, "lr": 0.02},
            "latency_runs": 2}
    run_recipe(parse_recipe({**base, "stages": stages}), tmp_path, progress=False, log=lambda _m: None)
    tune = {"name": "tune", "train": {}, "finetune": {"epochs": 1, "lr": 0.01}}
    said = []
    run_recipe(parse_recipe({**base, "stages": [*stages, tune]}), tmp_path, progress=False, resume=True,
               log=said.append)
    assert any("share: done in an earlier run, loaded" in line for line in said)
    final = load_model(tmp_path / "model.pt")
    for layer in (final.fc1, final.fc2, final.fc3):
        weights = layer.weight[layer.weight != 0]
        assert len(torch.unique(weights)) <= 16, "the resumed fine-tune moved single weights off the codebook"


@pytest.mark.slow
def test_each_mask_applies_once_per_optimizer_step(tmp_path, monkeypatch):
    """prune -> share, the deep-compression-lenet300 recipe's stages, one optimizer step per training call.

    The runner keeps the masks, the prune stage returns them as persistent hooks and the share
    stage returns them again with its centroid hooks: each must still zero the masked
    gradients once and re-apply the masks once per optimizer step, in every training call.
    """
    import yaml
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from slimkit.prune import masks
    from slimkit.recipe import builtin_recipe_path

    stages = yaml.safe_load(builtin_recipe_path("deep-compression-lenet300").read_text())["stages"][:2]
    assert [next(k for k in s if k not in ("name", "finetune")) for s in stages] == ["magnitude", "share"]
    stages[0]["magnitude"]["round_epochs"] = 1
    for stage in stages:
        stage["finetune"]["epochs"] = 1
    recipe = parse_recipe({"name": "mask-count", "model": "lenet-300-100", "latency_runs": 1, "stages": stages,
                           "train": {"epochs": 0, "batch_size": 2048}})  # digits: 1437 training images, 1 step
    counts = {"steps": 0, "grads": 0, "masks": 0}
    zero_grads, reapply = masks.zero_masked_grads, masks._after_step

    def counted_zero_grads(model):
        counts["grads"] += 1
        zero_grads(model)

    def counted_reapply(model, info):
        counts["masks"] += 1
        reapply(model, info)

    def step(optimizer, args, kwargs):
        counts["steps"] += 1

    monkeypatch.setattr(masks, "zero_masked_grads", counted_zero_grads)  # what every mask_hooks() now returns
    monkeypatch.setattr(masks, "_after_step", counted_reapply)
    handle = register_optimizer_step_post_hook(step)
    try:
        report = run_recipe(recipe, tmp_path, progress=False, log=lambda _m: None)
    finally:
        handle.remove()
    # two rounds between the three pruning steps, the prune fine-tune, the share fine-tune: one step each
    assert counts["steps"] == 4
    assert counts["grads"] == counts["masks"] == counts["steps"], counts
    assert [row["phase"] for row in report["stages"]] == ["materialized", "simulated", "simulated"]
