"""Quantization targets of issue 6 on digits, in one run: prints the tables of docs/quantization.md.

For each model (trained here for ``--epochs``): fp32 accuracy; per-channel int8 PTQ as executed
by ONNX Runtime (and its fake-quant simulation) with the stored-weight ratio; the per-tensor vs
per-channel comparison; 4-bit weights after QAT (``--qat-epochs``); BWN (lenet5).

    .venv/bin/python benchmarks/quantization_targets.py                       # lenet5 only, fast
    .venv/bin/python benchmarks/quantization_targets.py --models lenet5 resnet20-cifar mobilenet_v2
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch


def ptq(model, data, per_channel: bool, reduce_range, out_dir: str = "/tmp", observer: str = "minmax") -> dict:
    from slimkit.deploy import compare_engines
    from slimkit.measure.storage import stored_bytes
    from slimkit.quantize import quantize_

    q = copy.deepcopy(model).eval()
    cfg = {"bits": 8, "per_channel": per_channel, "reduce_range": reduce_range, "observer": observer}
    example = torch.zeros(1, *data.input_shape)
    report = quantize_(q, example, cfg, calibration=data.train)
    res = compare_engines(q, model, data.test, example, out_dir, engines=("onnxruntime",))
    return {"reduced": report.reduce_range, "fakequant": res["torch-fakequant"].accuracy,
            "ort_int8": res["onnxruntime-int8"].accuracy,
            "agreement": res["onnxruntime-int8"].agreement_with_fakequant, "bytes": stored_bytes(q),
            "ort_fp32_ms": res["onnxruntime-fp32"].latency_ms, "ort_int8_ms": res["onnxruntime-int8"].latency_ms}


def grid_noise_by_kind(model) -> dict[str, tuple[int, float, float]]:
    """{layer kind: (layers, mean per-tensor noise, mean per-channel noise)} of the BN-folded int8 weights;
    noise = ||W - Q(W)||^2 / ||W||^2 on the min-max grid."""
    from slimkit.quantize.sensitivity import fold_copy, weight_noise

    groups: dict[str, list[tuple[float, float]]] = {}
    for m in fold_copy(model).modules():
        if isinstance(m, torch.nn.Conv2d):
            kind = ("depthwise 3x3" if m.groups == m.in_channels > 1 else
                    "pointwise 1x1" if m.kernel_size == (1, 1) else "dense conv")
        elif isinstance(m, torch.nn.Linear):
            kind = "linear"
        else:
            continue
        noise = (weight_noise(m, 8, per_channel=False), weight_noise(m, 8, per_channel=True))
        groups.setdefault(kind, []).append(noise)
    return {k: (len(v), sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)) for k, v in groups.items()}


def qat4(model, data, epochs: int, lr: float, pin_ends: bool = True, freeze_bn_after: float = 0.5) -> dict:
    """4-bit weights (MSE grid), 8-bit activations; BN kept in QAT and frozen late; first and last
    layers at 8 bits when ``pin_ends``."""
    from slimkit.measure.storage import stored_bytes
    from slimkit.quantize.qat import fold_qat_bn_, late_freezer, prepare_qat_
    from slimkit.train import TrainConfig, TrainHooks, evaluate, fit

    q = copy.deepcopy(model)
    layers = [n for n, m in q.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    overrides = {layers[0]: 8, layers[-1]: 8} if pin_ends else {}
    prepare_qat_(q, torch.zeros(1, *data.input_shape), {"bits": 4, "weight_observer": "mse", "overrides": overrides},
                 calibration=data.train)
    ptq_acc = evaluate(q.eval(), data.test)
    hooks = TrainHooks(after_step=(late_freezer(0.5, freeze_bn_after),))
    fit(q, data.train, TrainConfig(epochs=epochs, lr=lr, seed=0), hooks, progress=False)
    fold_qat_bn_(q)
    return {"ptq4": ptq_acc, "qat4": evaluate(q.eval(), data.test), "bytes": stored_bytes(q)}


def bwn(model, data, epochs: int) -> dict:
    from slimkit.measure.storage import stored_bytes
    from slimkit.quantize import binarize_
    from slimkit.train import TrainConfig, evaluate, fit

    b = copy.deepcopy(model)
    binarize_(b, torch.zeros(1, *data.input_shape), {"mode": "bwn"})
    fit(b, data.train, TrainConfig(epochs=epochs, optimizer="adam", lr=1e-3, weight_decay=0.0, seed=0),
        progress=False)
    return {"bwn": evaluate(b.eval(), data.test), "bytes": stored_bytes(b)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet5"])
    parser.add_argument("--epochs", type=int, default=8, help="baseline training epochs")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--qat-lr", type=float, default=0.005)
    parser.add_argument("--qat-freeze-bn-after", type=float, default=0.5)
    parser.add_argument("--qat-all-4bit", action="store_true", help="first and last layers at 4 bits too")
    parser.add_argument("--bwn-epochs", type=int, default=6)
    parser.add_argument("--skip", nargs="*", default=[], choices=["qat", "bwn", "per-tensor"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reduce-range", nargs="+", default=["auto", "false"], choices=["auto", "true", "false"],
                        help="reduce_range settings of the PTQ table (true: 7-bit weights in int8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="baseline training seeds of the PTQ table")
    parser.add_argument("--observers", nargs="+", default=["minmax"], choices=["minmax", "ema", "percentile", "mse"],
                        help="activation observers of the PTQ table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from slimkit.data import load_data
    from slimkit.measure import state_dict_bytes
    from slimkit.models import create_model
    from slimkit.train import TrainConfig, evaluate, fit

    data = load_data("digits")
    rows, tensor_rows, noise_rows, qat_rows, bwn_rows = [], [], [], [], []
    out = tempfile.mkdtemp(prefix="qtargets-")
    drops: dict[str, list[float]] = {}
    for name in args.models:
        start = time.perf_counter()
        settings = [{"auto": "auto", "true": True, "false": False}[r] for r in args.reduce_range]
        for seed in args.seeds:
            trained = create_model(name, num_classes=data.num_classes, in_channels=data.in_channels)
            fit(trained, data.train, TrainConfig(epochs=args.epochs, lr=args.lr, seed=seed), progress=False)
            trained.eval()
            seed_fp32 = evaluate(trained, data.test)
            fp32_bytes = state_dict_bytes(trained)  # the same for every seed of one architecture
            if seed == args.seeds[0]:  # the other tables use the first seed's model
                model, fp32, first_pc = trained, seed_fp32, None
            for observer in args.observers:
                for reduce in settings:
                    pc = ptq(trained, data, True, reduce, out_dir=out, observer=observer)
                    if trained is model and first_pc is None:
                        first_pc = pc
                    grid = "7-bit range" if pc["reduced"] else "full range"
                    label = f"{name}, {grid} (reduce_range: {str(reduce).lower()}), act {observer}"
                    drops.setdefault(label, []).append(pc["ort_int8"] - seed_fp32)
                    rows.append((f"{label}, seed {seed}", seed_fp32, pc["fakequant"], pc["ort_int8"],
                                 pc["ort_int8"] - seed_fp32, fp32_bytes / pc["bytes"], pc["agreement"],
                                 pc["ort_fp32_ms"] / pc["ort_int8_ms"]))
        if "per-tensor" not in args.skip:
            pt = ptq(model, data, False, settings[0], out_dir=out, observer=args.observers[0])
            tensor_rows.append((name, fp32, pt["fakequant"], pt["ort_int8"], first_pc["fakequant"],
                                first_pc["ort_int8"]))
            noise_rows += [(name, kind, *v) for kind, v in grid_noise_by_kind(model).items()]
        if "qat" not in args.skip:
            r = qat4(model, data, args.qat_epochs, args.qat_lr, not args.qat_all_4bit, args.qat_freeze_bn_after)
            qat_rows.append((name, fp32, r["ptq4"], r["qat4"], r["qat4"] - fp32, fp32_bytes / r["bytes"]))
        if "bwn" not in args.skip and name == "lenet5":
            r = bwn(model, data, args.bwn_epochs)
            bwn_rows.append((name, fp32, r["bwn"], r["bwn"] - fp32, fp32_bytes / r["bytes"]))
        print(f"# {name} done in {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\nPer-channel int8 PTQ (8 calibration batches), digits test, baseline {args.epochs} epochs")
    print("| model | fp32 % | int8 fake-quant % | int8 ONNX Runtime % | drop (points) | stored weights | "
          "ORT int8 vs fakequant agreement | ORT fp32/int8 latency |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:+.2f} | {r[5]:.2f}x smaller | "
              f"{100 * r[6]:.1f} % | {r[7]:.2f}x |")
    if len(args.seeds) > 1:
        print(f"\nONNX Runtime int8 drop over seeds {args.seeds} (points; one test image = {100 / len(data.test):.2f})")
        print("| setting | mean | min | max |")
        print("|---|---:|---:|---:|")
        for label, values in drops.items():
            print(f"| {label} | {sum(values) / len(values):+.2f} | {min(values):+.2f} | {max(values):+.2f} |")
    if tensor_rows:
        print(f"\nPer-tensor vs per-channel int8 weights, reduce_range: {args.reduce_range[0]}")
        print("| model | fp32 % | per-tensor fake-quant % | per-tensor ORT % | per-channel fake-quant % | "
              "per-channel ORT % |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in tensor_rows:
            print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} |")
    if noise_rows:
        print("\nRelative weight-quantization noise ||W - Q(W)||^2 / ||W||^2 at 8 bits (BN folded), mean per layer")
        print("| model | layer kind | layers | per-tensor | per-channel | per-tensor / per-channel |")
        print("|---|---|---:|---:|---:|---:|")
        for r in noise_rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2e} | {r[4]:.2e} | {r[3] / max(r[4], 1e-30):.1f}x |")
    if qat_rows:
        ends = "4" if args.qat_all_4bit else "8"
        print(f"\n4-bit weights (MSE grid, per channel; first/last layer at {ends} bits), 8-bit activations: "
              f"PTQ then QAT {args.qat_epochs} epochs lr {args.qat_lr}, BN kept and frozen after "
              f"{args.qat_freeze_bn_after:.0%} of the steps")
        print("| model | fp32 % | 4-bit PTQ % | 4-bit QAT % | QAT drop | stored weights |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in qat_rows:
            print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:+.2f} | {r[5]:.2f}x smaller |")
    if bwn_rows:
        print(f"\nBWN (first/last layers fp32), Adam fine-tune {args.bwn_epochs} epochs")
        print("| model | fp32 % | BWN % | drop | stored total |")
        print("|---|---:|---:|---:|---:|")
        for r in bwn_rows:
            print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:+.2f} | {r[4]:.2f}x smaller |")


if __name__ == "__main__":
    main()
