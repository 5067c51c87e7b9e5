"""Time building the channel graph and pruning 50% of channels, against Torch-Pruning.

For each model, after one untimed forward (so that neither library pays the first-call
cost of the conv kernels), the median over ``--repeats`` fresh models of:

- slimkit ``build_graph`` with an empty graph cache;
- slimkit ``structured_`` (l1, local, 50%) with an empty graph cache: graph, scores,
  selection, surgery and the MAC counts of its report;
- the same with the graph cached (a deep copy of a model already traced: one step of a
  ratio search);
- when the optional ``torch_pruning`` package is installed, Torch-Pruning's
  ``DependencyGraph.build_dependency``, and ``MagnitudePruner`` construction (which builds
  its graph) plus ``step`` at the same ratio.

The ratio is slimkit prune / Torch-Pruning prune, both from an unpruned model (below 1 =
slimkit faster).

    python benchmarks/prune_graph_timing.py --models resnet50,mobilenet_v3_large --size 224
"""

from __future__ import annotations

import argparse
import copy
import statistics
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
    """Median seconds of ``timed(model)`` over ``repeats`` models from ``make`` (not timed)."""
    runs = []
    for _ in range(repeats):
        model = make()
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

    def prune(model: torch.nn.Module) -> None:
        classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
        tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=CONFIG["ratio"], ignored_layers=classifier).step()

    graph_s = _median(make, lambda m: tp.DependencyGraph().build_dependency(m, example_inputs=x), repeats)
    return graph_s, _median(make, prune, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="fresh models per measurement (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    x = torch.zeros(1, 3, args.size, args.size)
    print("| model | slimkit graph s | slimkit prune 50% s | slimkit prune, graph cached s | "
          "Torch-Pruning graph s | Torch-Pruning prune s | slimkit / Torch-Pruning |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        def make(name=name):
            return getattr(torchvision.models, name)(weights=None).eval()

        with torch.no_grad():
            make()(x)
        graph_s, prune_s, cached_s = time_slimkit(make, x, args.repeats)
        theirs = time_torch_pruning(make, x, args.repeats)
        if theirs is None:
            print(f"| {name} | {graph_s:.2f} | {prune_s:.2f} | {cached_s:.2f} | not installed | not installed | - |")
        else:
            print(f"| {name} | {graph_s:.2f} | {prune_s:.2f} | {cached_s:.2f} | {theirs[0]:.2f} | {theirs[1]:.2f} "
                  f"| {prune_s / theirs[1]:.2f}x |")


if __name__ == "__main__":
    main()
