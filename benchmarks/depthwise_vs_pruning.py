"""Depthwise-separable conversion vs structured pruning to the same MACs, on one baseline.

Trains one baseline (default vgg11-cifar on the embedded digits set), then:

- ``decompose: {method: depthwise-separable, rank: M}`` turns every 3x3 conv but the stem
  into depthwise 3x3 (depth multiplier M) + pointwise 1x1, fitted in closed form from the
  trained kernel (the MobileNet block obtained from a trained standard convolution);
- ``structured_`` (L1 filter norm, ``target: macs``) prunes a copy of the same baseline
  until it has (at most) the decomposed model's MACs;

and fine-tunes both for the same epochs. For each it prints accuracy right after the
transform and after fine-tuning, params, MACs (``slimkit.measure.count_macs``) and the
median latency at batch 1 on one thread in eager PyTorch and in ONNX Runtime, with the
speed-up over the baseline (latency baseline / latency model).

    python benchmarks/depthwise_vs_pruning.py                       # default: ~15 min on a loaded 2-core CPU
    python benchmarks/depthwise_vs_pruning.py --epochs 6 --finetune 3 --repeats 100
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from slimkit.data import load_data
from slimkit.decompose import decompose_
from slimkit.export.onnx import OnnxRunner, export_onnx
from slimkit.measure import count_macs, measure_latency
from slimkit.models import create_model
from slimkit.prune import structured_
from slimkit.train import evaluate, fit


def _latency(model: nn.Module, x: torch.Tensor, repeats: int, tmp: Path, label: str) -> tuple[float, float]:
    """(eager ms, ONNX Runtime ms): median of ``repeats`` batch-``len(x)`` forwards on the current threads."""
    model.eval()
    eager = measure_latency(model, x, runs=repeats).median_ms
    runner = OnnxRunner(export_onnx(model, x, tmp / f"{label}.onnx"), threads=torch.get_num_threads())
    with torch.no_grad():
        reference = model(x)
    gap = float((runner(x) - reference).abs().max())
    assert gap < 1e-3 * max(1.0, float(reference.abs().max())), f"{label}: ONNX Runtime differs from eager by {gap}"
    return eager, runner.latency_ms(x, repeats=repeats)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg11-cifar")
    parser.add_argument("--epochs", type=int, default=3, help="baseline training epochs")
    parser.add_argument("--finetune", type=int, default=2, help="fine-tune epochs for both compressed models")
    parser.add_argument("--lr", type=float, default=0.05, help="baseline learning rate")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--multiplier", type=int, default=1, help="depth multiplier (the decomposition's rank)")
    parser.add_argument("--criterion", default="l1", help="structured pruning criterion")
    parser.add_argument("--ignore", nargs="*", default=None, help="layer globs left whole (default: the stem)")
    parser.add_argument("--repeats", type=int, default=30, help="timed forwards per latency figure")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = load_data("digits")
    train_cfg = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": 0}
    tune_cfg = {"epochs": args.finetune, "lr": args.finetune_lr, "batch_size": args.batch_size, "seed": 0}
    baseline = create_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels)
    fit(baseline, data.train, train_cfg, progress=False)
    baseline.eval()
    x = torch.zeros(1, *data.input_shape)
    stem = next(n for n, m in baseline.named_modules() if isinstance(m, nn.Conv2d))
    ignore = args.ignore if args.ignore is not None else [stem]

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)

        def record(name: str, model: nn.Module, acc: float, tuned: float | None) -> dict:
            eager, ort = _latency(model, x, args.repeats, tmp, name)
            row = dict(model=name, params=sum(p.numel() for p in model.parameters()),
                       macs=int(count_macs(model, x)), accuracy=acc, finetuned=tuned, eager_ms=eager, ort_ms=ort)
            rows.append(row)
            return row

        base = record("baseline", baseline, evaluate(baseline, data.test), None)

        dws = copy.deepcopy(baseline)
        report = decompose_(dws, x, {"method": "depthwise-separable", "rank": args.multiplier, "ignore": ignore})
        dws_acc = evaluate(dws, data.test)
        fit(dws, data.train, tune_cfg, progress=False)
        dw_row = record(f"depthwise-separable m={args.multiplier}", dws, dws_acc, evaluate(dws, data.test))
        dw_row["layers"] = len(report.layers)
        dw_row["mean_rel_error"] = sum(r.rel_error for r in report.layers) / max(len(report.layers), 1)

        pruned = copy.deepcopy(baseline)
        ratio = 1 - dw_row["macs"] / base["macs"]
        sreport = structured_(pruned, x, {"ratio": ratio, "target": "macs", "criterion": args.criterion})
        pruned_acc = evaluate(pruned, data.test)
        fit(pruned, data.train, tune_cfg, progress=False)
        pr_row = record(f"structured {args.criterion} (same MACs)", pruned, pruned_acc, evaluate(pruned, data.test))
        pr_row["channel_ratio"] = sreport.ratio

    print(f"{args.model} on digits: baseline {args.epochs} epochs, both compressed models fine-tuned "
          f"{args.finetune} epochs at lr {args.finetune_lr}; latency batch 1, {args.threads} thread(s), "
          f"median of {args.repeats}; speed-up = baseline latency / model latency")
    print("| model | params | MACs | MACs x | acc % | after fine-tune % | eager ms | eager x | ORT ms | ORT x |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        tuned = f"{row['finetuned']:.2f}" if row["finetuned"] is not None else "-"
        print(f"| {row['model']} | {row['params']:,} | {row['macs'] / 1e6:.2f}M | {base['macs'] / row['macs']:.2f} | "
              f"{row['accuracy']:.2f} | {tuned} | {row['eager_ms']:.2f} | {base['eager_ms'] / row['eager_ms']:.2f} | "
              f"{row['ort_ms']:.2f} | {base['ort_ms'] / row['ort_ms']:.2f} |")
    print(f"depthwise-separable: {dw_row['layers']} convs converted, mean relative kernel error "
          f"{dw_row['mean_rel_error']:.3f}; structured: channel ratio {pr_row['channel_ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
