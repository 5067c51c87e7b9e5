"""Every recipe and command in README.md and docs/*.md is valid, checked with slimkit's own parser.

- A ```yaml block is a recipe: it must pass :func:`slimkit.recipe.parse_recipe` (a block
  without ``name:`` is a recipe fragment, validated with a name added). A YAML block that
  is not a recipe says so on its first line: ``# not a recipe``.
- Every ``slimkit ...`` line of a ```bash / ```shell / ```sh block, and every inline
  `` `slimkit ...` `` span, must name a real subcommand with real flags: it is parsed by
  :func:`slimkit.cli.build_parser` (not run). ``[optional]`` brackets and ``A\\|B``
  alternatives of the command table are read as the words inside them.
- Every ``python benchmarks/X.py`` names a script that exists, with flags its argparse declares;
  every ``make X`` a Makefile target.
"""

import functools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from slimkit.cli import build_parser
from slimkit.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_A_RECIPE = "# not a recipe"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELLS = {"bash", "shell", "sh", "console"}


def _blocks(lang: set[str]) -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for found in FENCE.finditer(text):
            if found.group(1) in lang:
                line = text[: found.start()].count("\n") + 1
                out.append((f"{doc.name}:{line}", found.group(2)))
    return out


def _inline(prefix: str) -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        text = FENCE.sub("", doc.read_text())  # fenced blocks are checked on their own
        for span in re.findall(r"`([^`\n]+)`", text):
            if re.match(prefix, span):
                out.append((doc.name, span))
    return out


def _commands() -> list[tuple[str, str]]:
    lines = []
    for where, body in _blocks(SHELLS):
        joined = body.replace("\\\n", " ")
        lines += [(where, line.strip().removeprefix("$ ")) for line in joined.splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    return lines + _inline(r"(\.venv/bin/)?(slimkit|python|make|torchrun)\b")


def _words(command: str) -> list[str]:
    command = command.replace("\\|", "|").replace("[", " ").replace("]", " ")
    command = command.split(" # ")[0]
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words.pop(0)
    return words


@functools.lru_cache(maxsize=1)
def _parser():
    return build_parser()


def _check_slimkit(words: list[str]) -> None:
    parser = _parser()
    expanded = [word.split("|")[0] for word in words]  # the command table writes alternatives as A|B
    try:
        parser.parse_args(expanded)
    except SystemExit as done:  # --version / --help print and exit 0
        assert done.code == 0, f"slimkit {' '.join(words)}: exit {done.code}"


def _check_benchmark(script: str, flags: list[str]) -> None:
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    source = path.read_text()
    for flag in flags:
        assert f'"{flag}"' in source or f"'{flag}'" in source, f"{script} declares no flag {flag}"


def _check(where: str, command: str) -> None:
    words = _words(command)
    if not words:
        return
    head = words[0].removeprefix(".venv/bin/")
    if head == "slimkit":
        _check_slimkit(words[1:])
    elif head == "torchrun" and "-m" in words and words[words.index("-m") + 1] == "slimkit.cli":
        _check_slimkit(words[words.index("-m") + 2:])
    elif head.startswith("python") and len(words) > 1 and words[1].startswith("benchmarks/"):
        _check_benchmark(words[1], [w.split("=")[0] for w in words[2:] if w.startswith("--")])
    elif head == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        for target in words[1:]:
            assert target in targets, f"{where}: make {target}: no such Makefile target"


@pytest.mark.parametrize("where,body", _blocks({"yaml", "yml"}), ids=lambda v: v if ":" in str(v) else "")
def test_yaml_blocks_are_recipes(where, body):
    if body.lstrip().startswith(NOT_A_RECIPE):
        return
    data = yaml.safe_load(body)
    assert isinstance(data, dict), f"{where}: a YAML block must be a mapping (or start with '{NOT_A_RECIPE}')"
    parse_recipe({"name": "doc-fragment", **data} if "name" not in data else data, source=where)


@pytest.mark.parametrize("where,command", _commands(), ids=lambda v: str(v)[:60])
def test_commands_name_real_subcommands_and_flags(where, command):
    _check(where, command)


def test_the_checks_can_fail():
    from slimkit.exceptions import ConfigError

    with pytest.raises(ConfigError, match="unrecognized arguments: --no-such-flag"):
        _check("here", "slimkit compress --no-such-flag")
    with pytest.raises(ConfigError, match="invalid choice"):
        _check("here", "slimkit compres --recipe kd")
    with pytest.raises(AssertionError, match="does not exist"):
        _check("here", "python benchmarks/no_such_script.py")
    with pytest.raises(AssertionError, match="declares no flag"):
        _check("here", "python benchmarks/sparse_fc.py --no-such-flag 1")
    with pytest.raises(ConfigError, match="share.bits: unknown key"):
        test_yaml_blocks_are_recipes("here", "name: x\nstages:\n  - share: {bits: 4}\n")
    assert len(_blocks({"yaml"})) >= 2 and len(_commands()) >= 20
