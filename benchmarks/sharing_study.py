"""Weight sharing at equal bytes: k-means (Han 2016) vs HashedNets (Chen 2015) vs DCT/CNNpack (Wang 2016).

Per seed, one dense model is trained, then compressed three ways from the same weights
at each budget (``--bits``: the k-means width sets the byte budget):

- ``k-means``: :func:`slimkit.quantize.share_weights_` at ``b`` bits in every layer, centroid
  fine-tuning (:func:`~slimkit.quantize.sharing.sharing_hooks`);
- ``HashedNets``: :func:`slimkit.quantize.hashed.hash_weights_` with one ratio ``K / n`` for
  every layer, chosen so the ``.slim`` file is as large as k-means' (least-squares projected
  init, then the hashed vectors trained in place);
- ``HashedNets (scratch)``: the paper's procedure, the same hashed layers (same ratio) from a
  random init, trained for the dense epochs + the fine-tune epochs (at ``--hashed-lr``: a hashed
  value's gradient sums ``n/K`` weights' gradients, and the dense rate 0.02 diverged);
- ``DCT``: :func:`slimkit.encode.dct.dct_compress_` at ``b + 1`` bits with the fraction of
  dropped coefficients (``zero_fraction``) fitted by bisection so that the file is no
  larger than k-means' (codebooks fine-tuned in the frequency domain).

Bytes are those of the whole ``.slim`` container (``slimkit.encode.container.encode_model``:
header, manifest, codebooks, Huffman tables, biases, CRCs), so the three are compared on
the same, real files. Accuracy is measured before and after ``--finetune`` epochs.

    .venv/bin/python benchmarks/sharing_study.py                           # digits, LeNet-5, 3 seeds
    .venv/bin/python benchmarks/sharing_study.py --seeds 2 --bits 2 4 --epochs 8 --finetune 2
    .venv/bin/python benchmarks/sharing_study.py --data cifar10 --download --model resnet20-cifar \\
        --epochs 30 --finetune 5 --bits 2 4           # on a GPU

Results: ``--out`` (default ``runs/sharing_study``) ``results.json``; plot ``--plot``
(default ``docs/figures/sharing_methods.png``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from slimkit.data import load_data
from slimkit.encode.container import encode_model
from slimkit.encode.dct import dct_compress_, dct_hooks
from slimkit.models import create_model
from slimkit.quantize import share_weights_, sharing_hooks
from slimkit.quantize.hashed import hash_weights_
from slimkit.train import TrainConfig, evaluate, fit

METHODS = ("k-means", "HashedNets", "HashedNets (scratch)", "DCT")


def slim_bytes(model: nn.Module) -> int:
    """Size of the model's ``.slim`` container (nothing written)."""
    return len(encode_model(model.cpu())[0])


def weight_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def kmeans(dense: nn.Module, x: torch.Tensor, bits: int, seed: int) -> nn.Module:
    model = copy.deepcopy(dense)
    share_weights_(model, x, {"conv_bits": bits, "linear_bits": bits, "seed": seed})
    return model


def hashed(dense: nn.Module, x: torch.Tensor, budget: int, seed: int) -> nn.Module:
    """HashedNets with the ratio whose file fills ``budget``: the vectors take what the other tensors leave."""
    probe = copy.deepcopy(dense)
    hash_weights_(probe, x, {"conv_ratio": 1.0, "linear_ratio": 1.0, "seed": seed})
    overhead = slim_bytes(probe) - 4 * weight_count(dense)  # everything but the fp32 vectors
    ratio = min(1.0, max(1e-4, (budget - overhead) / (4 * weight_count(dense))))
    for _ in range(4):  # ceil per layer can overshoot by a few bytes: shrink until it fits
        model = copy.deepcopy(dense)
        hash_weights_(model, x, {"conv_ratio": ratio, "linear_ratio": ratio, "seed": seed})
        if slim_bytes(model) <= budget:
            break
        ratio *= 0.995
    model.hash_ratio = ratio
    return model


def dct(dense: nn.Module, x: torch.Tensor, bits: int, budget: int, seed: int) -> nn.Module:
    """DCT at ``bits`` with the smallest ``zero_fraction`` (0, else 8 bisection steps) whose file fits ``budget``."""

    def build(zero_fraction: float) -> nn.Module:
        model = copy.deepcopy(dense)
        dct_compress_(model, x, {"conv_bits": bits, "linear_bits": bits, "zero_fraction": zero_fraction,
                                 "seed": seed})
        model.zero_fraction = zero_fraction
        return model

    best = build(0.0)
    if slim_bytes(best) <= budget:
        return best
    low, high, best = 0.0, 0.99, build(0.99)
    for _ in range(8):
        mid = (low + high) / 2
        model = build(mid)
        if slim_bytes(model) <= budget:
            best, high = model, mid
        else:
            low = mid
    return best


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def run(args) -> dict:
    data = load_data(args.data, data_dir=args.data_dir, download=args.download, seed=0)
    x = torch.zeros(1, *data.input_shape)  # one input: what the verbs measure the model on
    rows: dict[str, dict[str, list]] = {}
    dense_acc, dense_bytes = [], 0
    started = time.perf_counter()
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = create_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels)
        fit(dense, data.train, TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=32, seed=seed), progress=False)
        dense = dense.cpu().eval()
        dense_acc.append(evaluate(dense, data.test))
        dense_bytes = slim_bytes(dense)
        print(f"seed {seed}: dense {args.model} {dense_acc[-1]:.2f}%, {dense_bytes} bytes", flush=True)
        ft = TrainConfig(epochs=args.finetune, lr=args.hashed_lr, weight_decay=0.0, batch_size=32, seed=seed)
        # a shared value's gradient is the sum over its weights: the recipe's smaller rate for codebooks
        centroid_ft = ft.model_copy(update={"lr": args.centroid_lr})
        for bits in args.bits:
            km = kmeans(dense, x, bits, seed)
            budget = slim_bytes(km)
            built = {"k-means": (km, sharing_hooks(), centroid_ft),
                     "HashedNets": (hashed(dense, x, budget, seed), None, ft),
                     "DCT": (dct(dense, x, bits + 1, budget, seed), dct_hooks(), centroid_ft)}
            torch.manual_seed(seed)
            scratch = create_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels)
            ratio = built["HashedNets"][0].hash_ratio
            hash_weights_(scratch, x, {"conv_ratio": ratio, "linear_ratio": ratio, "seed": seed, "init": "random"})
            scratch.hash_ratio = ratio
            built["HashedNets (scratch)"] = (scratch, None, TrainConfig(epochs=args.epochs + args.finetune,
                                                                        lr=args.hashed_lr, batch_size=32, seed=seed))
            for method in METHODS:
                model, hooks, cfg = built[method]
                before = evaluate(model.eval(), data.test)
                fit(model, data.train, cfg, hooks, progress=False)
                model = model.cpu().eval()
                after = evaluate(model, data.test)
                size = slim_bytes(model)
                key = f"{method} @ {bits}-bit budget"
                row = rows.setdefault(key, {"method": method, "bits": bits, "before": [], "after": [], "bytes": [],
                                            "setting": []})
                row["before"].append(before)
                row["after"].append(after)
                row["bytes"].append(size)
                row["setting"].append(getattr(model, "hash_ratio", getattr(model, "zero_fraction", bits)))
                print(f"  {key:28s} {size:8d} B  before FT {before:6.2f}%  after {after:6.2f}%", flush=True)
        # tables, results.json and plot after every seed (a long run leaves partial results)
        result = summarize(rows, dense_acc, dense_bytes, args, started, seed + 1, final=seed + 1 == args.seeds)
    return result


def summarize(rows: dict, dense_acc: list[float], dense_bytes: int, args, started: float, seeds: int,
              final: bool = False) -> dict:
    """Print the table over every seed done so far, write ``results.json`` and the plot."""
    table = {k: {**v, "before": _stats(v["before"]), "after": _stats(v["after"]),
                 "bytes_mean": statistics.mean(v["bytes"])} for k, v in rows.items()}
    print(f"\n{args.model} on {args.data}: dense {statistics.mean(dense_acc):.2f}% ({dense_bytes} B .slim, fp32); "
          f"{seeds} seeds, {args.epochs} epochs dense + {args.finetune} fine-tune; "
          f"{time.perf_counter() - started:.0f} s")
    print("\n| budget | method | .slim bytes (mean) | ratio vs dense | setting | accuracy before FT | after FT |")
    print("|---|---|---|---|---|---|---|")
    for r in table.values():
        ratio = f"K/n = {statistics.mean(r['setting']):.4f}"
        before = f"{r['before']['mean']:.2f} ± {r['before']['std']:.2f}"
        before = "- (random init)" if "scratch" in r["method"] else before
        setting = {"k-means": f"{r['bits']} bits", "HashedNets": ratio, "HashedNets (scratch)": ratio,
                   "DCT": f"{r['bits'] + 1} bits, zero_fraction {statistics.mean(r['setting']):.3f}"}[r["method"]]
        print(f"| {r['bits']}-bit | {r['method']} | {r['bytes_mean']:.0f} | {dense_bytes / r['bytes_mean']:.1f}x | "
              f"{setting} | {before} | "
              f"{r['after']['mean']:.2f} ± {r['after']['std']:.2f} |")
    result = {"model": args.model, "data": args.data, "seeds": seeds, "epochs": args.epochs,
              "finetune": args.finetune, "dense_accuracy": _stats(dense_acc), "dense_bytes": dense_bytes,
              "rows": table}
    _plot(table, result, Path(args.plot))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if final:
        print(f"results: {out / 'results.json'}")
    return result


def _plot(table: dict, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    colors = {"k-means": "#4c72b0", "HashedNets": "#dd8452", "HashedNets (scratch)": "#8172b3", "DCT": "#55a868"}
    for method in METHODS:
        rs = [r for r in table.values() if r["method"] == method]
        rs.sort(key=lambda r: r["bytes_mean"])
        ax.errorbar([r["bytes_mean"] / 1024 for r in rs], [r["after"]["mean"] for r in rs],
                    yerr=[r["after"]["std"] for r in rs], marker="o", capsize=4, label=method, color=colors[method])
    ax.axhline(result["dense_accuracy"]["mean"], color="#c44e52", linestyle="--",
               label=f"dense fp32 ({result['dense_bytes'] / 1024:.0f} KiB)")
    ax.set_xscale("log")
    ax.set_xlabel(".slim file size (KiB, log)")
    ax.set_ylabel("test accuracy after fine-tune (%)")
    n_seeds = result["seeds"]
    ax.set_title(f"{result['model']} on {result['data']}: equal bytes, mean ± std over {n_seeds} seeds",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="dense training epochs (SGD, batch 32)")
    parser.add_argument("--lr", type=float, default=0.02, help="dense training rate (deep-compression recipe's)")
    parser.add_argument("--finetune", type=int, default=2, help="fine-tune epochs after compression")
    parser.add_argument("--hashed-lr", type=float, default=0.005,
                        help="HashedNets rate (fine-tune and scratch): each value's gradient sums ~n/K weights")
    parser.add_argument("--centroid-lr", type=float, default=0.0005,
                        help="k-means and DCT codebook fine-tune rate (deep-compression recipe's)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4], help="k-means widths that set the budgets")
    parser.add_argument("--out", default="runs/sharing_study")
    parser.add_argument("--plot", default="docs/figures/sharing_methods.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
