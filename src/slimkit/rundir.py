"""Run directories that never mix two runs.

A run directory records the recipe it was started with (``recipe.yaml``: the effective
recipe, after the command-line flags and ``--set``; it runs again as it is with
``slimkit compress --recipe runs/NAME/recipe.yaml``) and a ``run.log`` of what the run said.

- A new run refuses a directory that already holds files, unless ``overwrite``, which
  clears what the old run left (only in a directory a slimkit run wrote: one that holds
  ``recipe.yaml``, ``report.json``, ``run.log``, ``models/`` or ``checkpoints/``). A
  directory holding only ``recipe.yaml`` and ``run.log`` (an attempt that stopped before
  computing anything) counts as empty.
- ``resume`` compares the recorded recipe with the requested one and refuses any
  difference, naming the first differing field; appending stages to the recorded ones is
  allowed (the finished stages stay what they were).

>>> recipe_difference({"train": {"epochs": 4}, "stages": []}, {"train": {"epochs": 1}, "stages": []})
'train.epochs: the run used 4, this command asks for 1'
>>> recipe_difference({"stages": [{"name": "a"}]}, {"stages": [{"name": "a"}, {"name": "b"}]}) is None
True
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from slimkit.atomic import atomic_write_bytes
from slimkit.exceptions import ConfigError

RECIPE_FILE = "recipe.yaml"
LOG_FILE = "run.log"
#: entries whose presence shows that a slimkit run wrote the directory
_MARKERS = (RECIPE_FILE, "report.json", LOG_FILE, "models", "checkpoints")
#: what a run writes before it computes anything: a directory holding only these is still unused
_RECORDS = frozenset({RECIPE_FILE, LOG_FILE})
#: recipe keys that change neither what a run computes nor what it measures
_IGNORED = frozenset({"name", "description", "data_dir", "download"})


class RunDirError(ConfigError):
    """A run directory that would mix two runs, or cannot hold one."""


class _Missing:
    def __repr__(self) -> str:
        return "(not set)"


_MISSING = _Missing()


def recipe_difference(recorded: dict[str, Any], requested: dict[str, Any]) -> str | None:
    """The first field where ``requested`` differs from ``recorded`` as one line, or None.

    Both are :meth:`slimkit.recipe.Recipe.to_dict` dicts. Cosmetic keys (name,
    description, where the data lives) are ignored; ``requested`` may append stages.
    """

    def show(value: Any) -> str:
        return repr(value) if isinstance(value, (str, _Missing)) else f"{value}"

    def walk(a: Any, b: Any, path: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in list(dict.fromkeys([*a, *b])):
                if not path and key in _IGNORED:
                    continue
                found = walk(a.get(key, _MISSING), b.get(key, _MISSING), f"{path}.{key}" if path else str(key))
                if found:
                    return found
            return None
        if isinstance(a, list) and isinstance(b, list):
            if path == "stages" and len(b) > len(a):
                b = b[: len(a)]  # appended stages: the recorded ones must be unchanged
            if len(a) != len(b):
                return f"{path}: the run had {len(a)}, this command asks for {len(b)}"
            for i, (x, y) in enumerate(zip(a, b)):
                found = walk(x, y, f"{path}[{i}]")
                if found:
                    return found
            return None
        if a != b:
            return f"{path}: the run used {show(a)}, this command asks for {show(b)}"
        return None

    return walk(recorded, requested, "")


def recorded_recipe(root: Path) -> dict[str, Any] | None:
    """The recipe a run in ``root`` recorded (``recipe.yaml``, else ``report.json``'s), or None."""
    import json

    path = root / RECIPE_FILE
    try:
        if path.is_file():
            data = yaml.safe_load(path.read_text())
            return data if isinstance(data, dict) else None
        report = root / "report.json"
        if report.is_file():
            data = json.loads(report.read_text()).get("recipe")
            return data if isinstance(data, dict) else None
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return None


def _is_run_dir(root: Path) -> bool:
    return any((root / name).exists() for name in _MARKERS)


def check(root: Path, recipe_dict: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """Refuse (ConfigError, one line) a run that would mix with what ``root`` holds; read-only."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: resume continues the run, "
                          "overwrite deletes it; pass one")
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--out {root}: is a file, not a directory; pass a new or empty directory")
    if not root.exists():
        return
    entries = [p.name for p in root.iterdir()]
    if resume:
        recorded = recorded_recipe(root)
        if recorded is not None:
            diff = recipe_difference(recorded, recipe_dict)
            if diff:
                raise RunDirError(f"--resume {root}: {diff}; resume with the same recipe and flags, "
                                  "or start over with --overwrite")
        elif entries:
            raise RunDirError(f"--resume {root}: no recorded recipe (recipe.yaml or report.json) here, so nothing "
                              "to compare the requested run with; pass --out the directory of a slimkit run")
        return
    if set(entries) <= _RECORDS:  # an earlier attempt stopped before computing anything
        return
    if not overwrite:
        raise RunDirError(f"--out {root}: already holds {len(entries)} entries ({', '.join(sorted(entries)[:4])}"
                          f"{', ...' if len(entries) > 4 else ''}); continue that run with --resume, replace it "
                          "with --overwrite, or pass another --out")
    if not _is_run_dir(root):
        raise RunDirError(f"--out {root}: holds files but no slimkit run (no recipe.yaml, report.json, models/); "
                          "--overwrite only clears run directories: pass a new or empty directory")


def prepare(root: Path, recipe_dict: dict[str, Any], overrides: dict[str, Any], *, overwrite: bool) -> None:
    """Create ``root`` (clearing it when ``overwrite``) and record the recipe; call after :func:`check`."""
    try:
        if root.is_dir() and (overwrite or {p.name for p in root.iterdir()} <= _RECORDS):
            for entry in root.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        root.mkdir(parents=True, exist_ok=True)
        header = "# The recipe this run used, after the command-line flags and --set:\n"
        header += "".join(f"#   --set {s}\n" for s in overrides.get("set", []))
        header += "".join(f"#   --{k.replace('_', '-')} {v}\n" for k, v in overrides.get("flags", {}).items())
        text = header + yaml.safe_dump(recipe_dict, sort_keys=False)
        atomic_write_bytes(root / RECIPE_FILE, text.encode())
    except OSError as err:
        raise RunDirError(f"--out {root}: cannot write there ({err.strerror or type(err).__name__}"
                          f"{': ' + err.filename if err.filename else ''}); pass a writable directory") from None


class RunLog:
    """Appends time-stamped lines to ``run.log`` in the run directory (opened per line: survives a crash)."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOG_FILE

    def __call__(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.path.open("a", encoding="utf-8") as handle:
            for line in str(message).splitlines() or [""]:
                handle.write(f"{stamp} {line}\n")
