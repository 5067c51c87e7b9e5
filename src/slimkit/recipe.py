"""Recipes: YAML validated into an ordered list of stages.

A recipe names a model, a dataset, the baseline training and an ordered list of stages;
each stage is one registered transform (see :mod:`slimkit.stages`) with its settings and
an optional fine-tune. Every violation is one line naming its path in the YAML:

>>> parse_recipe({"name": "x", "stages": [{"train": {}, "finetune": {"epochs": -1}}]})
Traceback (most recent call last):
...
slimkit.exceptions.ConfigError: stages[0].finetune.epochs: must be greater than or equal to 0 (got -1)
>>> parse_recipe({"name": "x", "stages": [{"shrae": {}}]})
Traceback (most recent call last):
...
slimkit.exceptions.UnknownNameError: stages[0]: unknown stage 'shrae'; did you mean 'share'? (known: ...)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from slimkit.config import Config
from slimkit.exceptions import ConfigError, UnknownNameError
from slimkit.stages import STAGES, FinetuneConfig
from slimkit.train import TrainConfig

DEFAULT_RECIPE = "deep-compression"


class RecipeHeader(Config):
    """Everything in a recipe but its stages."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    model: str = "lenet5"
    data: str = "digits"
    data_dir: str = "data"
    download: bool = False
    image_size: int | None = Field(None, ge=8, description="resize images (e.g. CIFAR at 224)")
    augment: bool = Field(False, description="random crop + flip on the training split (CIFAR, image folders)")
    baseline: str | None = Field(None, description="saved model to start from instead of training one")
    train: TrainConfig = TrainConfig()
    latency_runs: int = Field(30, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads for the run (default: torch's choice)")


@dataclass(frozen=True)
class Stage:
    """One validated stage: its display name, the registered stage kind and its configs."""

    name: str
    kind: str
    config: Config
    finetune: FinetuneConfig | None


@dataclass(frozen=True)
class Recipe:
    header: RecipeHeader
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    source: str = ""

    def __getattr__(self, item: str) -> Any:
        # recipe.model, recipe.train, ... read through to the header
        return getattr(self.__dict__["header"], item)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what report.json records)."""
        out = self.header.to_dict()
        out["stages"] = [
            {"name": s.name, s.kind: s.config.to_dict(), **({"finetune": s.finetune.to_dict()} if s.finetune else {})}
            for s in self.stages
        ]
        return out


def _parse_stage(index: int, entry: Any) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping like {{prune: {{...}}, finetune: {{...}}}}, got {entry!r}")
    kinds = [k for k in entry if k not in ("name", "finetune")]
    if len(kinds) != 1:
        found = ", ".join(map(str, kinds)) or "none"
        raise ConfigError(f"{where}: needs exactly one stage key besides 'name' and 'finetune' (found: {found})")
    kind = str(kinds[0])
    if kind not in STAGES:
        raise UnknownNameError(f"{where}: {STAGES.unknown_message(kind)}")
    spec = STAGES.get(kind)
    config = spec.config_cls.coerce(entry[kind] or {}, where=f"{where}.{kind}")
    finetune = None
    if entry.get("finetune") is not None:
        finetune = FinetuneConfig.coerce(entry["finetune"], where=f"{where}.finetune")
    name = entry.get("name", kind)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: must be a non-empty string, got {name!r}")
    return Stage(name=name, kind=kind, config=config, finetune=finetune)


def parse_recipe(data: Any, source: str = "", overrides: dict[str, Any] | None = None) -> Recipe:
    """Validate recipe data (as loaded from YAML) with optional top-level overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {source}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    stages_data = data.pop("stages", None) or []
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "epochs":
            data["train"] = {**(data.get("train") or {}), "epochs": value}
        else:
            data[key] = value
    header = RecipeHeader.coerce(data)
    _check_names(header)
    if not isinstance(stages_data, list):
        raise ConfigError(f"stages: must be a list of stages, got {type(stages_data).__name__}")
    stages = tuple(_parse_stage(i, entry) for i, entry in enumerate(stages_data))
    return Recipe(header=header, stages=stages, source=source)


def _check_names(header: RecipeHeader) -> None:
    from slimkit.data import DATASETS
    from slimkit.models import MODELS

    if header.model not in MODELS:
        raise UnknownNameError(f"model: {MODELS.unknown_message(header.model)}")
    dataset = header.data.split(":", 1)[0]
    if dataset not in DATASETS:
        raise UnknownNameError(f"data: {DATASETS.unknown_message(header.data)}")


def builtin_recipe_path(name: str) -> Path | None:
    path = resources.files("slimkit") / "recipes" / f"{name}.yaml"
    return Path(str(path)) if path.is_file() else None


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every built-in recipe, sorted by name."""
    folder = resources.files("slimkit") / "recipes"
    out = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text()) or {}
            out.append((entry.name[: -len(".yaml")], str(data.get("description", ""))))
    return out


def load_recipe(name_or_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """A built-in recipe by name, or a YAML file by path, validated.

    ``overrides`` replace top-level keys (``model``, ``data``, ``data_dir``, ``epochs`` for
    the baseline training, ...), as the CLI flags do.
    """
    name_or_path = str(name_or_path or DEFAULT_RECIPE)
    path = Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) or path.is_file()):
        found = builtin_recipe_path(name_or_path)
        if found is None:
            known = [n for n, _ in list_recipes()]
            import difflib

            close = difflib.get_close_matches(name_or_path, known, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(
                f"unknown recipe {name_or_path!r}{hint} (built-in: {', '.join(known)}; or give a path to a .yaml file)"
            )
        path = found
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"recipe {path}: invalid YAML{where}: {problem}") from None
    return parse_recipe(data, source=str(path), overrides=overrides)
