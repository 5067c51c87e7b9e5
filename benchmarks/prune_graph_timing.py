"""Time building the channel graph and pruning 50% of channels, against Torch-Pruning.

For each model: slimkit's ``build_graph`` and ``structured_`` (l1, local, 50%) on a fresh
copy, and — when the optional ``torch_pruning`` package is installed — Torch-Pruning's
``DependencyGraph.build_dependency`` and ``MagnitudePruner`` at the same ratio, in the same
run. Prints seconds and the ratio slimkit / Torch-Pruning (below 1 = slimkit faster).

    python benchmarks/prune_graph_timing.py --models resnet50,mobilenet_v3_large --size 224
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from slimkit.prune import structured_
from slimkit.prune.graph import build_graph


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_slimkit(name: str, x: torch.Tensor) -> tuple[float, float]:
    model = getattr(torchvision.models, name)(weights=None).eval()
    graph_s = _seconds(lambda: build_graph(model, x))
    prune_s = _seconds(lambda: structured_(model, x, {"ratio": 0.5, "criterion": "l1", "scope": "local"}))
    return graph_s, prune_s


def time_torch_pruning(name: str, x: torch.Tensor) -> tuple[float, float] | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    model = getattr(torchvision.models, name)(weights=None).eval()
    graph_s = _seconds(lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x))
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=classifier)
    prune_s = _seconds(pruner.step)
    return graph_s, prune_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.zeros(1, 3, args.size, args.size)
    print("| model | slimkit graph s | slimkit prune 50% s | Torch-Pruning graph s | Torch-Pruning prune s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        ours = time_slimkit(name, x)
        theirs = time_torch_pruning(name, x)
        if theirs is None:
            print(f"| {name} | {ours[0]:.2f} | {ours[1]:.2f} | not installed | not installed | - |")
        else:
            ratio = (ours[0] + ours[1]) / (theirs[0] + theirs[1])
            print(f"| {name} | {ours[0]:.2f} | {ours[1]:.2f} | {theirs[0]:.2f} | {theirs[1]:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
