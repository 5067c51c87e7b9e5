"""Distillation methods side by side: CE alone, KD, FitNets, AT, FSP, CRD and TAKD, one teacher, one student.

The teacher is LeNet-5 (``lenet5``, 431k parameters, the Deep Compression baseline), trained
once; the student is ``plaincnn-20-50`` (two 3x3 conv-BN-ReLU blocks with LeNet-5's widths,
20 and 50 channels, 1/25 of its parameters). Every method trains a fresh student from the
same init for ``--epochs`` epochs per seed (same data order, same optimizer), so per-seed
differences are paired. Feature pairs (LeNet-5 modules: conv1 [20, 24, 24], pool1 [20, 12, 12],
conv2 [50, 8, 8], relu = ReLU(fc1) [500]; student: block1 [20, 28, 28], block2 [50, 14, 14]):

- FitNets hint: student ``features.block2`` -> teacher ``conv2`` (1x1 regressor, pooled to 8x8);
- AT: ``block1 -> conv1`` and ``block2 -> conv2`` (attention maps pooled to the smaller);
- FSP: the student's ``[block1, block2]`` flow against the teacher's ``[conv1, conv2]`` (both
  20 x 50 matrices), single stage with weight 0.01: the paper's lambda = 1 makes the squared
  Frobenius sum (hundreds at init) swamp cross-entropy and diverge at lr 0.05, with or
  without the two-stage schedule (measured on a plain-CNN pair);
- CRD: the student's flattened penultimate features (``flatten``) against the teacher's
  (``relu``, after fc1), memory bank of the whole training set (1437 samples), 4096 negatives
  capped at the bank;
- TAKD: teacher -> auto-sized plain-CNN assistant -> student, KD at each step.

    .venv/bin/python benchmarks/distill_literature.py                      # digits, 3 seeds, 4 epochs
    .venv/bin/python benchmarks/distill_literature.py --seed-list 1 --out runs/dl1   # one seed per process
    .venv/bin/python benchmarks/distill_literature.py --merge runs/dl0/results.json runs/dl1/results.json
    .venv/bin/python benchmarks/distill_literature.py --data cifar10 --download --teacher-epochs 40 \\
        --epochs 30 --seeds 3                                               # on a GPU

Results: ``--out`` (default ``runs/distill_literature``) ``results.json``; plot ``--plot``
(default ``docs/figures/distill_literature.png``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slimkit.data import load_data
from slimkit.distill.methods import build_hooks
from slimkit.distill.takd import build_student, count_params, size_assistant
from slimkit.train import TrainConfig, evaluate, fit

TEACHER, STUDENT = "lenet5", "plaincnn-20-50"
KD = {"method": "kd", "temperature": 4.0, "alpha": 0.9}
METHODS = {
    "CE alone": None,
    "KD": KD,
    "FitNets": {"method": "hint", "options": {"pairs": [["features.block2", "conv2"]]}},
    "AT": {"method": "at", "options": {"pairs": [["features.block1", "conv1"], ["features.block2", "conv2"]]}},
    "FSP": {"method": "fsp", "options": {"weight": 0.01,
                                         "pairs": [{"student": ["features.block1", "features.block2"],
                                                    "teacher": ["conv1", "conv2"]}]}},
    "CRD": {"method": "crd", "options": {"pairs": [["flatten", "relu"]]}},
}


class _Ctx:
    """What the method builders read: example inputs, data, training settings."""

    def __init__(self, data, cfg: TrainConfig) -> None:
        self.example_inputs = torch.zeros(2, *data.input_shape)
        self.data, self.train_config, self.baseline = data, cfg, None


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def train(name: str, teacher, spec, data, cfg: TrainConfig):
    torch.manual_seed(cfg.seed)
    student = build_student(name, data.num_classes, data.in_channels)
    hooks = build_hooks(spec, student, teacher, _Ctx(data, cfg)) if spec else None
    fit(student, data.train, cfg, hooks, progress=False)
    return evaluate(student, data.test), student


def run(args) -> dict:
    data = load_data(args.data, data_dir=args.data_dir, download=args.download, seed=0, image_size=args.image_size)
    started = time.perf_counter()
    torch.manual_seed(0)
    teacher = build_student(TEACHER, data.num_classes, data.in_channels)
    # LeNet-5 (no ReLU after its convs) is unstable at 0.05: the deep-compression recipe's 0.02, batch 32
    fit(teacher, data.train, TrainConfig(epochs=args.teacher_epochs, lr=0.02, batch_size=32), progress=False)
    teacher.eval()
    teacher_acc = evaluate(teacher, data.test)
    assistant = size_assistant(teacher, STUDENT, data.num_classes, data.in_channels)
    sizes = {n: count_params(build_student(n, data.num_classes, data.in_channels)) for n in (STUDENT, assistant)}
    print(f"teacher {TEACHER}: {teacher_acc:.2f}% ({count_params(teacher)} params); student {STUDENT} "
          f"({sizes[STUDENT]}); TAKD assistant {assistant} ({sizes[assistant]})", flush=True)
    result = {"data": args.data, "teacher": TEACHER, "teacher_accuracy": teacher_acc,
              "teacher_params": count_params(teacher), "student": STUDENT, "student_params": sizes[STUDENT],
              "assistant": assistant, "epochs": args.epochs, "runs": {name: {} for name in [*METHODS, "TAKD"]}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seed_list or range(args.seeds):
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=seed)
        for name, spec in METHODS.items():
            acc, _ = train(STUDENT, teacher, spec, data, cfg)
            result["runs"][name][str(seed)] = acc
            print(f"  seed {seed} {name:10s} {acc:6.2f}%", flush=True)
            (out / "results.json").write_text(json.dumps(result, indent=1))  # partial results survive a kill
        acc_a, ta = train(assistant, teacher, KD, data, cfg)
        acc, _ = train(STUDENT, ta.eval(), KD, data, cfg)
        result["runs"]["TAKD"][str(seed)] = acc
        print(f"  seed {seed} {'TAKD':10s} {acc:6.2f}%  (assistant {acc_a:.2f}%)", flush=True)
        (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"{time.perf_counter() - started:.0f} s; results: {out / 'results.json'}")
    return result


def summarize(results: list[dict], plot: Path) -> dict:
    """Merge per-process results (their seeds), print the table with paired gains over CE, draw the plot."""
    first = results[0]
    runs: dict[str, dict[str, float]] = {name: {} for name in first["runs"]}
    for r in results:
        for name, per_seed in r["runs"].items():
            runs[name].update(per_seed)
    base = runs["CE alone"]
    table = {}
    print(f"\n{first['student']} ({first['student_params']} params) on {first['data']}, {first['epochs']} epochs "
          f"(SGD lr 0.05, batch 64); teacher {first['teacher']} {first['teacher_accuracy']:.2f}% "
          f"({first['teacher_params']} params); TAKD assistant {first['assistant']}")
    print("\n| method | seeds | test accuracy, mean ± std | paired gain over CE alone, mean (min, max) | runs |")
    print("|---|---|---|---|---|")
    for name, per_seed in runs.items():
        seeds = sorted(per_seed, key=int)
        if not seeds:
            continue
        values = [per_seed[s] for s in seeds]
        table[name] = _stats(values)
        gains = [per_seed[s] - base[s] for s in seeds if s in base]
        gain = f"{statistics.mean(gains):+.2f} ({min(gains):+.2f}, {max(gains):+.2f})" if gains else "-"
        print(f"| {name} | {len(seeds)} | {table[name]['mean']:.2f} ± {table[name]['std']:.2f} | {gain} | "
              f"{', '.join(f'{v:.1f}' for v in values)} |")
    merged = {**first, "runs": runs, "methods": table, "seeds": max(len(v) for v in runs.values())}
    _plot(table, merged, plot)
    return merged


def _plot(table: dict, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [table[n]["mean"] for n in names], yerr=[table[n]["std"] for n in names], capsize=4,
           color=["#8c8c8c"] + ["#4c72b0"] * (len(names) - 1))
    for i, n in enumerate(names):
        ax.scatter([i] * len(table[n]["runs"]), table[n]["runs"], color="black", s=8, zorder=3)
    ax.axhline(result["teacher_accuracy"], color="#c44e52", linestyle="--",
               label=f"teacher {result['teacher']} {result['teacher_accuracy']:.1f}%")
    low = min(min(table[n]["runs"]) for n in names)
    ax.set_ylim(max(0, low - 2), min(100, max(result["teacher_accuracy"], *(max(t["runs"]) for t in table.values()))
                                    + 1))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{result['student']} on {result['data']}: mean ± std (dots: seeds), {result['epochs']} epochs",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
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
    parser.add_argument("--image-size", type=int, default=0, help="resize images (0: as loaded, 28x28 digits)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="student epochs (SGD, batch 64)")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed-list", type=int, nargs="+", help="run these seeds instead of 0..seeds-1 "
                        "(several processes in parallel, then --merge)")
    parser.add_argument("--out", default="runs/distill_literature")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON", help="only merge these results files: "
                        "table and plot")
    parser.add_argument("--plot", default="docs/figures/distill_literature.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.image_size = args.image_size or None
    torch.set_num_threads(args.threads)
    if args.merge:
        summarize([json.loads(Path(p).read_text()) for p in args.merge], Path(args.plot))
        return
    summarize([run(args)], Path(args.plot))


if __name__ == "__main__":
    main()
