"""Distillation study on the embedded digits data (CPU, a few minutes).

Part 1 (``--part methods``): one LeNet-5 teacher, one narrow 2-conv plain-CNN student
(``plaincnn-2-4``, ~0.6% of the teacher's parameters) trained alone (cross-entropy) and
with KD, FitNets hints, attention transfer and TAKD (teacher -> auto-sized assistant ->
student), over several seeds: a table of mean, spread (std) and per-seed test accuracy,
and a bar plot.

Part 2 (``--part pruning``): a dense resnet20-cifar (1 input channel) trained once and saved
(``--teacher``, default ``OUT/resnet20_dense.pt``; reused when it exists); a diagnosis of
one-shot pruning to 30% of the MACs (pruned vs the same channels zeroed by masks, and BN
re-estimation); iterative ``structured_`` pruning (L1, local) in ``--prune-rounds`` rounds
with BN re-estimation and ``--round-epochs`` CE epochs between; then, per seed, the same
pruned network fine-tuned with cross-entropy and with KD (cached teacher logits) from the
dense model at each ``--kd-alpha``: table with mean ± std and the paired KD - CE per seed,
and a bar plot ``pruning.png``.

    .venv/bin/python benchmarks/distill_study.py                  # both parts, 3 seeds
    .venv/bin/python benchmarks/distill_study.py --part methods --seeds 5 --epochs 15

Results go to ``--out`` (default ``runs/distill_study``): ``results.json``, ``methods.png``.
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
from slimkit.distill.methods import build_hooks
from slimkit.distill.takd import build_student, count_params, size_assistant
from slimkit.models import create_model
from slimkit.train import TrainConfig, evaluate, fit

STUDENT = "plaincnn-2-4"
# LeNet-5 modules: conv1 [20,24,24], pool1 [20,12,12], conv2 [50,8,8], pool2 [50,4,4].
HINT_PAIRS = [{"student": "features.block2", "teacher": "pool1"}]
AT_PAIRS = [{"student": "features.block1", "teacher": "conv1"}, {"student": "features.block2", "teacher": "pool1"}]
METHODS = {
    "student alone": None,
    "KD": {"method": "kd", "temperature": 4.0, "alpha": 0.9},
    "hints (FitNets)": {"method": "hint", "options": {"pairs": HINT_PAIRS, "weight": 1.0}},
    "AT": {"method": "at", "options": {"pairs": AT_PAIRS}},
    "AT + KD": {"method": "at", "temperature": 4.0, "alpha": 0.9, "options": {"pairs": AT_PAIRS, "kd": True}},
}


class _Ctx:
    def __init__(self, data, cfg):
        self.example_inputs = torch.zeros(2, *data.input_shape)
        self.data = data
        self.train_config = cfg
        self.baseline = None


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def train_student(name: str, teacher, spec, data, cfg: TrainConfig) -> tuple[float, torch.nn.Module]:
    torch.manual_seed(cfg.seed)
    student = build_student(name, data.num_classes, data.in_channels)
    hooks = build_hooks(spec, student, teacher, _Ctx(data, cfg)) if spec else None
    fit(student, data.train, cfg, hooks, progress=False)
    return evaluate(student, data.test), student


def part_methods(args, data) -> dict:
    torch.manual_seed(0)
    teacher = create_model("lenet5", num_classes=data.num_classes, in_channels=data.in_channels)
    fit(teacher, data.train, TrainConfig(epochs=args.teacher_epochs, lr=0.01), progress=False)
    teacher.eval()
    teacher_acc = evaluate(teacher, data.test)
    assistant = size_assistant(teacher, STUDENT, data.num_classes, data.in_channels)
    print(f"teacher lenet5: {teacher_acc:.2f}% ({count_params(teacher)} params); student {STUDENT} "
          f"({count_params(build_student(STUDENT, 10, 1))} params); TAKD assistant {assistant} "
          f"({count_params(build_student(assistant, 10, 1))} params)")
    results: dict[str, list[float]] = {name: [] for name in [*METHODS, "TAKD"]}
    assistant_acc = []
    for seed in range(args.seeds):
        cfg = TrainConfig(epochs=args.epochs, lr=0.05, seed=seed)
        for name, spec in METHODS.items():
            acc, _ = train_student(STUDENT, teacher, spec, data, cfg)
            results[name].append(acc)
            print(f"  seed {seed} {name:16s} {acc:6.2f}%", flush=True)
        kd = METHODS["KD"]
        acc_a, ta = train_student(assistant, teacher, kd, data, cfg)
        acc, _ = train_student(STUDENT, ta.eval(), kd, data, cfg)
        assistant_acc.append(acc_a)
        results["TAKD"].append(acc)
        print(f"  seed {seed} {'TAKD':16s} {acc:6.2f}%  (assistant {acc_a:.2f}%)", flush=True)
    table = {name: _stats(v) for name, v in results.items()}
    print(f"\n| method | test accuracy, mean ± std over {args.seeds} seeds | runs |\n|---|---|---|")
    print(f"| teacher lenet5 | {teacher_acc:.2f} | - |")
    for name, s in table.items():
        print(f"| {name} | {s['mean']:.2f} ± {s['std']:.2f} | {', '.join(f'{v:.1f}' for v in s['runs'])} |")
    _plot(table, teacher_acc, Path(args.out) / "methods.png", args)
    return {"teacher_accuracy": teacher_acc, "teacher_params": count_params(teacher), "student": STUDENT,
            "assistant": assistant, "assistant_accuracy": _stats(assistant_acc), "methods": table,
            "epochs": args.epochs, "seeds": args.seeds}


def _plot(table: dict, teacher_acc: float, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [table[n]["mean"] for n in names], yerr=[table[n]["std"] for n in names], capsize=4,
           color="#4c72b0")
    ax.axhline(teacher_acc, color="#c44e52", linestyle="--", label=f"teacher lenet5 {teacher_acc:.1f}%")
    low = min(min(table[n]["runs"]) for n in names)
    ax.set_ylim(max(0, low - 3), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{STUDENT} student on digits, mean ± std over {args.seeds} seeds, {args.epochs} epochs")
    ax.legend(loc="lower right")
    plt.setp(ax.get_xticklabels(), rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


@torch.no_grad()
def masked_copy(model: nn.Module, x: torch.Tensor, config: dict) -> nn.Module:
    """A copy of ``model`` whose channels ``structured_`` would remove are zeroed instead (masks, no surgery).

    Zeroing a channel's producing filter and its BatchNorm scale and shift makes its output
    exactly 0 everywhere it is read (residual additions included), so the masked copy must
    compute the same function as the physically pruned model.
    """
    from slimkit.prune import plan_structured
    from slimkit.prune.surgery import removals_for

    plan = plan_structured(model, x, config)  # the channels structured_ removes (same selection, no surgery)
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    for (name, role), idx in removals_for(plan.graph, plan.units).items():
        if role == "out":
            module, idx = modules[name], torch.as_tensor(idx)
            module.weight[idx] = 0
            if getattr(module, "bias", None) is not None:
                module.bias[idx] = 0
    return masked


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset, batches: int = 20, batch_size: int = 64) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/var on ``batches`` training batches (no weight change).

    Removing input channels of a conv shifts the statistics of its output, but the BN after
    it keeps the running statistics of the dense model: in eval mode the pruned network then
    normalises with the wrong mean/var, and the error compounds through 19 layers.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    for i, (inputs, _) in enumerate(loader):
        if i >= batches:
            break
        model(inputs)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def dense_teacher(args, data) -> tuple[nn.Module, float]:
    """The dense resnet20-cifar: loaded from ``--teacher`` when the file exists, else trained and saved there."""
    from slimkit.manifest import load_model, save_model

    path = Path(args.teacher or Path(args.out) / "resnet20_dense.pt")
    if path.exists():
        dense = load_model(path)
        print(f"dense teacher loaded from {path}")
    else:
        torch.manual_seed(0)
        dense = create_model("resnet20-cifar", num_classes=data.num_classes, in_channels=data.in_channels)
        fit(dense, data.train, TrainConfig(epochs=args.prune_teacher_epochs, lr=0.05), progress=False)
        save_model(dense, path, extra={"epochs": args.prune_teacher_epochs})
        print(f"dense teacher trained {args.prune_teacher_epochs} epochs, saved to {path}")
    dense.eval()
    return dense, evaluate(dense, data.test)


def part_pruning(args, data) -> dict:
    from slimkit.measure import count_macs
    from slimkit.prune import structured_

    x = torch.zeros(1, *data.input_shape)
    dense, dense_acc = dense_teacher(args, data)
    dense_macs = count_macs(dense, x)
    keep = 1 - args.prune_ratio
    prune_cfg = {"target": "macs", "criterion": args.criterion, "scope": args.scope}
    print(f"resnet20-cifar dense {dense_acc:.2f}% {dense_macs / 1e6:.2f}M MACs")

    # Why is accuracy at chance right after one-shot pruning? Compare the pruned model with
    # the dense model whose same channels are zeroed by masks, then re-estimate BN statistics.
    oneshot_cfg = {**prune_cfg, "ratio": args.prune_ratio}
    oneshot = copy.deepcopy(dense)
    structured_(oneshot, x, oneshot_cfg)
    oneshot.eval()
    masked = masked_copy(dense, x, oneshot_cfg).eval()
    probe = torch.stack([data.test[i][0] for i in range(min(128, len(data.test)))])
    with torch.no_grad():
        max_diff = float((oneshot(probe) - masked(probe)).abs().max())
    diagnosis = {"oneshot_macs_fraction": count_macs(oneshot, x) / dense_macs,
                 "oneshot_accuracy": evaluate(oneshot, data.test), "masked_accuracy": evaluate(masked, data.test),
                 "pruned_vs_masked_max_abs_logit_diff": max_diff,
                 "oneshot_accuracy_bn_recalibrated": evaluate(recalibrate_bn(oneshot, data.train), data.test)}
    print(f"one-shot to {100 * diagnosis['oneshot_macs_fraction']:.1f}% MACs: {diagnosis['oneshot_accuracy']:.2f}%; "
          f"same channels zeroed by masks: {diagnosis['masked_accuracy']:.2f}% (max |logit diff| {max_diff:.2e}); "
          f"after BN recalibration: {diagnosis['oneshot_accuracy_bn_recalibrated']:.2f}%", flush=True)

    # Iterative pruning: equal MAC reductions per round, BN statistics re-estimated after each
    # (and optionally a short cross-entropy fine-tune, shared by both arms below).
    pruned = copy.deepcopy(dense)
    per_round = 1 - keep ** (1 / args.prune_rounds)
    rounds = []
    for r in range(args.prune_rounds):
        structured_(pruned, x, {**prune_cfg, "ratio": per_round})
        recalibrate_bn(pruned, data.train)
        if args.round_epochs and r < args.prune_rounds - 1:
            fit(pruned, data.train, TrainConfig(epochs=args.round_epochs, lr=args.prune_lr, seed=100 + r),
                progress=False)
        pruned.eval()
        rounds.append({"macs_fraction": count_macs(pruned, x) / dense_macs, "accuracy": evaluate(pruned, data.test)})
        row = rounds[-1]
        print(f"  round {r + 1}: {100 * row['macs_fraction']:.1f}% MACs, {row['accuracy']:.2f}%", flush=True)
    pruned_macs = count_macs(pruned, x)
    pruned_acc = rounds[-1]["accuracy"]

    ce: list[float] = []
    kd: dict[float, list[float]] = {a: [] for a in args.kd_alpha}
    for seed in range(args.seeds):
        cfg = TrainConfig(epochs=args.prune_epochs, lr=args.prune_lr, seed=seed)
        a = copy.deepcopy(pruned)
        fit(a, data.train, cfg, progress=False)
        ce.append(evaluate(a, data.test))
        line = f"  seed {seed}: fine-tune CE {ce[-1]:.2f}%"
        for alpha in args.kd_alpha:
            b = copy.deepcopy(pruned)
            spec = {"method": "kd", "temperature": args.kd_temperature, "alpha": alpha, "options": {"cache": True}}
            fit(b, data.train, cfg, build_hooks(spec, b, dense), progress=False)
            kd[alpha].append(evaluate(b, data.test))
            line += f"  KD(alpha={alpha}) {kd[alpha][-1]:.2f}% ({kd[alpha][-1] - ce[-1]:+.2f})"
        print(line, flush=True)
    result = {"dense_accuracy": dense_acc, "dense_macs": dense_macs, "pruned_macs": pruned_macs,
              "pruned_macs_fraction": pruned_macs / dense_macs, "diagnosis": diagnosis, "rounds": rounds,
              "pruned_accuracy_before_finetune": pruned_acc, "finetune_ce": _stats(ce), "finetune_kd": {},
              "kd_minus_ce": {}, "finetune_epochs": args.prune_epochs, "finetune_lr": args.prune_lr,
              "kd_temperature": args.kd_temperature, "criterion": args.criterion, "scope": args.scope,
              "prune_rounds": args.prune_rounds, "round_epochs": args.round_epochs, "seeds": args.seeds}
    print(f"\n| fine-tune ({args.prune_epochs} epochs, {args.seeds} seeds) | accuracy %, mean ± std | runs |")
    print("|---|---|---|")
    print(f"| cross-entropy | {statistics.mean(ce):.2f} ± {_std(ce):.2f} | {', '.join(f'{v:.2f}' for v in ce)} |")
    for alpha, values in kd.items():
        diff = [k - c for k, c in zip(values, ce)]
        result["finetune_kd"][str(alpha)] = _stats(values)
        result["kd_minus_ce"][str(alpha)] = _stats(diff)
        print(f"| KD T={args.kd_temperature:g} alpha={alpha:g} | {statistics.mean(values):.2f} ± {_std(values):.2f} | "
              f"{', '.join(f'{v:.2f}' for v in values)} |")
        print(f"| KD - CE (paired per seed) | {statistics.mean(diff):+.2f} ± {_std(diff):.2f} | "
              f"{', '.join(f'{v:+.2f}' for v in diff)} |")
    _plot_pruning(result, Path(args.out) / "pruning.png")
    return result


def _plot_pruning(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["after pruning\n(no fine-tune)", "fine-tune CE"]
    means = [result["pruned_accuracy_before_finetune"], result["finetune_ce"]["mean"]]
    stds = [0.0, result["finetune_ce"]["std"]]
    runs = [[result["pruned_accuracy_before_finetune"]], result["finetune_ce"]["runs"]]
    for alpha, s in result["finetune_kd"].items():
        names.append(f"fine-tune KD\nalpha={alpha}")
        means.append(s["mean"])
        stds.append(s["std"])
        runs.append(s["runs"])
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.bar(names, means, yerr=stds, capsize=4, color=["#8c8c8c", "#4c72b0"] + ["#55a868"] * (len(names) - 2))
    for i, values in enumerate(runs):
        ax.scatter([i] * len(values), values, color="black", s=10, zorder=3)
    ax.axhline(result["dense_accuracy"], color="#c44e52", linestyle="--",
               label=f"dense resnet20 {result['dense_accuracy']:.1f}%")
    low = min(min(v) for v in runs)
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    n_seeds = result["seeds"]
    ax.set_title(f"resnet20-cifar pruned to {100 * result['pruned_macs_fraction']:.0f}% MACs, digits, "
                 f"{n_seeds} seeds x {result['finetune_epochs']} epochs", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def _std(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["all", "methods", "pruning"], default="all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="student training epochs (part 1)")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--teacher", default=None,
                        help="dense resnet20 file (part 2): loaded when it exists, else trained and saved there "
                             "(default: OUT/resnet20_dense.pt)")
    parser.add_argument("--prune-teacher-epochs", type=int, default=8, help="dense resnet20 epochs (part 2)")
    parser.add_argument("--prune-ratio", type=float, default=0.7, help="fraction of the MACs to remove (part 2)")
    parser.add_argument("--criterion", default="l1", help="structured pruning criterion (part 2)")
    parser.add_argument("--scope", choices=["local", "global"], default="local")
    parser.add_argument("--prune-rounds", type=int, default=3, help="iterative pruning rounds (part 2)")
    parser.add_argument("--round-epochs", type=int, default=1, help="CE epochs between pruning rounds (part 2)")
    parser.add_argument("--prune-epochs", type=int, default=5, help="fine-tune epochs after pruning (part 2)")
    parser.add_argument("--prune-lr", type=float, default=0.02, help="fine-tune learning rate (part 2)")
    parser.add_argument("--kd-alpha", type=float, nargs="+", default=[0.5, 0.9],
                        help="KD weight(s) of the pruned fine-tune (part 2)")
    parser.add_argument("--kd-temperature", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/distill_study")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    data = load_data("digits")
    started = time.perf_counter()
    results: dict = {"args": vars(args)}
    if args.part in ("all", "methods"):
        results["methods"] = part_methods(args, data)
    if args.part in ("all", "pruning"):
        results["pruning"] = part_pruning(args, data)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {Path(args.out) / 'results.json'} ({results['elapsed_s']} s)")


if __name__ == "__main__":
    main()
