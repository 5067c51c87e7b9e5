"""Why QAT keeps batch norm, and what freezing it late costs: the figures of docs/quantization.md.

1. Fine-tune a trained resnet20-cifar for one epoch with its BN folded into the convolutions
   (what QAT did before), at two learning rates: a network without normalization needs a small one.
   Then 4-bit QAT of that model with BN folded first vs kept (``keep_bn``).
2. 8-bit QAT with BN kept (``slimkit.quantize.qat``) on an undertrained resnet20, one epoch at a
   constant learning rate, BN statistics frozen after 50 %, 90 % of the steps or never.

    .venv/bin/python benchmarks/qat_bn_study.py            # about 5 minutes on one core
"""

from __future__ import annotations

import argparse
import copy

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trained-epochs", type=int, default=6, help="baseline of part 1 (lr 0.05)")
    parser.add_argument("--undertrained-epochs", type=int, default=3, help="baseline of part 2 (lr 0.05)")
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from slimkit.data import load_data
    from slimkit.models import create_model
    from slimkit.quantize.fold import fold_bn_
    from slimkit.quantize.qat import fold_qat_bn_, late_freezer, prepare_qat_
    from slimkit.train import TrainConfig, TrainHooks, evaluate, fit

    data = load_data("digits")

    def baseline(epochs: int):
        model = create_model("resnet20-cifar", num_classes=data.num_classes, in_channels=data.in_channels)
        fit(model, data.train, TrainConfig(epochs=epochs, lr=0.05, seed=0), progress=False)
        return model.eval()

    trained = baseline(args.trained_epochs)
    print(f"\nPart 1: resnet20-cifar trained {args.trained_epochs} epochs: {evaluate(trained, data.test):.2f} %")
    print("| BN | fine-tune lr | accuracy after 1 epoch % |")
    print("|---|---:|---:|")
    for lr in (0.005, 0.0005):
        folded = copy.deepcopy(trained)
        fold_bn_(folded)
        fit(folded, data.train, TrainConfig(epochs=1, lr=lr, seed=0), progress=False)
        print(f"| folded | {lr} | {evaluate(folded.eval(), data.test):.2f} |", flush=True)

    print(f"\n4-bit QAT of the same model (first and last layer at 8 bits), {args.qat_epochs} epochs at lr 0.005, "
          "activation ranges and BN frozen after 50 %")
    print("| BN in QAT | 4-bit PTQ % | 4-bit QAT % |")
    print("|---|---:|---:|")
    for keep_bn in (False, True):
        q = copy.deepcopy(trained)
        prepare_qat_(q, torch.zeros(1, *data.input_shape),
                     {"bits": 4, "weight_observer": "mse", "overrides": {"conv1": 8, "fc": 8}, "keep_bn": keep_bn},
                     calibration=data.train)
        ptq = evaluate(q.eval(), data.test)
        fit(q, data.train, TrainConfig(epochs=args.qat_epochs, lr=0.005, seed=0),
            TrainHooks(after_step=(late_freezer(0.5, 0.5),)), progress=False)
        fold_qat_bn_(q)
        label = "kept, frozen late" if keep_bn else "folded before QAT"
        print(f"| {label} | {ptq:.2f} | {evaluate(q.eval(), data.test):.2f} |", flush=True)

    young = baseline(args.undertrained_epochs)
    print(f"\nPart 2: resnet20-cifar trained {args.undertrained_epochs} epochs: {evaluate(young, data.test):.2f} %; "
          "8-bit QAT with BN kept, 1 epoch at lr 0.005")
    print("| BN statistics frozen after | QAT accuracy % |")
    print("|---|---:|")
    for after in (0.5, 0.9, 1.0):
        q = copy.deepcopy(young)
        prepare_qat_(q, torch.zeros(1, *data.input_shape), {"bits": 8}, calibration=data.train)
        hooks = TrainHooks(after_step=(late_freezer(0.5, after),))  # 1.0: only after the last step
        fit(q, data.train, TrainConfig(epochs=1, lr=0.005, seed=0), hooks, progress=False)
        fold_qat_bn_(q)
        label = "never" if after >= 1 else f"{after:.0%} of the steps"
        print(f"| {label} | {evaluate(q.eval(), data.test):.2f} |", flush=True)


if __name__ == "__main__":
    main()
