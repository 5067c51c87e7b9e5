"""Distillation study on the embedded digits data (CPU, a few minutes).

Part 1 (``--part methods``): one LeNet-5 teacher, one narrow 2-conv plain-CNN student
(``plaincnn-2-4``, ~0.6% of the teacher's parameters) trained alone (cross-entropy) and
with KD, FitNets hints, attention transfer and TAKD (teacher -> auto-sized assistant ->
student), over several seeds: a table of mean, spread (std) and per-seed test accuracy,
and a bar plot.

Part 2 (``--part pruning``): resnet20-cifar (1 input channel) trained, pruned to 30% of its
MACs with ``slimkit.prune.structured_`` (L1 filter norm), then fine-tuned with and without
KD from the dense model, over the same seeds: the difference KD - CE is printed.

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


def part_pruning(args, data) -> dict:
    from slimkit.measure import count_macs
    from slimkit.prune import structured_

    x = torch.zeros(1, *data.input_shape)
    torch.manual_seed(0)
    dense = create_model("resnet20-cifar", num_classes=data.num_classes, in_channels=data.in_channels)
    fit(dense, data.train, TrainConfig(epochs=args.prune_teacher_epochs, lr=0.05), progress=False)
    dense.eval()
    dense_acc, dense_macs = evaluate(dense, data.test), count_macs(dense, x)
    pruned = copy.deepcopy(dense)
    structured_(pruned, x, {"ratio": 0.7, "target": "macs", "criterion": "l1"})
    pruned_macs = count_macs(pruned, x)
    pruned_acc = evaluate(pruned, data.test)
    print(f"resnet20-cifar dense {dense_acc:.2f}% {dense_macs / 1e6:.2f}M MACs; pruned to "
          f"{100 * pruned_macs / dense_macs:.1f}% MACs: {pruned_acc:.2f}% before fine-tuning")
    ce, kd = [], []
    for seed in range(args.seeds):
        cfg = TrainConfig(epochs=args.prune_epochs, lr=0.01, seed=seed)
        a = copy.deepcopy(pruned)
        fit(a, data.train, cfg, progress=False)
        b = copy.deepcopy(pruned)
        fit(b, data.train, cfg, build_hooks({"method": "kd", "temperature": 4.0, "alpha": args.kd_alpha}, b, dense),
            progress=False)
        ce.append(evaluate(a, data.test))
        kd.append(evaluate(b, data.test))
        print(f"  seed {seed}: fine-tune CE {ce[-1]:.2f}%  KD {kd[-1]:.2f}%", flush=True)
    diff = [k - c for k, c in zip(kd, ce)]
    print(f"fine-tuned at {100 * pruned_macs / dense_macs:.1f}% MACs over {args.seeds} seeds: CE "
          f"{statistics.mean(ce):.2f} ± {_std(ce):.2f}, KD {statistics.mean(kd):.2f} ± {_std(kd):.2f}, "
          f"KD - CE = {statistics.mean(diff):+.2f} ± {_std(diff):.2f} points")
    return {"dense_accuracy": dense_acc, "dense_macs": dense_macs, "pruned_macs": pruned_macs,
            "pruned_accuracy_before_finetune": pruned_acc, "finetune_ce": _stats(ce), "finetune_kd": _stats(kd),
            "kd_minus_ce": _stats(diff), "finetune_epochs": args.prune_epochs, "kd_alpha": args.kd_alpha}


def _std(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["all", "methods", "pruning"], default="all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="student training epochs (part 1)")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--prune-teacher-epochs", type=int, default=6, help="dense resnet20 epochs (part 2)")
    parser.add_argument("--prune-epochs", type=int, default=3, help="fine-tune epochs after pruning (part 2)")
    parser.add_argument("--kd-alpha", type=float, default=0.9, help="KD weight of the pruned fine-tune (part 2)")
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
