"""Every built-in recipe's report figures, recorded and compared: the check that a refactor changed nothing.

Runs each recipe as a user would (``slimkit compress --recipe NAME``, one subprocess per recipe,
so no global state leaks between them), optionally shortened, and records per stage the figures
people compare: accuracy (%), params, nonzeros, MACs, stored bytes, phase. With ``--compare``
the new figures are checked against a recorded file: params, nonzeros, MACs and bytes must be
identical, accuracy within ``--accuracy-tol`` points (one digits test image is 0.28 points).

    python benchmarks/recipe_figures.py --epochs 2 --finetune-epochs 1 --out runs/figures-before
    python benchmarks/recipe_figures.py --epochs 2 --finetune-epochs 1 --out runs/figures-after \\
        --compare runs/figures-before/figures.json

Shortened runs (``--epochs``/``--finetune-epochs``) keep every structural decision data-driven
(global thresholds, sensitivity-chosen bits) while finishing in minutes; a full run omits them.
Exit status 1 when ``--compare`` finds a difference. Run both sides from the same working
directory (or with the same ``--data-dir``): a ``.slim`` file records the absolute data directory,
so two checkouts in different folders differ by those bytes in the encode stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STRUCTURAL = ("params", "nonzeros", "macs", "bytes", "phase")


def _stage_sets(name: str, finetune_epochs: int | None) -> list[str]:
    from slimkit.recipe import load_recipe

    if finetune_epochs is None:
        return []
    recipe = load_recipe(name)
    return [f"stages[{i}].finetune.epochs={finetune_epochs}" for i, stage in enumerate(recipe.stages)
            if stage.finetune is not None]


def run_one(name: str, out: Path, args: argparse.Namespace) -> dict:
    """Run recipe ``name`` into ``out/name``; its per-stage figures (or the error's last line)."""
    cmd = [sys.executable, "-m", "slimkit.cli", "compress", "--recipe", name, "--out", str(out / name),
           "--overwrite", "--no-progress", "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    sets = _stage_sets(name, args.finetune_epochs)
    if sets:
        cmd += ["--set", *sets]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    elapsed = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"recipe": name, "error": tail, "elapsed_s": elapsed}
    report = json.loads((out / name / "report.json").read_text())
    stages = [{key: row.get(key) for key in ("name", "kind", "accuracy", *STRUCTURAL)} for row in report["stages"]]
    return {"recipe": name, "stages": stages, "elapsed_s": elapsed}


def compare(new: dict, old: dict, accuracy_tol: float) -> list[str]:
    """Differences of ``new`` from ``old`` (both ``{recipe: result}``), one line each."""
    problems = []
    for name, before in old.items():
        after = new.get(name)
        if after is None:
            continue
        if "error" in after or "error" in before:
            if after.get("error") != before.get("error"):
                problems.append(f"{name}: before {before.get('error', 'ran')!r}, after {after.get('error', 'ran')!r}")
            continue
        if [s["name"] for s in after["stages"]] != [s["name"] for s in before["stages"]]:
            problems.append(f"{name}: stages differ")
            continue
        for a, b in zip(after["stages"], before["stages"]):
            for key in STRUCTURAL:
                if a.get(key) != b.get(key):
                    problems.append(f"{name}/{a['name']}: {key} {b.get(key)} -> {a.get(key)}")
            if a["accuracy"] is not None and b["accuracy"] is not None and \
                    abs(a["accuracy"] - b["accuracy"]) > accuracy_tol:
                problems.append(f"{name}/{a['name']}: accuracy {b['accuracy']:.2f} -> {a['accuracy']:.2f}")
    return problems


def main() -> int:
    from slimkit.atomic import atomic_write_bytes
    from slimkit.recipe import list_recipes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="", help="comma-separated names (default: every built-in recipe)")
    parser.add_argument("--epochs", type=int, default=None, help="baseline training epochs (default: the recipe's)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="every stage's fine-tune epochs (default: the recipe's)")
    parser.add_argument("--data-dir", default=None,
                        help="dataset directory passed to every run (give both sides the same absolute path)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per recipe run")
    parser.add_argument("--jobs", type=int, default=2, help="recipes run at once")
    parser.add_argument("--out", default="runs/recipe-figures")
    parser.add_argument("--compare", default=None, help="figures.json of an earlier run to check against")
    parser.add_argument("--accuracy-tol", type=float, default=1.0, help="allowed accuracy change (points)")
    args = parser.parse_args()

    names = [n for n in args.recipes.split(",") if n] or [n for n, _ in list_recipes()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}

    def one(name: str) -> None:
        results[name] = run_one(name, out, args)
        line = results[name].get("error") or ", ".join(
            f"{s['name']} {s['accuracy']:.2f}% {s['bytes']:,} B" for s in results[name]["stages"])
        print(f"[{len(results)}/{len(names)}] {name} ({results[name]['elapsed_s']} s): {line}", flush=True)
        atomic_write_bytes(out / "figures.json", json.dumps(dict(sorted(results.items())), indent=1).encode())

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, names))
    if args.compare:
        problems = compare(results, json.loads(Path(args.compare).read_text()), args.accuracy_tol)
        for line in problems:
            print("DIFFERENT", line)
        print(f"{len(names)} recipes compared with {args.compare}: {len(problems)} differences")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
