"""The sparse path, measured honestly: dense vs torch.sparse CSR vs scipy.sparse for pruned FC layers.

Takes the fully connected layers of LeNet-300-100 / LeNet-5 pruned to the sparsities the
deep-compression recipes reach (or a run directory's model.pt with ``--model-file``) and
times ``y = x W^T`` at batch 1 and 64, one thread, median of ``--runs``. Prints times and
ratios vs dense (> 1 = faster than dense).

    python benchmarks/sparse_fc.py --runs 200
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from slimkit.measure.latency import time_callable

LAYERS = {  # name: (out, in, sparsity) as in the recipes
    "lenet300.fc1": (300, 784, 0.96), "lenet300.fc2": (100, 300, 0.92), "lenet300.fc3": (10, 100, 0.75),
    "lenet5.fc1": (500, 800, 0.96), "lenet5.fc2": (10, 500, 0.8),
}


def timed(fn, runs: int) -> float:
    """Median wall time of ``fn()`` in microseconds (5 warm-up calls)."""
    return time_callable(fn, warmup=5, runs=runs).median_ms * 1e3


def layers_from(path: str) -> dict[str, torch.Tensor]:
    from slimkit.manifest import load_model

    model = load_model(path)
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--model-file", help="a pruned model.pt (slimkit.manifest) instead of random layers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import scipy.sparse as sp

    if args.model_file:
        weights = layers_from(args.model_file)
    else:
        g = torch.Generator().manual_seed(0)
        weights = {}
        for name, (out, inp, s) in LAYERS.items():
            w = torch.randn(out, inp, generator=g)
            w[torch.rand(out, inp, generator=g) < s] = 0
            weights[name] = w
    print(f"{'layer':14s} {'shape':>9s} {'nz%':>6s} {'batch':>5s} {'dense us':>9s} {'torch csr':>10s} "
          f"{'scipy':>9s} {'csr/dense':>9s} {'scipy/dense':>11s}")
    for name, w in weights.items():
        csr = w.to_sparse_csr()
        w_sp = sp.csr_matrix(w.numpy())
        for batch in (1, 64):
            x = torch.randn(batch, w.shape[1])
            xt = x.t().contiguous()
            xn = np.ascontiguousarray(x.numpy().T)
            ref = x @ w.t()
            assert torch.allclose(torch.sparse.mm(csr, xt).t(), ref, atol=1e-4)
            assert np.allclose((w_sp @ xn).T, ref.numpy(), atol=1e-4)
            t_dense = timed(lambda: x @ w.t(), args.runs)  # noqa: B023
            t_csr = timed(lambda: torch.sparse.mm(csr, xt), args.runs)  # noqa: B023
            t_sp = timed(lambda: w_sp @ xn, args.runs)  # noqa: B023
            nz = 100 * float((w != 0).float().mean())
            print(f"{name:14s} {w.shape[0]:>4d}x{w.shape[1]:<4d} {nz:6.1f} {batch:5d} {t_dense:9.1f} {t_csr:10.1f} "
                  f"{t_sp:9.1f} {t_dense / t_csr:8.2f}x {t_dense / t_sp:10.2f}x")


if __name__ == "__main__":
    main()
