"""Compressed-domain inference vs the decoded dense model: the deep-compression LeNets run from their .slim records.

For each ``.slim`` file (the ``model.slim`` of a ``deep-compression`` or
``deep-compression-lenet300`` run; without ``--slim`` the script builds both models the
same way in a few seconds: 1 epoch of training on digits, the recipes' per-layer pruning
and k-means bits, no fine-tuning) it loads the model twice, decoded
(``slimkit.encode.load``: dense fp32, as PyTorch eager runs it) and compressed
(``runtime="compressed"``: pruned, shared layers compute from the b-bit indices and the
codebook), and reports in one run: test accuracy of both on digits, the file size, the
bytes of every tensor each one keeps (``slimkit.encode.runtime.resident_bytes``; for the
decoded model also just its weights and biases), and batch-1 latency of both, timed in
turn (round-robin, median), at each ``--threads`` (``torch.set_num_threads``: the dense
model's convolutions and GEMMs use them; the compressed model runs each fused chain as one
serial numba call, so it uses one thread whatever the setting). A third column times the
compressed model run layer by layer (``load_compressed(path, fuse=False)``), to show what
the fused chain saves.

    .venv/bin/python benchmarks/compressed_inference.py
    .venv/bin/python benchmarks/compressed_inference.py --slim /tmp/dc/model.slim /tmp/dc300/model.slim --threads 1 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from slimkit.data import load_data
from slimkit.encode import load, save
from slimkit.encode.runtime import load_compressed, resident_bytes
from slimkit.kernels.timing import interleaved_ms
from slimkit.train import evaluate

RECIPES = {  # as in src/slimkit/recipes/deep-compression*.yaml
    "lenet5": ({"conv1": 0.34, "conv2": 0.9, "fc1": 0.96, "fc2": 0.8}, {"conv_bits": 8, "linear_bits": 5}),
    "lenet-300-100": ({"fc1": 0.94, "fc2": 0.9, "fc3": 0.7}, {"linear_bits": 6}),
}


def build(name: str, data, out: Path) -> Path:
    """A quick deep-compression model: train 1 epoch, prune to the recipe's sparsities, share weights, save."""
    from slimkit.models import create_model
    from slimkit.prune.magnitude import magnitude_prune_
    from slimkit.quantize.sharing import share_weights_
    from slimkit.train import fit

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1)
    fit(model, data.train, {"epochs": 1, "lr": 0.02, "batch_size": 32})
    sparsity, bits = RECIPES[name]
    magnitude_prune_(model, torch.zeros(1, 1, 28, 28), {"per_layer": sparsity})
    share_weights_(model, torch.zeros(1, 1, 28, 28), bits)
    path = out / f"{name}.slim"
    save(model, path)
    return path


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters())


def measure(path: Path, data, threads: list[int], repeats: int) -> list[dict]:
    decoded, compressed = load(path), load(path, runtime="compressed")
    layered = load_compressed(path, fuse=False)
    x = data.test[0][0].unsqueeze(0)
    acc_dense, acc_comp = evaluate(decoded, data.test), evaluate(compressed, data.test)
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        with torch.no_grad():
            ms = interleaved_ms({"dense": lambda: decoded(x), "compressed": lambda: compressed(x),
                                 "layered": lambda: layered(x)}, repeats=repeats, warmup=20)
        rows.append({"file": str(path), "threads": t, "file_bytes": path.stat().st_size,
                     "accuracy_decoded": acc_dense, "accuracy_compressed": acc_comp,
                     "resident_compressed": resident_bytes(compressed), "resident_decoded": resident_bytes(decoded),
                     "weights_decoded": weight_bytes(decoded), "dense_ms": ms["dense"],
                     "compressed_ms": ms["compressed"], "layered_ms": ms["layered"],
                     "layers": compressed.compressed_report})
    return rows


def _label(file: str) -> str:
    path = Path(file)
    return f"{path.parent.name}/{path.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slim", nargs="*", default=[], help=".slim files (default: build both LeNets quickly)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=300, help="timed rounds (median)")
    args = parser.parse_args()
    data = load_data("digits")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(p) for p in args.slim] or [build(name, data, Path(tmp)) for name in RECIPES]
        rows = [r for p in paths for r in measure(p, data, args.threads, args.repeats)]
    print("| file | threads | accuracy decoded / compressed | .slim bytes | resident compressed (x file) | "
          "decoded: all tensors / weights+biases | dense fp32 eager ms | compressed ms | dense / compressed | "
          "compressed layer by layer ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        kept = r["resident_compressed"]
        print(f"| {_label(r['file'])} | {r['threads']} | {r['accuracy_decoded']:.2f} / "
              f"{r['accuracy_compressed']:.2f} | {r['file_bytes']:,} | {kept:,} ({kept / r['file_bytes']:.2f}x)"
              f" | {r['resident_decoded']:,} / {r['weights_decoded']:,} | {r['dense_ms']:.3f} | "
              f"{r['compressed_ms']:.3f} | {r['dense_ms'] / r['compressed_ms']:.2f}x | {r['layered_ms']:.3f} |")
    for r in rows[:: len(args.threads)]:
        print(f"{_label(r['file'])}: " + "; ".join(f"{k}: {v}" for k, v in r["layers"].items()))


if __name__ == "__main__":
    main()
