"""Recipe validation: every mistake is one line naming its path in the YAML."""

import pytest

from slimkit.exceptions import ConfigError, UnknownNameError
from slimkit.recipe import list_recipes, load_recipe, parse_recipe


def test_every_builtin_recipe_validates():
    names = [name for name, _ in list_recipes()]
    assert names, "built-in recipes are shipped"
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe.stages, f"{name} has stages"


def test_overrides_replace_top_level_keys():
    recipe = load_recipe(None, overrides={"model": "lenet-300-100", "epochs": 1, "data": "digits"})
    assert recipe.model == "lenet-300-100" and recipe.train.epochs == 1


@pytest.mark.parametrize(
    "data,message",
    [
        ({"name": "x", "model": "lenett5"}, r"^model: unknown model 'lenett5'; did you mean 'lenet5'"),
        ({"name": "x", "data": "mnits"}, r"^data: unknown dataset 'mnits'"),
        ({"name": "x", "train": {"lr": -1}}, r"^train\.lr: must be greater than 0"),
        ({"name": "x", "train": {"epochs": "many"}}, r"^train\.epochs: must be a valid integer"),
        ({"name": "x", "trian": {}}, r"^trian: unknown key"),
        ({"name": "x", "stages": {"a": 1}}, r"^stages: must be a list"),
        ({"name": "x", "stages": ["train"]}, r"^stages\[0\]: expected a mapping"),
        ({"name": "x", "stages": [{"train": {}, "finetune": {"lr": 0}}]}, r"^stages\[0\]\.finetune\.lr"),
        ({"name": "x", "stages": [{"train": {"foo": 1}}]}, r"^stages\[0\]\.train\.foo: unknown key"),
        ({"name": "x", "stages": [{"train": {}}, {"trian": {}}]}, r"^stages\[1\]: unknown stage 'trian'"),
        ({"name": "x", "stages": [{"train": {}, "other": {}}]}, r"^stages\[0\]: needs exactly one stage key"),
        ({"name": "bad name!"}, r"^name: "),
    ],
)
def test_invalid_recipes_name_the_path(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_recipe(data)
    assert "\n" not in str(info.value)


def test_unknown_recipe_name_and_bad_yaml(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown recipe 'deep-compresion'; did you mean 'deep-compression'"):
        load_recipe("deep-compresion")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - train: {\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")
