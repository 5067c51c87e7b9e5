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

import copy
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from slimkit.config import Config
from slimkit.exceptions import ConfigError, UnknownNameError
from slimkit.finetune import FinetuneConfig
from slimkit.measure.latency import DEFAULT_LATENCY_THREADS
from slimkit.stages import STAGES
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
    model_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the model builder")
    weights: str | None = Field(None, description="state dict or checkpoint to load into the model; the baseline "
                                                  "is then not trained")
    train: TrainConfig = TrainConfig()
    latency_runs: int = Field(30, ge=1, description="timed forwards per latency figure (median and p99)")
    latency_threads: int = Field(
        DEFAULT_LATENCY_THREADS, ge=1,
        description="torch CPU threads while timing latency (fixed per run so that stages compare; default 1)",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads for training (default: torch's choice)")


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
    #: what the command line changed: ``{"flags": {...}, "set": ["PATH=VALUE", ...]}``
    overrides: dict[str, Any] = field(default_factory=dict)

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


def parse_recipe(data: Any, source: str = "", overrides: dict[str, Any] | None = None,
                 sets: Sequence[str] = ()) -> Recipe:
    """Validate recipe data (as loaded from YAML) with optional top-level overrides.

    ``overrides`` replace top-level keys (``epochs`` and ``seed`` go to ``train``), as the
    CLI flags do; then each ``sets`` entry ``PATH=VALUE`` (:func:`apply_sets`) sets any field.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {source}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in flags.items():
        if key in ("epochs", "seed"):
            data["train"] = {**(data.get("train") or {}), key: value}
        else:
            data[key] = value
    data = apply_sets(data, sets)
    stages_data = data.pop("stages", None) or []
    header = RecipeHeader.coerce(data)
    _check_names(header)
    if not isinstance(stages_data, list):
        raise ConfigError(f"stages: must be a list of stages, got {type(stages_data).__name__}")
    stages = tuple(_parse_stage(i, entry) for i, entry in enumerate(stages_data))
    return Recipe(header=header, stages=stages, source=source, overrides={"flags": flags, "set": list(sets)})


_SET_PATH = re.compile(r"([^.\[\]=]+)((?:\[-?\d+\])*)")


def _set_path(text: str) -> list[str | int]:
    """``stages[0].finetune.epochs`` -> ``['stages', 0, 'finetune', 'epochs']``; ConfigError when malformed."""
    parts: list[str | int] = []
    for piece in text.split("."):
        found = _SET_PATH.fullmatch(piece.strip())
        if found is None:
            raise ConfigError(f"--set {text}: {piece!r} is not a key or key[index]; "
                              "write e.g. stages[0].finetune.epochs")
        parts.append(found.group(1))
        parts += [int(i) for i in re.findall(r"-?\d+", found.group(2))]
    return parts


def apply_sets(data: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """A copy of recipe ``data`` with each ``PATH=VALUE`` of ``sets`` applied, in order.

    ``PATH`` names any recipe field with dots and list indices (``train.batch_size``,
    ``stages[0].finetune.epochs``, ``stages[1].magnitude.per_layer.fc*``); mappings on the
    way are created when missing. ``VALUE`` is read as YAML (``1``, ``0.5``, ``true``,
    ``[1, 2]``, ``{epochs: 1}``, ``null``). The result is validated like any recipe, so an
    unknown key or a bad value is reported with its path.

    >>> apply_sets({"name": "x", "stages": [{"train": {}}]}, ["stages[0].finetune.epochs=1", "train.lr=0.1"])
    {'name': 'x', 'stages': [{'train': {}, 'finetune': {'epochs': 1}}], 'train': {'lr': 0.1}}
    >>> apply_sets({"name": "x", "stages": []}, ["stages[2].lr=1"])
    Traceback (most recent call last):
    ...
    slimkit.exceptions.ConfigError: --set stages[2].lr=1: stages[2] does not exist (the recipe has 0 stages)
    """
    data = copy.deepcopy(data)
    for text in sets:
        path_text, sep, value_text = str(text).partition("=")
        if not sep or not path_text.strip():
            raise ConfigError(f"--set {text!r}: expected PATH=VALUE, e.g. --set stages[0].finetune.epochs=1")
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {text}: the value {value_text!r} is not valid YAML; quote it") from None
        parts = _set_path(path_text.strip())
        node: Any = data
        where = ""
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(part, int):
                if not isinstance(node, list):
                    raise ConfigError(f"--set {text}: {where} is not a list, so [{part}] cannot index it")
                if not -len(node) <= part < len(node):
                    raise ConfigError(f"--set {text}: {where}[{part}] does not exist (the recipe has {len(node)} "
                                      f"{'stages' if where == 'stages' else 'entries'})")
                where += f"[{part}]"
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {text}: {where} is {node!r}, not a mapping, so it has no key {part!r}")
                if (re.fullmatch(r"stages\[-?\d+\]", where) and part not in node
                        and part not in ("name", "finetune")):
                    kinds = [k for k in node if k not in ("name", "finetune")]
                    raise ConfigError(f"--set {text}: {where} is a {', '.join(map(repr, kinds))} stage; "
                                      f"set {where}.{kinds[0] if kinds else '<kind>'}.<field>")
                where += f".{part}" if where else part
                if not last and not isinstance(node.get(part), (dict, list)):
                    if node.get(part) is not None:
                        raise ConfigError(f"--set {text}: {where} is {node[part]!r}, not a mapping")
                    node[part] = {}
            if last:
                node[part] = value
            else:
                node = node[part]
    return data


def _check_names(header: RecipeHeader) -> None:
    from slimkit.data import DATASETS
    from slimkit.models.sources import check_source

    try:
        check_source(header.model)
    except ConfigError as err:
        raise type(err)(f"model: {err}") from None
    if header.baseline and header.weights:
        raise ConfigError("weights: and baseline: both give the starting model; keep one (baseline: a model file "
                          "slimkit wrote, weights: a state dict for model:)")
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


def load_recipe(name_or_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                sets: Sequence[str] = ()) -> Recipe:
    """A built-in recipe by name, or a YAML file by path, validated.

    ``overrides`` replace top-level keys (``model``, ``data``, ``data_dir``, ``epochs`` and
    ``seed`` of the baseline training, ...), as the CLI flags do; ``sets`` are ``--set
    PATH=VALUE`` assignments of any field (:func:`apply_sets`).
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
    return parse_recipe(data, source=str(path), overrides=overrides, sets=sets)
