"""Accuracy vs whole-model MAC reduction, for every decomposition method on the same model.

Trains one baseline on the embedded digits set, then for each method and each global
target (``decompose: {method: M, target: T}``) decomposes a copy, evaluates it before and
after a short fine-tune, and prints one row per point (and the accuracy drop vs baseline).

    python benchmarks/decompose_curves.py                                  # lenet5, fast
    python benchmarks/decompose_curves.py --model resnet20-cifar --epochs 4 --targets 1.5 2 3 --finetune 2
"""

from __future__ import annotations

import argparse
import copy

import torch

from slimkit.data import load_data
from slimkit.decompose import decompose_
from slimkit.exceptions import ConfigError
from slimkit.models import create_model
from slimkit.train import evaluate, fit


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--epochs", type=int, default=6, help="baseline training epochs")
    parser.add_argument("--finetune", type=int, default=1, help="fine-tune epochs after each decomposition")
    parser.add_argument("--methods", nargs="+", default=["tucker", "cp", "channel", "separable",
                                                          "depthwise-separable", "svd"])
    parser.add_argument("--targets", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    parser.add_argument("--ignore", nargs="*", default=None, help="layer globs left whole (default: the stem)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data("digits")
    model = create_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels)
    fit(model, data.train, {"epochs": args.epochs, "lr": 0.05}, progress=False)
    base_acc = evaluate(model, data.test)
    x = torch.stack([data.train[i][0] for i in range(8)])
    first = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    ignore = args.ignore if args.ignore is not None else [first]
    print(f"baseline {args.model}: {base_acc:.2f}%  (ignore={ignore})")
    print(f"{'method':<20} {'target':>6} {'MACs x':>7} {'acc':>7} {'acc+ft':>7} {'drop':>6} {'layers':>6}")
    rows = []
    for method in args.methods:
        for target in args.targets:
            candidate = copy.deepcopy(model)
            try:
                report = decompose_(candidate, x, {"method": method, "target": target, "ignore": ignore,
                                                   "cp_max_iter": 100})
            except ConfigError as err:
                print(f"{method:<20} {target:6.1f}  -- {err}")
                continue
            acc = evaluate(candidate, data.test)
            tuned = acc
            if args.finetune:
                fit(candidate, data.train, {"epochs": args.finetune, "lr": 0.005}, progress=False)
                tuned = evaluate(candidate, data.test)
            row = dict(method=method, target=target, mac_reduction=report.mac_reduction, accuracy=acc,
                       finetuned=tuned, drop=base_acc - tuned, layers=len(report.layers))
            rows.append(row)
            print(f"{method:<20} {target:6.1f} {row['mac_reduction']:7.2f} {acc:7.2f} {tuned:7.2f} "
                  f"{row['drop']:6.2f} {row['layers']:6d}")
    return rows


if __name__ == "__main__":
    main()
