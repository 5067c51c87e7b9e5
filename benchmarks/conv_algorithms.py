"""slimkit's convolution algorithms vs torch F.conv2d (oneDNN) on real model shapes, in one run.

Shapes are captured from the models themselves (forward pre-hooks): torchvision ResNet-18,
VGG-16 and MobileNetV2 at 224 px, and the zoo's CIFAR (resnet20-cifar, 32 px) and digits
(lenet5, 28 px) models. By default a subset of distinct layers (``DEFAULT_LAYERS``) keeps
the run to a few minutes; ``--all-shapes`` runs every distinct one. For each shape, batch
and thread count every algorithm that supports the shape is timed round-robin with torch's
(median of at least ``--repeats`` rounds, more for fast shapes), and the table gives:
milliseconds, the fastest slimkit algorithm,
torch / fastest (> 1: slimkit faster), effective GFLOP/s (2 x direct MACs / time) as a
percentage of this CPU's measured peak (a 2048^3 fp32 GEMM at the same thread count), and
the multiplications each algorithm performs. The Winograd F(4x4, 3x3) summary sets its 4x
fewer element-wise multiplications against the time it saves over im2col (the same GEMM
without the transform) and over torch. ``--plan`` also runs ``slimkit.kernels.plan`` on
torchvision resnet18 and vgg11 at 224 px and times eager against the planned model.

    .venv/bin/python benchmarks/conv_algorithms.py                      # default subset, batch 1 and 8, 1 and 2 threads
    .venv/bin/python benchmarks/conv_algorithms.py --batch 1 --threads 1 --repeats 3
    .venv/bin/python benchmarks/conv_algorithms.py --plan-only          # plan on resnet18 / vgg11 at 224 px
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.kernels import ALGORITHMS, apply_plan, conv2d, plan
from slimkit.kernels.case import ConvCase
from slimkit.kernels.conv import AUTO_CANDIDATES, multiplications
from slimkit.kernels.timing import interleaved_ms

MODELS = {  # name: (builder, input size)
    "resnet18": (lambda: _tv("resnet18"), 224),
    "vgg16": (lambda: _tv("vgg16"), 224),
    "mobilenet_v2": (lambda: _tv("mobilenet_v2"), 224),
    "resnet20-cifar": (lambda: _zoo("resnet20-cifar", 3), 32),
    "lenet5": (lambda: _zoo("lenet5", 1), 28),
}
DEFAULT_LAYERS = {
    "resnet18": ("conv1", "layer1.0.conv1", "layer3.0.conv1", "layer4.1.conv2"),
    "vgg16": ("features.17", "features.24"),
    "mobilenet_v2": ("features.0.0", "features.2.conv.0.0", "features.2.conv.1.0"),
    "resnet20-cifar": ("conv1", "layer1.0.conv1", "layer3.0.conv2"),
    "lenet5": ("conv1", "conv2"),
}
ALGOS = ("direct", *[a for a in AUTO_CANDIDATES if a != "torch"])
# the numba reference loop is only timed on small shapes
DIRECT_MAX_MACS = 30_000_000
MIN_SECONDS = 1.0  # per shape: small shapes get more rounds (a median a time slice cannot move)


def _tv(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)()


def _zoo(name: str, channels: int) -> nn.Module:
    from slimkit.models import create_model

    return create_model(name, num_classes=10, in_channels=channels)


def conv_shapes(model_name: str, all_shapes: bool) -> list[tuple[str, nn.Conv2d, tuple[int, ...]]]:
    """(layer, module, input shape at batch 1) of the model's distinct Conv2d calls."""
    build, size = MODELS[model_name]
    model = build().eval()
    found: dict[str, tuple[nn.Conv2d, tuple[int, ...]]] = {}

    def record(name):
        def hook(mod, args):
            found.setdefault(name, (mod, tuple(args[0].shape)))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 1 if model_name == "lenet5" else 3, size, size))
    for h in hooks:
        h.remove()
    wanted = found if all_shapes else {n: found[n] for n in DEFAULT_LAYERS[model_name]}
    seen, out = set(), []
    for name, (m, shape) in wanted.items():
        key = (shape, m.out_channels, m.kernel_size, m.stride, m.padding, m.groups)
        if key not in seen:
            seen.add(key)
            out.append((name, m, shape))
    return out


def peak_gflops(threads: int) -> float:
    """fp32 GFLOP/s of a 2048^3 GEMM (torch.mm, MKL) at ``threads``: the practical peak of this CPU."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ms = interleaved_ms({"mm": lambda: torch.mm(a, b)}, repeats=3, warmup=1)["mm"]
    return 2 * 2048**3 / (ms * 1e-3) / 1e9


def run_shape(model: str, layer: str, conv: nn.Conv2d, shape, batch: int, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    x = torch.randn(batch, *shape[1:])
    w, bias = conv.weight.detach().clone(), None
    kh, kw = conv.kernel_size
    case = ConvCase(batch, shape[1], shape[2], shape[3], conv.out_channels, kh, kw, tuple(conv.stride),
                    tuple(conv.padding))
    row = {"model": model, "layer": layer, "batch": batch, "threads": threads, "groups": conv.groups,
           "shape": f"{shape[1]}x{shape[2]}x{shape[3]} -> {conv.out_channels}, {kh}x{kw} s{conv.stride[0]} "
                    f"p{conv.padding[0]}" + (f" g{conv.groups}" if conv.groups > 1 else ""),
           "macs": case.macs // conv.groups, "ms": {}, "mults": {}, "skipped": {}}
    runs = {"torch": lambda: F.conv2d(x, w, bias, conv.stride, conv.padding, groups=conv.groups)}
    if conv.groups == 1:
        for name in ALGOS:
            reason = ALGORITHMS.get(name).unsupported(case)
            if name == "direct" and case.macs > DIRECT_MAX_MACS:
                reason = f"{case.macs / 1e6:.0f} M MACs: the reference loop is timed below {DIRECT_MAX_MACS // 10**6} M"
            if reason:
                row["skipped"][name] = reason
                continue
            # the first call makes the weight transform once, as deployed; its error against F.conv2d is recorded
            ref = F.conv2d(x, w, bias, conv.stride, conv.padding)
            out = conv2d(x, w, bias, conv.stride, conv.padding, algorithm=name)
            row.setdefault("rel_error", {})[name] = float((out - ref).abs().max() / ref.abs().max())
            runs[name] = lambda name=name: conv2d(x, w, bias, conv.stride, conv.padding, algorithm=name)
            row["mults"][name] = sum(multiplications(case, name).values())
    else:
        row["skipped"] = {name: f"groups={conv.groups} (grouped convolution: torch only)" for name in ALGOS}
    with torch.no_grad():
        row["ms"] = interleaved_ms(runs, repeats=repeats, warmup=1, min_seconds=MIN_SECONDS)
    if conv.groups == 1 and (kh, kw) == (3, 3) and tuple(conv.stride) == (1, 1):
        row["f4"] = {"elementwise_saving": case.macs / multiplications(case, "winograd_f4")["elementwise"],
                     "total_mult_saving": case.macs / row["mults"]["winograd_f4"]}
    return row


def show_header() -> None:
    print("| model | layer | input -> out, kernel | batch | threads | torch ms | "
          + " | ".join(ALGOS) + " | fastest slimkit | torch / fastest | torch % peak | fastest % peak |")
    print("|---|---|---|---:|---:|---:|" + "---:|" * len(ALGOS) + "---|---:|---:|---:|", flush=True)


def show(r: dict, peaks: dict[int, float]) -> None:
    ms = r["ms"]
    mine = {k: v for k, v in ms.items() if k != "torch"}
    best = min(mine, key=mine.get) if mine else None
    flops = 2 * r["macs"] / 1e9
    cells = [f"{ms[a]:.2f}" if a in ms else "-" for a in ALGOS]
    pk = peaks[r["threads"]]
    tail = (f"{best} | {ms['torch'] / ms[best]:.2f} | {100 * flops / (ms['torch'] * 1e-3) / pk:.0f} % | "
            f"{100 * flops / (ms[best] * 1e-3) / pk:.0f} %") if best else "- | - | " \
        f"{100 * flops / (ms['torch'] * 1e-3) / pk:.0f} % | -"
    print(f"| {r['model']} | {r['layer']} | {r['shape']} | {r['batch']} | {r['threads']} | {ms['torch']:.2f} | "
          + " | ".join(cells) + f" | {tail} |", flush=True)


def show_errors(rows: list[dict]) -> None:
    worst: dict[str, float] = {}
    for r in rows:
        for name, err in r.get("rel_error", {}).items():
            worst[name] = max(worst.get(name, 0.0), err)
    print("\nmax |slimkit - F.conv2d| / max |F.conv2d| over the shapes above (fp32): "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def show_f4(rows: list[dict]) -> None:
    print("\nWinograd F(4x4, 3x3): multiplication saving vs time saving (3x3 stride-1 shapes)")
    print("| model | layer | batch | threads | element-wise mults saved | all mults saved (transforms included) | "
          "time saved vs im2col | time saved vs torch | F(2x2) time saved vs im2col |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "f4" not in r:
            continue
        ms = r["ms"]
        print(f"| {r['model']} | {r['layer']} | {r['batch']} | {r['threads']} | {r['f4']['elementwise_saving']:.2f}x "
              f"| {r['f4']['total_mult_saving']:.2f}x | {ms['im2col'] / ms['winograd_f4']:.2f}x | "
              f"{ms['torch'] / ms['winograd_f4']:.2f}x | {ms['im2col'] / ms['winograd_f2']:.2f}x |")


def run_plan(threads: int, repeats: int) -> list[dict]:
    print(f"\nslimkit.kernels.plan at 224 px, batch 1, {threads} thread(s): end-to-end eager vs planned")
    print("| model | eager ms | planned ms | eager / planned | layers changed | choices |")
    print("|---|---:|---:|---:|---:|---|")
    out = []
    for name in ("resnet18", "vgg11"):
        torch.set_num_threads(threads)
        model = _tv(name).eval()
        x = torch.randn(1, 3, 224, 224)
        p = plan(model, x, candidates=AUTO_CANDIDATES, repeats=repeats, threads=threads)
        planned = copy.deepcopy(model)
        apply_plan(planned, p)
        with torch.no_grad():
            ref, got = model(x), planned(x)
            err = float((got - ref).abs().max() / ref.abs().max())
            t = interleaved_ms({"eager": lambda m=model, x=x: m(x), "planned": lambda m=planned, x=x: m(x)},
                               repeats=max(repeats, 5))
        counts: dict[str, int] = {}
        for c in p.choices.values():
            counts[c] = counts.get(c, 0) + 1
        changed = sum(c != "torch" for c in p.choices.values())
        print(f"| {name} | {t['eager']:.1f} | {t['planned']:.1f} | {t['eager'] / t['planned']:.2f} | {changed} of "
              f"{len(p.choices)} | {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))} (max rel. error "
              f"{err:.1e}) |")
        out.append({"model": name, **t, "plan": p.to_dict(), "max_rel_error": err})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per shape (median)")
    parser.add_argument("--all-shapes", action="store_true", help="every distinct conv shape, not the default subset")
    parser.add_argument("--plan", action="store_true", help="also plan resnet18 / vgg11 at 224 px")
    parser.add_argument("--plan-only", action="store_true", help="only the plan section")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args()
    result: dict = {}
    if not args.plan_only:
        peaks = {t: peak_gflops(t) for t in args.threads}
        print("measured peak (2048^3 fp32 GEMM): "
              + ", ".join(f"{t} thread(s) {g:.1f} GFLOP/s" for t, g in peaks.items()))
        rows = []
        show_header()
        for model in args.models:
            for layer, conv, shape in conv_shapes(model, args.all_shapes):
                for batch in args.batch:
                    for threads in args.threads:
                        rows.append(run_shape(model, layer, conv, shape, batch, threads, args.repeats))
                        show(rows[-1], peaks)
        show_errors(rows)
        show_f4(rows)
        result.update(peaks=peaks, rows=rows)
    if args.plan or args.plan_only:
        result["plan"] = run_plan(args.threads[0], args.repeats)
    if args.json:
        from slimkit.atomic import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(result, indent=1).encode())


if __name__ == "__main__":
    main()
