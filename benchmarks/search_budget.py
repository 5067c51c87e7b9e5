"""Budget search against uniform structured pruning, in one run (the figures of docs/search.md).

Part ``latency`` (per model, default resnet20-cifar and mobilenet_v2 on the embedded digits):
``slimkit search --budget latency_p99_ms=0.5x --engine onnxruntime`` (the baseline's p99 measured
end to end, halved), then *uniform* structured pruning (one L1 channel ratio for every group)
at the ratio whose measured ONNX Runtime p99 is closest to the chosen model's, fine-tuned from
the same baseline for the same epochs with the same settings. At the end baseline, chosen and
uniform are timed again round-robin (three rounds, median) so that the same machine load
hits all three. Printed: both accuracies and p99s, whether the budget is met, the ratio.

Part ``size``: ``--budget size_bytes=20000`` on LeNet-5 with channels, ranks and bits: which
combination of techniques the search chose.

Part ``energy``: the 45 nm energy estimate (Horowitz 2014) of every stage of four built-in
recipes (run without training: energy follows structure, bytes and precision), at two SRAM
sizes, so the DRAM -> SRAM switch shows.

    nice python benchmarks/search_budget.py --parts latency,size,energy --out runs/bench-search

Results: ``<out>/results.json`` (rewritten after each part) and the search directories; the
Pareto plots are copied to ``docs/img/search-<model>-pareto.png``. Figures are wall-clock on
whatever machine runs it (state it next to them: a shared machine makes p99 noisy).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch

from slimkit.atomic import atomic_write_bytes


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


def _save(out: Path, results: dict) -> None:
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=1, default=str).encode())


def latency_part(model_name: str, out: Path, args: argparse.Namespace) -> dict:
    from slimkit.manifest import load_model
    from slimkit.pipeline import run_recipe
    from slimkit.prune import structured_
    from slimkit.recipe import parse_recipe
    from slimkit.search import search
    from slimkit.search.latency import end_to_end

    sdir = out / f"latency-{model_name}"
    started = time.perf_counter()
    result = search({"model": model_name, "budget": "latency_p99_ms=0.5x", "engine": "onnxruntime",
                     "epochs": args.epochs, "final_epochs": args.final_epochs, "trial_epochs": 1,
                     "trial_samples": args.trial_samples, "sensitivity_samples": args.sensitivity_samples,
                     "population": 12, "generations": 6, "greedy_candidates": 1, "evolution_trials": 1,
                     "max_steps": 6, "step_share": 0.2, "ratios": _floats(args.ratios), "ranks": _floats(args.ranks),
                     "runner": args.runner, "seed": 0}, sdir)
    search_s = time.perf_counter() - started
    baseline = load_model(sdir / "baseline.pt").eval()
    chosen_model = load_model(sdir / "final" / "model.pt").eval()
    example = torch.zeros(json.loads((sdir / "final" / "report.json").read_text())["example_input_shape"])
    target = result["chosen"]["latency_p99_ms"]
    # uniform structured pruning: the ratio whose measured latency is closest to the chosen model's, matched
    # on the median (timed now, beside the grid): under foreign load a p99 moves by a scheduler time slice
    # from one series to the next, the median does not. 0.25/0.5/0.75 keep channel counts multiples of 4,
    # which ONNX Runtime's convolutions run faster than the odd counts of 0.3 or 0.7.
    chosen_median = end_to_end(chosen_model, example, "onnxruntime")["median_ms"]
    grid = {}
    for ratio in (0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75):
        pruned = copy.deepcopy(baseline)
        structured_(pruned, example, {"ratio": ratio, "criterion": "l1"})
        grid[ratio] = end_to_end(pruned, example, "onnxruntime")
    ratio = min(grid, key=lambda r: abs(grid[r]["median_ms"] - chosen_median))
    header = {k: v for k, v in json.loads((sdir / "final" / "report.json").read_text())["recipe"].items()
              if k in ("model", "data", "data_dir", "train", "threads", "baseline")}
    recipe = parse_recipe({**header, "name": f"uniform-{model_name}",
                           "stages": [{"name": f"uniform-{ratio:g}",
                                       "structured": {"ratio": ratio, "criterion": "l1"},
                                       "finetune": {"epochs": args.final_epochs}}]}, "benchmark")
    import inspect

    fresh = {"overwrite": True} if "overwrite" in inspect.signature(run_recipe).parameters else {}
    uniform_report = run_recipe(recipe, out / f"uniform-{model_name}", progress=False, log=lambda _m: None, **fresh)
    uniform_model = load_model(out / f"uniform-{model_name}" / "model.pt").eval()
    # the same load for all three: round-robin, three rounds, median
    rounds: dict[str, list[dict[str, float]]] = {"baseline": [], "chosen": [], "uniform": []}
    for _ in range(3):
        for name, model in (("baseline", baseline), ("chosen", chosen_model), ("uniform", uniform_model)):
            rounds[name].append(end_to_end(model, example, "onnxruntime"))
    p99 = {name: float(torch.tensor([t["p99_ms"] for t in v]).median()) for name, v in rounds.items()}
    median = {name: float(torch.tensor([t["median_ms"] for t in v]).median()) for name, v in rounds.items()}
    shutil.copyfile(sdir / "pareto.png", Path("docs/img") / f"search-{model_name}-pareto.png")
    row = {
        "model": model_name, "budget_ms": result["budget"]["value"],
        "baseline": {"accuracy": result["baseline"]["accuracy"], "p99_search_ms": result["baseline"]["latency_p99_ms"],
                     "p99_roundrobin_ms": p99["baseline"], "median_roundrobin_ms": median["baseline"]},
        "chosen": {"accuracy": result["chosen"]["accuracy"], "p99_search_ms": target,
                   "p99_roundrobin_ms": p99["chosen"], "median_roundrobin_ms": median["chosen"],
                   "settings": result["chosen"]["settings"],
                   "meets_budget_in_search": result["chosen"]["meets_budget"],
                   "meets_budget_roundrobin": p99["chosen"] <= result["budget"]["value"],
                   "p99_over_baseline_roundrobin": p99["chosen"] / p99["baseline"]},
        "uniform": {"ratio": ratio, "accuracy": uniform_report["stages"][-1]["accuracy"],
                    "p99_roundrobin_ms": p99["uniform"], "median_roundrobin_ms": median["uniform"],
                    "chosen_median_ms_at_grid": chosen_median, "grid_ms": grid},
        "accuracy_gain_points": result["chosen"]["accuracy"] - uniform_report["stages"][-1]["accuracy"],
        "latency_predictor": {k: v for k, v in result.get("latency_predictor", {}).items() if k != "pairs"},
        "search_s": round(search_s, 1), "trials": len(result["trials"]),
    }
    print(f"{model_name}: budget p99 {row['budget_ms']:.3f} ms | baseline {row['baseline']['accuracy']:.2f}% "
          f"p99 {p99['baseline']:.3f} ms (median {median['baseline']:.3f}) | chosen {row['chosen']['accuracy']:.2f}% "
          f"p99 {p99['chosen']:.3f} ms (median {median['chosen']:.3f}; "
          f"{'meets' if row['chosen']['meets_budget_roundrobin'] else 'MISSES'} the budget, "
          f"{row['chosen']['p99_over_baseline_roundrobin']:.2f}x the round-robin baseline) | uniform r={ratio:g} "
          f"{row['uniform']['accuracy']:.2f}% p99 {p99['uniform']:.3f} ms (median {median['uniform']:.3f}) | "
          f"gain {row['accuracy_gain_points']:+.2f} pt")
    return row


def size_part(out: Path, args: argparse.Namespace) -> dict:
    from slimkit.search import search

    result = search({"model": "lenet5", "budget": "size_bytes=20000", "engine": "onnxruntime", "epochs": args.epochs,
                     "final_epochs": args.final_epochs, "trial_epochs": 1, "trial_samples": args.trial_samples,
                     "techniques": ["channels", "rank", "bits"], "sensitivity_samples": 128, "population": 16,
                     "generations": 8, "greedy_candidates": 2, "evolution_trials": 2, "max_steps": 10,
                     "step_share": 0.2, "runner": args.runner, "seed": 0}, out / "size-lenet5")
    shutil.copyfile(out / "size-lenet5" / "pareto.png", Path("docs/img") / "search-lenet5-size-pareto.png")
    techniques = sorted({k.split(":", 1)[0] for k in result["chosen"]["settings"]})
    row = {"model": "lenet5", "budget_bytes": result["budget"]["value"], "baseline": result["baseline"],
           "chosen": result["chosen"], "techniques": techniques}
    print(f"lenet5 size: {result['baseline']['size_bytes']:,.0f} B {result['baseline']['accuracy']:.2f}% -> "
          f"{result['chosen']['size_bytes']:,.0f} B {result['chosen']['accuracy']:.2f}% "
          f"({'meets' if result['chosen']['meets_budget'] else 'MISSES'} 20,000 B) with {', '.join(techniques)}")
    return row


ENERGY_RECIPES = ("deep-compression-lenet300", "deep-compression", "int8-ptq", "prune-int8")


def energy_part(out: Path, names: tuple[str, ...] = ENERGY_RECIPES) -> dict:
    """Energy estimate of every stage of built-in recipes, at 512 KiB and 64 KiB of SRAM.

    Energy depends on the model's structure, stored bytes and precision, not on how well it
    was trained, so each recipe runs with no training (baseline and fine-tune epochs 0): the
    stages' sizes and precisions are the recipe's, the accuracies are not (not reported).
    """
    import yaml

    from slimkit.measure.energy import EnergyEstimate, with_weight_bytes
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import builtin_recipe_path, parse_recipe

    rows = []
    for name in names:
        data = yaml.safe_load(builtin_recipe_path(name).read_text())
        data["train"] = {**(data.get("train") or {}), "epochs": 0}
        for stage in data.get("stages", []):
            if "finetune" in stage:
                stage["finetune"] = {**{k: v for k, v in stage["finetune"].items() if k != "distill"}, "epochs": 0}
        try:
            import inspect

            fresh = {"overwrite": True} if "overwrite" in inspect.signature(run_recipe).parameters else {}
            report = run_recipe(parse_recipe(data, name), out / f"energy-{name}", progress=False,
                                log=lambda _m: None, **fresh)
        except Exception as err:  # a recipe whose stages need training to run: say so, keep the others
            rows.append({"recipe": name, "error": f"{type(err).__name__}: {str(err)[:160]}"})
            continue
        for stage in report["stages"]:
            fields = {k: stage["energy"][k] for k in EnergyEstimate.__dataclass_fields__}
            at = {size: with_weight_bytes(EnergyEstimate(**{**fields, "sram_bytes": size}), stage["bytes"])
                  for size in (64 * 1024, 512 * 1024)}
            rows.append({"recipe": name, "stage": stage["name"], "bytes": stage["bytes"], "macs": stage["macs"],
                         "macs_int8": at[65536].macs_int8, "uj_sram_64k": round(at[65536].total_uj, 3),
                         "weights_64k": at[65536].weights_in, "uj_sram_512k": round(at[524288].total_uj, 3),
                         "weights_512k": at[524288].weights_in})
            r = rows[-1]
            print(f"{name:26s} {r['stage']:16s} {r['bytes']:>10,} B  {r['uj_sram_64k']:>9.3f} uJ "
                  f"({r['weights_64k']})  {r['uj_sram_512k']:>9.3f} uJ ({r['weights_512k']})")
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="latency,size,energy")
    parser.add_argument("--models", default="resnet20-cifar,mobilenet_v2")
    parser.add_argument("--epochs", type=int, default=3, help="baseline training epochs")
    parser.add_argument("--final-epochs", type=int, default=2)
    parser.add_argument("--trial-samples", type=int, default=384, help="training samples of each trial")
    parser.add_argument("--sensitivity-samples", type=int, default=64)
    parser.add_argument("--ratios", default="0.25,0.5,0.75", help="channel ratios of the latency search")
    parser.add_argument("--ranks", default="0.25", help="rank fractions of the latency search")
    parser.add_argument("--runner", default="sequential", choices=["auto", "ray", "sequential"])
    parser.add_argument("--out", default="runs/bench-search")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    parts = args.parts.split(",")
    if "latency" in parts:
        for name in args.models.split(","):
            results.setdefault("latency", {})[name] = latency_part(name, out, args)
            _save(out, results)
    if "size" in parts:
        results["size"] = size_part(out, args)
        _save(out, results)
    if "energy" in parts:
        results["energy"] = energy_part(out)
        _save(out, results)


if __name__ == "__main__":
    main()
