"""Time building the channel graph and pruning 50% of channels, against Torch-Pruning.

For each model, after one untimed forward (so that neither library pays the first-call
cost of the conv kernels), the median over ``--repeats`` fresh models (a full garbage collection
before each timed call, for both libraries) of:

- slimkit ``build_graph`` with an empty graph cache;
- slimkit ``structured_`` (l1, local, 50%) with an empty graph cache: graph, scores,
  selection, surgery and the MAC counts of its report;
- the same with the graph cached (a deep copy of a model already traced: one step of a
  ratio search);
- when the optional ``torch_pruning`` package is installed, Torch-Pruning's
  ``DependencyGraph.build_dependency``, and ``MagnitudePruner`` construction (which builds
  its graph) plus ``step`` at the same ratio.

The ratio is slimkit prune / Torch-Pruning prune, both from an unpruned model (below 1 =
slimkit faster). Models are torchvision names or ``timm:NAME``. ``--cold`` adds the first
prune call in a fresh process for each library (what one CLI call pays: imports done, one
untimed forward, then the first call, which includes every lazy import and first-use cost).

    python benchmarks/prune_graph_timing.py --models resnet50,mobilenet_v3_large --size 224
    python benchmarks/prune_graph_timing.py --cold --repeats 3 --models \
        resnet50,mobilenet_v3_large,efficientnet_b0,timm:resnet50,timm:mobilenetv3_large_100,timm:efficientnet_b0

``--split`` prints instead where one slimkit prune spends its time (fx trace, shape
propagation, op rules, assembly, cache key, criterion, MAC counts, report sizes, surgery).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torchvision

from slimkit.prune import structured_
from slimkit.prune.graph import build_graph, clear_graph_cache

CONFIG = {"ratio": 0.5, "criterion": "l1", "scope": "local"}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median(make: Callable[[], torch.nn.Module], timed: Callable[[torch.nn.Module], object], repeats: int) -> float:
    """Median seconds of ``timed(model)`` over ``repeats`` models from ``make`` (not timed); a full garbage
    collection before each (see :func:`cold_one`), so that none lands in a timed call by chance."""
    runs = []
    for _ in range(repeats):
        model = make()
        gc.collect()
        runs.append(_seconds(lambda m=model: timed(m)))
    return statistics.median(runs)


def _cold(fn: Callable[[torch.nn.Module], object]) -> Callable[[torch.nn.Module], object]:
    def run(model: torch.nn.Module) -> object:
        clear_graph_cache()
        return fn(model)

    return run


def time_slimkit(make, x: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """Seconds of (graph, prune from scratch, prune with the graph cached)."""
    graph_s = _median(make, _cold(lambda m: build_graph(m, x)), repeats)
    prune_s = _median(make, _cold(lambda m: structured_(m, x, CONFIG)), repeats)
    traced = make()
    build_graph(traced, x)
    cached_s = _median(lambda: copy.deepcopy(traced), lambda m: structured_(m, x, CONFIG), repeats)
    return graph_s, prune_s, cached_s


def time_torch_pruning(make, x: torch.Tensor, repeats: int) -> tuple[float, float] | None:
    """Seconds of (graph, pruner construction + step), or None without torch_pruning."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None

    graph_s = _median(make, lambda m: tp.DependencyGraph().build_dependency(m, example_inputs=x), repeats)
    return graph_s, _median(make, lambda m: _tp_prune(m, x), repeats)


def build(name: str) -> torch.nn.Module:
    """A torchvision model by name, or a timm model as ``timm:NAME`` (random init)."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:]).eval()
    return getattr(torchvision.models, name)(weights=None).eval()


def _tp_prune(model: torch.nn.Module, x: torch.Tensor) -> None:
    import torch_pruning as tp

    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                              pruning_ratio=CONFIG["ratio"], ignored_layers=classifier).step()


def cold_one(lib: str, name: str, size: int) -> float:
    """Seconds of the first prune call in this (fresh) process, after one untimed forward.

    One full garbage collection before the call, for both libraries: the imports leave a few hundred
    thousand objects that the collector has not yet examined, and the first full collection (~0.17 s
    with torch loaded) falls into whichever call's allocations happen to trigger it; which call that is
    depends on the process's collection counters (even on the order of the imports), not on the library.
    """
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, x = build(name), torch.zeros(1, 3, size, size)
    with torch.no_grad():
        model(x)
    if lib != "slimkit":
        import torch_pruning  # noqa: F401  (imported before timing, as slimkit is)
    gc.collect()
    if lib == "slimkit":
        return _seconds(lambda: structured_(model, x, CONFIG))
    return _seconds(lambda: _tp_prune(model, x))


#: (module, function, stage) timed by ``--split``: where one ``structured_`` call spends its time
SPLIT = [
    ("slimkit.prune.graph.trace", "trace_model", "fx trace"),
    ("slimkit.prune.graph.trace", "propagate_on_meta", "shapes"),
    ("slimkit.prune.graph.builder", "Builder.run", "op rules"),
    ("slimkit.prune.graph", "assemble", "assembly"),
    ("slimkit.prune.graph", "structure_key", "cache key"),
    ("slimkit.prune.structured", "traced_macs", "MACs"),
    ("slimkit.prune.structured", "count_params_nonzeros", "sizes"),
    ("slimkit.prune.structured", "stored_bytes", "sizes"),
    ("slimkit.prune.structured", "prune_units_", "surgery"),
]


def split(make, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds per stage of ``structured_`` from scratch and the total (the run with the median total)."""
    import importlib

    from slimkit.prune.criteria import CRITERIA

    spent: dict[str, float] = {}

    def timed(fn, stage):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - start
        return run

    saved = []
    for module, attr, stage in SPLIT:
        owner = importlib.import_module(module)
        if "." in attr:
            cls, attr = attr.split(".")
            owner = getattr(owner, cls)
        saved.append((owner, attr, owner.__dict__[attr]))
        setattr(owner, attr, timed(getattr(owner, attr), stage))
    get = CRITERIA.get
    CRITERIA.get = lambda name: timed(get(name), "criterion")  # an instance attribute, deleted below
    runs = []
    try:
        for _ in range(repeats):
            model = make()
            clear_graph_cache()
            spent.clear()
            total = _seconds(lambda m=model: structured_(m, x, CONFIG))
            runs.append({**spent, "rest": total - sum(spent.values()), "total": total})
    finally:
        del CRITERIA.get
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
    runs.sort(key=lambda r: r["total"])
    return runs[len(runs) // 2]


def cold(lib: str, name: str, size: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--cold-one", f"{lib}:{name}", "--size", str(size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="fresh models per measurement (median)")
    parser.add_argument("--cold", action="store_true", help="add first-call times in fresh processes")
    parser.add_argument("--cold-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--split", action="store_true",
                        help="instead: seconds per stage of slimkit's prune (trace, shapes, op rules, ...)")
    args = parser.parse_args()
    if args.cold_one:
        lib, name = args.cold_one.split(":", 1)
        print(json.dumps({"s": cold_one(lib, name, args.size)}))
        return
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    x = torch.zeros(1, 3, args.size, args.size)
    if args.split:
        stages = list(dict.fromkeys(stage for _, _, stage in SPLIT)) + ["criterion", "rest", "total"]
        print("| model | " + " | ".join(f"{s} s" for s in stages) + " |")
        print("|---|" + "---:|" * len(stages))
        for name in args.models.split(","):
            with torch.no_grad():
                build(name)(x)
            found = split(lambda name=name: build(name), x, args.repeats)
            print(f"| {name} | " + " | ".join(f"{found.get(s, 0.0):.3f}" for s in stages) + " |", flush=True)
        return
    cold_cols = " slimkit cold s | Torch-Pruning cold s | cold ratio |" if args.cold else ""
    print("| model | slimkit graph s | slimkit prune 50% s | slimkit prune, graph cached s | "
          f"Torch-Pruning graph s | Torch-Pruning prune s | slimkit / Torch-Pruning |{cold_cols}")
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if args.cold else ""))
    for name in args.models.split(","):
        def make(name=name):
            return build(name)

        with torch.no_grad():
            make()(x)
        graph_s, prune_s, cached_s = time_slimkit(make, x, args.repeats)
        theirs = time_torch_pruning(make, x, args.repeats)
        extra = ""
        if args.cold:
            ours_c, theirs_c = cold("slimkit", name, args.size), cold("torch_pruning", name, args.size)
            extra = f" {ours_c:.2f} | {theirs_c:.2f} | {ours_c / theirs_c:.2f}x |"
        if theirs is None:
            print(f"| {name} | {graph_s:.2f} | {prune_s:.2f} | {cached_s:.2f} | not installed | not installed | - |")
        else:
            print(f"| {name} | {graph_s:.2f} | {prune_s:.2f} | {cached_s:.2f} | {theirs[0]:.2f} | {theirs[1]:.2f} "
                  f"| {prune_s / theirs[1]:.2f}x |{extra}", flush=True)


if __name__ == "__main__":
    main()
