"""Decomposition composed with pruning, distillation and int8 in one recipe (issue 7).

Runs the built-in ``compose-decompose`` recipe (structured -> decompose tucker with a KD
fine-tune from the baseline -> int8), shrunk to 1 epoch per phase on 8x8 or 16x16 digits, through
:func:`slimkit.pipeline.run_recipe`, and checks every stage row, the MAC reductions, the
teacher the fine-tune distilled from, and that the saved models reload to the same results.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.distill.spec import DISTILL_METHODS
from slimkit.manifest import load_model


def _shrunk_recipe(model: str, image_size: int):
    from slimkit.recipe import load_recipe, parse_recipe

    data = load_recipe("compose-decompose").to_dict()
    data["train"].update(epochs=1, batch_size=128)
    for stage in data["stages"]:
        if "finetune" in stage:
            stage["finetune"]["epochs"] = 1
    return parse_recipe({**data, "model": model, "image_size": image_size, "latency_runs": 2})


def _predict(model: nn.Module, dataset) -> torch.Tensor:
    from torch.utils.data import DataLoader

    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in DataLoader(dataset, batch_size=256)])


def _is_chain(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and sum(isinstance(m, nn.Conv2d) for m in module) >= 2


# resnet20-cifar is the recipe's own model (residual channels coupled across blocks); plaincnn-4
# pools to 4x4 at the end, so its ONNX export needs an input of at least 16x16
@pytest.mark.parametrize(("model_name", "image_size"), [
    ("resnet20-cifar", 8),
    pytest.param("plaincnn-4", 16, marks=pytest.mark.slow),
])
def test_compose_recipe_prunes_decomposes_distills_and_quantizes(tmp_path, model_name, image_size):
    from slimkit.data import load_data
    from slimkit.distill.methods import build_kd
    from slimkit.pipeline import run_recipe
    from slimkit.train import evaluate

    seen = {}

    def spy(spec, student, teacher, ctx):
        seen["student_chains"] = sum(_is_chain(m) for m in student.modules())
        seen["teacher_chains"] = sum(_is_chain(m) for m in teacher.modules())
        seen["teacher_params"] = sum(p.numel() for p in teacher.parameters())
        return build_kd(spec, student, teacher, ctx)

    recipe = _shrunk_recipe(model_name, image_size)
    run_dir = tmp_path / "run"
    with DISTILL_METHODS.temporarily("kd", spy):
        report = run_recipe(recipe, run_dir, progress=False, log=lambda _m: None)

    rows = {row["name"]: row for row in report["stages"]}
    assert [row["name"] for row in report["stages"]] == ["baseline", "prune-channels", "tucker", "int8"]
    base, pruned, tucker, int8 = (rows[n] for n in ("baseline", "prune-channels", "tucker", "int8"))
    # every compression step removes MACs; int8 keeps the decomposed architecture
    assert pruned["macs"] < base["macs"]
    assert tucker["macs"] < pruned["macs"]
    assert int8["macs"] == tucker["macs"] < base["macs"]
    assert tucker["details"]["layers"], "tucker decomposed no layer"
    assert int8["bytes"] < tucker["bytes"] and int8["bytes_counted"] == "stored artifact"
    # the decompose stage's fine-tune distilled from the dense, unpruned baseline
    assert seen["teacher_chains"] == 0 and seen["student_chains"] >= 1
    assert seen["teacher_params"] == base["params"]

    data = load_data(recipe.data, seed=recipe.train.seed, image_size=recipe.image_size)
    # the decomposed (pruned) stage model reloads to the accuracy the run measured
    tucker_model = load_model(run_dir / "models" / "02-tucker.pt")
    assert any(_is_chain(m) for m in tucker_model.modules())
    assert evaluate(tucker_model, data.test) == pytest.approx(tucker["accuracy"], abs=1e-3)  # rows keep 4 decimals
    # the final model.pt (fake-quant int8 over the decomposed model) reloads with the same predictions
    final = load_model(report["final_model"])
    again = load_model(run_dir / "models" / "03-int8.pt")
    logits = _predict(final, data.test)
    torch.testing.assert_close(logits, _predict(again, data.test), rtol=0, atol=0)
    assert evaluate(final, data.test) == pytest.approx(int8["details"]["fakequant_accuracy"], abs=1e-6)
    assert final(torch.zeros(1, *data.input_shape)).shape == (1, data.num_classes)
