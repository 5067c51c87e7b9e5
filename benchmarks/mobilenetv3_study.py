"""The MobileNetV3 pruning study of Liu & Lei 2022 (filter sparsity x BN gamma), at the scale the machine allows.

Liu & Lei 2022: "A Structured Pruning Method Integrating Characteristics of MobileNetV3".

The method (see docs/mobilenetv3-study.md and /work/shared/REFERENCES.md): sparse-train
with ``lam * sum |gamma|`` on every BatchNorm scale; score each output channel of the
expansion (first 1x1) convs of the inverted-residual blocks by ``S x |gamma|`` (S = the
fraction of the filter's coefficients whose magnitude is at least the layer's mean
magnitude); remove the lowest-scored channels under one global threshold (which removes
the matching depthwise channels, their BN/SE entries and the projection's inputs); fine-tune.

It writes to ``--out``:

- (a) ``rates.md`` / ``rates.png``: accuracy, params and FLOPs (2 x MACs) at pruning rates
  0, 10, ..., 60% (``sparsity_gamma``, global threshold), each fine-tuned the same number
  of epochs (the 0% row too, so every row has the same training budget);
- (b) ``criteria.md`` / ``criteria.png``: gamma alone (``bn_gamma``), S alone
  (``sparsity``), L1 filter norm (``l1``) and gamma x S (``sparsity_gamma``) at 50%
  (``--criteria`` may add ``random``, ``taylor``, ``l2``);
- (c) ``lambdas.md`` / ``gamma_hist.png``: the |gamma| histogram after sparse training
  for lam in {0, 1e-3, 1e-4, 1e-5, 1e-6}, with the sparse-trained accuracy, the fraction of
  gammas below 1e-2 and the accuracy after pruning 50% (not fine-tuned);
- (d) ``blocks.md``: expansion channels per inverted-residual block before/after 50%;
- ``study.md`` (all tables) and ``results.json``.

The sparse-trained model of each lam is trained once and reused by every rate/criterion.

    .venv/bin/python benchmarks/mobilenetv3_study.py                       # digits, 28 px, CPU (~10 min)
    .venv/bin/python benchmarks/mobilenetv3_study.py --data cifar10 --download --image-size 224 \\
        --epochs 200 --finetune-epochs 150 --batch-size 128              # the paper's scale, on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from slimkit.data import load_data
from slimkit.measure import count_macs
from slimkit.models import create_model
from slimkit.prune import structured_
from slimkit.prune.sparse_training import sparse_hooks
from slimkit.train import TrainConfig, evaluate, fit

PAPER_CRITERIA = ("bn_gamma", "sparsity", "l1", "sparsity_gamma")
CRITERION_LABEL = {"bn_gamma": "gamma alone", "sparsity": "S alone", "l1": "L1 norm", "sparsity_gamma": "gamma x S",
                   "l2": "L2 norm", "random": "random", "taylor": "Taylor"}


def expansion_convs(model: nn.Module) -> list[str]:
    """Qualified names of the expansion (first 1x1, non-grouped) convs of the inverted-residual blocks.

    torchvision's MobileNetV3 blocks whose expansion ratio is 1 start with the depthwise conv
    and have no expansion conv: they are left out, as in the paper.
    """
    names = []
    for name, module in model.named_modules():
        block = getattr(module, "block", None)
        if not isinstance(block, nn.Sequential) or len(block) == 0:
            continue
        first = block[0][0] if isinstance(block[0], nn.Sequential) else block[0]
        if isinstance(first, nn.Conv2d) and first.kernel_size == (1, 1) and first.groups == 1:
            names.append(f"{name}.block.0.0")
    return names


def block_table(model: nn.Module) -> list[dict]:
    """Per inverted-residual block: input, expanded and output channels."""
    rows = []
    for name, module in model.named_modules():
        block = getattr(module, "block", None)
        if not isinstance(block, nn.Sequential):
            continue
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        dw = next(m for m in convs if m.groups > 1)
        has_expansion = convs[0] is not dw
        rows.append({"block": name, "in": convs[0].in_channels, "expanded": dw.out_channels if has_expansion else None,
                     "out": convs[-1].out_channels, "kernel": dw.kernel_size[0], "stride": dw.stride[0]})
    return rows


def gammas(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine])


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_lam(lam: float) -> str:
    return "0" if lam == 0 else f"{lam:.0e}".replace("e-0", "e-")


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data = load_data(args.data, data_dir=args.data_dir, download=args.download, image_size=args.image_size,
                              seed=args.seed)
        self.x = torch.zeros(1, *self.data.input_shape)
        common = {"optimizer": "adam", "weight_decay": 0.0, "batch_size": args.batch_size, "seed": args.seed}
        self.train_cfg = TrainConfig(epochs=args.epochs, lr=args.lr, **common)
        self.finetune_cfg = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, **common)
        self.bar: tqdm | None = None

    def new_model(self) -> nn.Module:
        torch.manual_seed(self.args.seed)
        model = create_model(self.args.model, num_classes=self.data.num_classes, in_channels=self.data.in_channels)
        # torchvision's MobileNetV3 BN momentum (0.01) suits ImageNet-length schedules; with ~25 steps
        # per epoch the running statistics would lag far behind the weights and eval-mode accuracy with them
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = self.args.bn_momentum
        return model

    def log(self, msg: str) -> None:
        if self.bar is not None and not self.args.no_progress:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def _step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)

    def sparse_train(self, lam: float) -> nn.Module:
        model = self.new_model()
        hooks = sparse_hooks("bn_l1", lam) if lam > 0 else None
        fit(model, self.data.train, self.train_cfg, hooks, progress=False, desc=f"sparse-train lam={lam:g}")
        model.eval()
        self.log(f"sparse-trained lam={fmt_lam(lam)}: {evaluate(model, self.data.test):.2f}%")
        self._step(f"sparse-trained lam={fmt_lam(lam)}")
        return model

    def prune(self, sparse: nn.Module, rate: float, criterion: str, finetune: bool = True) -> tuple[nn.Module, dict]:
        model = copy.deepcopy(sparse)
        report = None
        if rate > 0:
            report = structured_(model, self.x, {
                "ratio": rate, "criterion": criterion, "scope": "global", "layers": tuple(self.layers),
                "max_layer_ratio": self.args.max_layer_ratio, "seed": self.args.seed,
            })
        acc_before_ft = evaluate(model, self.data.test)
        if finetune and self.finetune_cfg.epochs > 0:
            # the paper fine-tunes the pruned model without the sparsity penalty
            fit(model, self.data.train, self.finetune_cfg, progress=False, desc=f"fine-tune {criterion} {rate:.0%}")
        model.eval()
        row = {
            "rate": rate, "criterion": criterion, "accuracy_pruned": acc_before_ft,
            "accuracy": evaluate(model, self.data.test), "params": params_of(model),
            "flops": 2 * int(count_macs(model, self.x)),
            "units_pruned": report.units_pruned if report else 0,
        }
        self.log(f"{criterion} {rate:.0%}: pruned {acc_before_ft:.2f}% -> fine-tuned {row['accuracy']:.2f}%, "
                 f"params {row['params']}, FLOPs {row['flops']}")
        self._step(f"{criterion} {rate:.0%}")
        return model, row

    def run(self) -> dict:
        a = self.args
        rates = [float(r) / 100 for r in a.rates.split(",")]
        lambdas = [float(v) for v in a.lambdas.split(",")] if a.lambdas else []
        criteria = [c for c in a.criteria.split(",") if c]
        extra_criteria = [c for c in criteria if c != "sparsity_gamma"]
        other_lams = [lam for lam in lambdas if lam != a.lam]
        total = 1 + len(rates) + len(extra_criteria) + len(other_lams) + (1 if 0.5 not in rates else 0)
        results: dict = {"args": vars(a), "input_shape": list(self.x.shape[1:]), "train_size": len(self.data.train),
                         "test_size": len(self.data.test)}
        started = time.perf_counter()
        self.bar = tqdm(total=total, desc="mobilenetv3 study", disable=a.no_progress)
        try:
            dense = self.new_model()
            self.layers = expansion_convs(dense)
            results["dense"] = {"params": params_of(dense), "flops": 2 * int(count_macs(dense, self.x)),
                                "expansion_convs": self.layers}
            sparse = self.sparse_train(a.lam)
            sparse_by_lam = {a.lam: sparse}
            results["sparse_accuracy"] = evaluate(sparse, self.data.test)

            # (a) pruning rates, gamma x S, one global threshold
            rows, pruned50 = [], None
            for rate in sorted(set(rates) | {0.5}):
                model, row = self.prune(sparse, rate, "sparsity_gamma")
                if rate in rates:
                    rows.append(row)
                if rate == 0.5:
                    pruned50, row50 = model, row
            results["rates"] = rows

            # (b) criteria at 50%
            crit_rows = []
            for criterion in criteria:
                crit_rows.append(row50 if criterion == "sparsity_gamma" else self.prune(sparse, 0.5, criterion)[1])
            results["criteria"] = crit_rows

            # (c) lambdas: gamma histogram, sparse-trained accuracy, 50% pruned without fine-tune
            lam_rows, hist = [], {}
            for lam in lambdas:
                model = sparse_by_lam.get(lam) or self.sparse_train(lam)
                g = gammas(model)
                hist[fmt_lam(lam)] = g.tolist()
                pruned = copy.deepcopy(model)
                structured_(pruned, self.x, {"ratio": 0.5, "criterion": "sparsity_gamma", "scope": "global",
                                             "layers": tuple(self.layers), "max_layer_ratio": a.max_layer_ratio})
                lam_rows.append({"lam": lam, "accuracy": evaluate(model, self.data.test),
                                 "gamma_below_1e-2": float((g < 1e-2).float().mean()),
                                 "gamma_median": float(g.median()),
                                 "accuracy_pruned50_no_ft": evaluate(pruned, self.data.test)})
            results["lambdas"] = lam_rows
            results["gamma_hist"] = hist

            # (d) per-block channels before/after 50%
            before = block_table(sparse)
            after = {r["block"]: r for r in block_table(pruned50)}
            results["blocks"] = [{**r, "expanded_after": after[r["block"]]["expanded"]} for r in before]
        finally:
            self.bar.close()
        results["elapsed_s"] = round(time.perf_counter() - started, 1)
        return results


def write_outputs(results: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    dense = results["dense"]
    sections = []

    rows = []
    for r in results["rates"]:
        rows.append([f"{r['rate']:.0%}", f"{r['accuracy']:.2f}%", f"{r['accuracy_pruned']:.2f}%",
                     f"{r['params'] / 1e6:.3f}M", f"{1 - r['params'] / dense['params']:+.1%}".replace("+", "-", 1)
                     if r["params"] != dense["params"] else "0%",
                     f"{r['flops']:.3e}", f"{1 - r['flops'] / dense['flops']:.1%}"])
    text = md_table(["pruning rate", "accuracy (fine-tuned)", "accuracy (pruned, before fine-tune)", "params",
                     "params change", "FLOPs", "FLOPs reduction"], rows)
    (out / "rates.md").write_text(text + "\n")
    sections.append("### (a) Pruning rate (gamma x S, one global threshold over the expansion convs)\n\n" + text)

    rows = [[CRITERION_LABEL.get(r["criterion"], r["criterion"]) + f" (`{r['criterion']}`)", f"{r['accuracy']:.2f}%",
             f"{r['accuracy_pruned']:.2f}%", f"{r['params'] / 1e6:.3f}M", f"{r['flops']:.3e}"]
            for r in results["criteria"]]
    text = md_table(["criterion at 50%", "accuracy (fine-tuned)", "accuracy (pruned, before fine-tune)", "params",
                     "FLOPs"], rows)
    (out / "criteria.md").write_text(text + "\n")
    sections.append("### (b) Criteria at 50%\n\n" + text)

    rows = [[fmt_lam(r["lam"]), f"{r['accuracy']:.2f}%", f"{r['gamma_below_1e-2']:.1%}", f"{r['gamma_median']:.3f}",
             f"{r['accuracy_pruned50_no_ft']:.2f}%"] for r in results["lambdas"]]
    text = md_table(["lambda", "accuracy (sparse-trained)", "|gamma| < 1e-2", "median |gamma|",
                     "accuracy after pruning 50% (no fine-tune)"], rows)
    (out / "lambdas.md").write_text(text + "\n")
    sections.append("### (c) Sparsity weight lambda\n\n" + text)

    rows = [[r["block"], r["kernel"], r["stride"], r["in"], "-" if r["expanded"] is None else r["expanded"],
             "-" if r["expanded_after"] is None else r["expanded_after"],
             "-" if r["expanded"] is None else f"{1 - r['expanded_after'] / r['expanded']:.0%}", r["out"]]
            for r in results["blocks"]]
    text = md_table(["block", "k", "stride", "in", "expanded (before)", "expanded (after 50%)", "pruned", "out"], rows)
    (out / "blocks.md").write_text(text + "\n")
    sections.append("### (d) Expansion channels per block, before/after pruning 50%\n\n" + text)

    study = "\n\n".join(sections) + "\n"
    (out / "study.md").write_text(study)
    plot(results, out)
    return study


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = results["rates"]
    x = [100 * r["rate"] for r in rates]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["accuracy"] for r in rates], "o-", color="tab:blue", label="accuracy (fine-tuned)")
    ax.plot(x, [r["accuracy_pruned"] for r in rates], "o--", color="tab:blue", alpha=0.4, label="before fine-tune")
    ax.set_xlabel("pruning rate of the expansion channels (%)")
    ax.set_ylabel("test accuracy (%)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(x, [r["flops"] / 1e6 for r in rates], "s-", color="tab:red", label="FLOPs")
    ax2.set_ylabel("MFLOPs (2 x MACs)", color="tab:red")
    ax.legend(loc="lower left")
    ax.set_title(f"{results['args']['model']} on {results['args']['data']} "
                 f"({'x'.join(map(str, results['input_shape']))}), gamma x S")
    fig.tight_layout()
    fig.savefig(out / "rates.png", dpi=110)
    plt.close(fig)

    crit = results["criteria"]
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [CRITERION_LABEL.get(r["criterion"], r["criterion"]) for r in crit]
    pos = range(len(crit))
    ax.bar([p - 0.2 for p in pos], [r["accuracy_pruned"] for r in crit], width=0.4, label="pruned, before fine-tune",
           color="tab:gray")
    ax.bar([p + 0.2 for p in pos], [r["accuracy"] for r in crit], width=0.4, label="fine-tuned", color="tab:blue")
    ax.set_xticks(list(pos), labels)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("criteria at 50% of the expansion channels")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "criteria.png", dpi=110)
    plt.close(fig)

    hist = results["gamma_hist"]
    if hist:
        fig, axes = plt.subplots(1, len(hist), figsize=(3 * len(hist), 3), sharey=False)
        axes = [axes] if len(hist) == 1 else list(axes)
        for ax, (lam, values) in zip(axes, hist.items(), strict=True):
            ax.hist(values, bins=40, color="tab:green")
            ax.set_title(f"lambda = {lam}")
            ax.set_xlabel("|gamma|")
        axes[0].set_ylabel("BN channels")
        fig.tight_layout()
        fig.savefig(out / "gamma_hist.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="mobilenet_v3_large", choices=["mobilenet_v3_large", "mobilenet_v3_small"])
    p.add_argument("--data", default="digits", help="digits (default), mnist, cifar10, cifar100, ...")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--image-size", type=int, default=None, help="resize images (the paper: 224)")
    p.add_argument("--epochs", type=int, default=6, help="sparse-training epochs (the paper: 200)")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tune epochs after pruning (the paper: 150)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate of sparse training (the paper: 1e-3)")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lam", type=float, default=1e-5, help="L1 weight on BN gamma of the main run")
    p.add_argument("--rates", default="0,10,20,30,40,50,60", help="pruning rates in percent")
    p.add_argument("--criteria", default=",".join(PAPER_CRITERIA), help="criteria compared at 50%%")
    p.add_argument("--lambdas", default="0,1e-3,1e-4,1e-5,1e-6", help="lambdas of the gamma histogram ('' skips)")
    p.add_argument("--max-layer-ratio", type=float, default=0.9, help="no expansion conv loses more than this")
    p.add_argument("--bn-momentum", type=float, default=0.1, help="BN running-stat momentum (torchvision: 0.01)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a loaded 2-core machine 2 threads ran ~10x slower per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/mobilenetv3_study")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = Study(args).run()
    text = write_outputs(results, Path(args.out))
    dense = results["dense"]
    print(f"{args.model} on {args.data} {results['input_shape']}: dense {dense['params'] / 1e6:.3f}M params, "
          f"{dense['flops']:.3e} FLOPs; sparse-trained (lam={fmt_lam(args.lam)}) {results['sparse_accuracy']:.2f}%; "
          f"{results['elapsed_s']:.0f} s\n")
    print(text)
    print(f"written to {args.out}: study.md, results.json, rates.png, criteria.png, gamma_hist.png")


if __name__ == "__main__":
    main()
