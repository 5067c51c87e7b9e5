"""Second-order, reconstruction, DSD and L0 pruning beside the simpler criteria, over several seeds.

Two comparisons, each at one budget, each method fine-tuned the same number of epochs from
the same dense model of its seed (mean +- standard deviation over ``--seeds``):

- ``weights``: LeNet-300-100 at ``--sparsity`` (95 %) of every layer's weights: magnitude
  (Han 2015), OBD with the empirical-Fisher Hessian diagonal (LeCun 1990), layer-wise OBS
  (Dong 2017), dynamic network surgery (Guo 2016, prune + splice during the fine-tune), L0
  hard-concrete gates (Louizos 2018; its sparsity is whatever the penalty reaches, reported
  beside it) -- test accuracy right after pruning and after the fine-tune; plus DSD (Han
  2017) against the dense model trained the same number of extra epochs (DSD's claim is an
  accuracy gain of the *dense* model);
- ``channels``: resnet20-cifar and mobilenet_v3_small at ``--ratio`` (50 %) of each layer's
  channel units: L1 filter norm (Li 2017), S x gamma (filter sparsity x |BN gamma|, the
  criterion alone, without the method's sparse training), Fisher (Theis 2018), L1 selection
  + least-squares refit, ThiNet (Luo 2017) and LASSO (He 2017) with the refit -- params,
  MACs, accuracy before and after the fine-tune.

Writes ``results.json``, ``weights.md`` / ``weights.png`` and ``channels.md`` / ``channels.png``
under ``--out``.

    nice .venv/bin/python benchmarks/criteria_study.py                         # digits, CPU
    .venv/bin/python benchmarks/criteria_study.py --data cifar10 --download --epochs 30 \\
        --finetune-epochs 10 --samples 1024 --seeds 3                           # CIFAR-10 on a GPU
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
from slimkit.measure import count_macs
from slimkit.models import create_model
from slimkit.prune import magnitude_prune_, structured_
from slimkit.prune.dsd import dsd_, fit_train
from slimkit.prune.l0 import L0Penalty, add_l0_gates_, fold_l0_
from slimkit.prune.masks import mask_hooks, sparsity_of
from slimkit.prune.reconstruction import reconstruct_prune_
from slimkit.prune.schedules import scheduled_hooks
from slimkit.prune.second_order import lobs_prune_, obd_prune_
from slimkit.train import TrainConfig, TrainHooks, evaluate, fit

WEIGHT_METHODS = ("magnitude", "obd", "lobs", "dns", "l0")
CHANNEL_METHODS = ("none", "l1", "sparsity_gamma", "fisher", "l1+refit", "thinet", "lasso")
LABEL = {"magnitude": "magnitude (Han 2015)", "obd": "OBD, Fisher diagonal (LeCun 1990)",
         "lobs": "L-OBS (Dong 2017)", "dns": "DNS (Guo 2016)", "l0": "L0 gates (Louizos 2018)",
         "none": "no pruning (same fine-tune)",
         "l1": "L1 norm (Li 2017)", "sparsity_gamma": "S x gamma", "fisher": "Fisher (Theis 2018)",
         "l1+refit": "L1 + LS refit", "thinet": "ThiNet + LS refit (Luo 2017)",
         "lasso": "LASSO + LS refit (He 2017)"}


def samples_of(data, n: int, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    out, seen = [], 0
    for x, y in loader:
        out.append((x[: n - seen], y[: n - seen]))
        seen += len(out[-1][0])
        if seen >= n:
            break
    return out


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _fmt(s: dict, digits: int = 2) -> str:
    return f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f}"


# -- weights ------------------------------------------------------------------------------


def weight_run(method: str, dense: nn.Module, data, args, tune: TrainConfig) -> dict:
    model = copy.deepcopy(dense)
    batches = samples_of(data, args.samples)
    t0 = time.perf_counter()
    before = None
    x = torch.zeros(1, *data.input_shape)
    if method == "magnitude":
        magnitude_prune_(model, x, {"sparsity": args.sparsity})
    elif method == "obd":
        obd_prune_(model, x, {"sparsity": args.sparsity, "scope": "local"}, batches=batches)
    elif method == "lobs":
        lobs_prune_(model, x, {"sparsity": args.sparsity}, batches=batches)
    prune_s = time.perf_counter() - t0
    if method in ("magnitude", "obd", "lobs"):
        before = evaluate(model, data.test)
        fit(model, data.train, tune, mask_hooks(), progress=False)
    elif method == "dns":
        cfg = {"sparsity": args.sparsity, "schedule": "dns", "frequency": 5}
        from slimkit.prune.magnitude import MagnitudeConfig

        fit(model, data.train, tune, scheduled_hooks(model, MagnitudeConfig.coerce(cfg)), progress=False)
    elif method == "l0":
        add_l0_gates_(model, x, {"target": "weights", "lam": args.l0_lam})
        fit(model, data.train, tune, TrainHooks(penalties=(L0Penalty(args.l0_lam),)), progress=False)
        fold_l0_(model, x)
    return {"before": before, "after": evaluate(model, data.test), "sparsity": sparsity_of(model)["total"],
            "prune_s": prune_s}


def part_weights(args, data) -> dict:
    train = TrainConfig(epochs=args.epochs, lr=0.05, batch_size=args.batch_size)
    tune = TrainConfig(epochs=args.finetune_epochs, lr=0.01, batch_size=args.batch_size)
    rows: dict[str, dict[str, list]] = {m: {"before": [], "after": [], "sparsity": [], "prune_s": []}
                                        for m in (*WEIGHT_METHODS, "dense+", "dsd")}
    dense_acc = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = create_model("lenet-300-100", num_classes=data.num_classes, in_channels=data.in_channels)
        fit(dense, data.train, train.model_copy(update={"seed": seed}), progress=False)
        dense_acc.append(evaluate(dense, data.test))
        for method in WEIGHT_METHODS:
            r = weight_run(method, dense, data, args, tune.model_copy(update={"seed": seed}))
            for k, v in r.items():
                if v is not None:
                    rows[method][k].append(v)
            print(f"seed {seed} {method}: {r}", flush=True)
        # DSD vs the same extra epochs of dense training (sparse + dense phases = 2 x finetune_epochs)
        extra = copy.deepcopy(dense)
        fit(extra, data.train, train.model_copy(update={"epochs": 2 * args.finetune_epochs, "lr": 0.01,
                                                        "seed": seed}), progress=False)
        rows["dense+"]["after"].append(evaluate(extra, data.test))
        dsd = copy.deepcopy(dense)
        dsd_(dsd, torch.zeros(1, *data.input_shape),
             {"sparsity": 0.5, "sparse_epochs": args.finetune_epochs, "dense_epochs": args.finetune_epochs,
              "sparse_lr": 0.01, "dense_lr": 0.001}, train=fit_train(data.train, progress=False),
             train_config=train.model_copy(update={"seed": seed}))
        rows["dsd"]["after"].append(evaluate(dsd, data.test))
        print(f"seed {seed} dense {dense_acc[-1]:.2f} dense+ {rows['dense+']['after'][-1]:.2f} "
              f"dsd {rows['dsd']['after'][-1]:.2f}", flush=True)
    return {"dense": _stats(dense_acc),
            "methods": {m: {k: _stats(v) for k, v in r.items() if v} for m, r in rows.items()}}


def part_l0(args, data) -> dict:
    """L0 weight gates on LeNet-300-100: sparsity and accuracy over ``--l0-lams`` x ``--l0-epochs``."""
    train = TrainConfig(epochs=args.epochs, lr=0.05, batch_size=args.batch_size)
    rows: dict[str, dict[str, list]] = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = create_model("lenet-300-100", num_classes=data.num_classes, in_channels=data.in_channels)
        fit(dense, data.train, train.model_copy(update={"seed": seed}), progress=False)
        for epochs in args.l0_epochs:
            for lam in args.l0_lams:
                model = copy.deepcopy(dense)
                x = torch.zeros(1, *data.input_shape)
                add_l0_gates_(model, x, {"target": "weights", "lam": lam, "init_drop": args.l0_init_drop})
                tune = TrainConfig(epochs=epochs, lr=0.01, batch_size=args.batch_size, seed=seed)
                fit(model, data.train, tune, TrainHooks(penalties=(L0Penalty(lam),)), progress=False)
                fold_l0_(model, x)
                row = rows.setdefault(f"{epochs}:{lam}", {"sparsity": [], "after": []})
                row["sparsity"].append(100 * sparsity_of(model)["total"])
                row["after"].append(evaluate(model, data.test))
                print(f"l0 seed {seed} epochs {epochs} lam {lam}: {row['sparsity'][-1]:.2f} % sparse, "
                      f"{row['after'][-1]:.2f} %", flush=True)
    return {k: {m: _stats(v) for m, v in r.items()} for k, r in rows.items()}


def l0_md(res: dict, args) -> str:
    lines = [f"L0 weight gates on LeNet-300-100, {args.data}, dense {args.epochs} epochs, then the L0-penalised "
             f"fine-tune (SGD lr 0.01, gate_lr 100, init_drop {args.l0_init_drop}), {args.seeds} seeds", "",
             "| fine-tune epochs | lam (per gate) | sparsity (%) | accuracy (%) |", "|---:|---:|---:|---:|"]
    for key, r in res.items():
        epochs, lam = key.split(":")
        lines.append(f"| {epochs} | {lam} | {_fmt(r['sparsity'])} | {_fmt(r['after'])} |")
    return "\n".join(lines) + "\n"


# -- channels -----------------------------------------------------------------------------

TRAIN = {"resnet20-cifar": {"optimizer": "sgd", "lr": 0.05}, "mobilenet_v3_small": {"optimizer": "adam", "lr": 2e-3}}
TUNE = {"resnet20-cifar": {"optimizer": "sgd", "lr": 0.01}, "mobilenet_v3_small": {"optimizer": "adam", "lr": 1e-3}}


def channel_run(method: str, dense: nn.Module, data, x: torch.Tensor, args, tune: TrainConfig) -> dict:
    model = copy.deepcopy(dense).eval()
    x = x.to(next(model.parameters()).device)
    batches = samples_of(data, args.samples)
    t0 = time.perf_counter()
    if method == "none":
        pass
    elif method in ("l1", "sparsity_gamma", "fisher"):
        structured_(model, x, {"ratio": args.ratio, "criterion": method},
                    batches=batches if method == "fisher" else None)
    else:
        selector = "l1" if method == "l1+refit" else method
        reconstruct_prune_(model, x, {"method": selector, "ratio": args.ratio}, batches=batches)
    prune_s = time.perf_counter() - t0
    row = {"params": sum(p.numel() for p in model.parameters()), "macs": int(count_macs(model, x)),
           "before": evaluate(model, data.test), "prune_s": prune_s}
    fit(model, data.train, tune, progress=False)
    row["after"] = evaluate(model, data.test)
    return row


def part_channels(args, data) -> dict:
    x = torch.zeros(1, *data.input_shape)
    out = {}
    for name in args.models:
        rows: dict[str, dict[str, list]] = {m: {} for m in args.channel_methods}
        dense_acc, dense_params, dense_macs = [], 0, 0
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            dense = create_model(name, num_classes=data.num_classes, in_channels=data.in_channels)
            fit(dense, data.train, TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                                               **TRAIN[name]), progress=False)
            dense.eval()
            dense_acc.append(evaluate(dense, data.test))
            dense_params = sum(p.numel() for p in dense.parameters())
            dense_macs = int(count_macs(dense, x.to(next(dense.parameters()).device)))
            tune = TrainConfig(epochs=args.finetune_epochs, batch_size=args.batch_size, seed=seed, **TUNE[name])
            for method in args.channel_methods:
                r = channel_run(method, dense, data, x, args, tune)
                for k, v in r.items():
                    rows[method].setdefault(k, []).append(v)
                print(f"{name} seed {seed} {method}: {r}", flush=True)
        out[name] = {"dense": _stats(dense_acc), "dense_params": dense_params, "dense_macs": dense_macs,
                     "methods": {m: {k: _stats(v) for k, v in r.items()} for m, r in rows.items()}}
    return out


# -- tables and plots ---------------------------------------------------------------------


def weights_md(res: dict, args) -> str:
    lines = [f"LeNet-300-100, {args.data}, {args.sparsity:.0%} of every layer's weights, dense {args.epochs} "
             f"epochs, fine-tune {args.finetune_epochs} epochs (SGD lr 0.01), {args.seeds} seeds, "
             f"Hessian statistics from {args.samples} training samples; dense accuracy {_fmt(res['dense'])} %",
             "", "| method | sparsity | accuracy after pruning (%) | after fine-tune (%) | pruning time (s) |",
             "|---|---:|---:|---:|---:|"]
    for m in WEIGHT_METHODS:
        r = res["methods"][m]
        before = _fmt(r["before"]) if "before" in r else "(prunes while training)"
        lines.append(f"| {LABEL[m]} | {r['sparsity']['mean']:.1%} | {before} | {_fmt(r['after'])} | "
                     f"{r['prune_s']['mean']:.1f} |" if "prune_s" in r else
                     f"| {LABEL[m]} | {r['sparsity']['mean']:.1%} | {before} | {_fmt(r['after'])} | - |")
    d, p = res["methods"]["dsd"]["after"], res["methods"]["dense+"]["after"]
    lines += ["", f"DSD (sparse 50 % for {args.finetune_epochs} epochs at lr 0.01, then dense for "
              f"{args.finetune_epochs} at lr 0.001), dense result: {_fmt(d)} %; the dense model trained the same "
              f"{2 * args.finetune_epochs} extra epochs at lr 0.01: {_fmt(p)} %."]
    return "\n".join(lines) + "\n"


def channels_md(res: dict, args) -> str:
    out = []
    for name, r in res.items():
        out += [f"**{name}**, {args.data}, {args.ratio:.0%} of each layer's channel units, dense {args.epochs} epochs, "
                f"fine-tune {args.finetune_epochs} epochs, {args.seeds} seeds, reconstruction statistics from "
                f"{args.samples} training images; dense accuracy {_fmt(r['dense'])} %, {r['dense_params']:,} params, "
                f"{r['dense_macs'] / 1e6:.2f} M MACs", "",
                "| method | params | MACs (M) | before fine-tune (%) | after fine-tune (%) | pruning time (s) |",
                "|---|---:|---:|---:|---:|---:|"]
        for m in [m for m in CHANNEL_METHODS if m in r["methods"]]:
            s = r["methods"][m]
            out.append(f"| {LABEL[m]} | {s['params']['mean']:,.0f} | {s['macs']['mean'] / 1e6:.2f} | "
                       f"{_fmt(s['before'])} | {_fmt(s['after'])} | {s['prune_s']['mean']:.1f} |")
        out.append("")
    return "\n".join(out)


def plot(res: dict, path: Path, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"LeNet-300-100": res} if kind == "weights" else res
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.8), squeeze=False)
    for ax, (title, r) in zip(axes[0], groups.items(), strict=True):
        methods = [m for m in (WEIGHT_METHODS if kind == "weights" else CHANNEL_METHODS) if m in r["methods"]]
        xs = range(len(methods))
        for offset, key, color in ((-0.2, "before", "#bbbbbb"), (0.2, "after", "#3366aa")):
            vals = [r["methods"][m].get(key, {"mean": 0, "std": 0}) for m in methods]
            ax.bar([i + offset for i in xs], [v["mean"] for v in vals], 0.4, yerr=[v["std"] for v in vals],
                   color=color, label=f"{key} fine-tune", capsize=3)
        ax.axhline(r["dense"]["mean"], color="k", lw=0.8, ls="--", label="dense")
        names = [LABEL[m].split(" (")[0] + (f"\n{r['methods'][m]['sparsity']['mean']:.0%} sparse"
                                           if "sparsity" in r["methods"][m] else "") for m in methods]
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "weights", "channels", "l0"], default="all")
    p.add_argument("--data", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=256, help="training samples for Hessians / reconstruction")
    p.add_argument("--l0-lam", type=float, default=0.02, help="L0 penalty per gate (weights part)")
    p.add_argument("--l0-lams", type=float, nargs="+", default=[0.01, 0.02, 0.04, 0.06], help="l0 part")
    p.add_argument("--l0-init-drop", type=float, default=0.5, help="l0 part: initial gate drop rate")
    p.add_argument("--l0-epochs", type=int, nargs="+", default=[2, 8], help="l0 part: fine-tune epochs")
    p.add_argument("--models", nargs="+", default=["resnet20-cifar", "mobilenet_v3_small"])
    p.add_argument("--channel-methods", nargs="+", default=list(CHANNEL_METHODS), choices=CHANNEL_METHODS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/criteria_study")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args.data, data_dir=args.data_dir, download=args.download)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["settings"] = vars(args)
    if args.part in ("all", "weights"):
        results["weights"] = part_weights(args, data)
        (out / "weights.md").write_text(weights_md(results["weights"], args))
        plot(results["weights"], out / "weights.png", "weights")
        results_path.write_text(json.dumps(results, indent=1))
        print((out / "weights.md").read_text(), flush=True)
    if args.part in ("all", "l0"):
        results["l0"] = part_l0(args, data)
        (out / "l0.md").write_text(l0_md(results["l0"], args))
        results_path.write_text(json.dumps(results, indent=1))
        print((out / "l0.md").read_text(), flush=True)
    if args.part in ("all", "channels"):
        results["channels"] = part_channels(args, data)
        (out / "channels.md").write_text(channels_md(results["channels"], args))
        plot(results["channels"], out / "channels.png", "channels")
        results_path.write_text(json.dumps(results, indent=1))
        print((out / "channels.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
