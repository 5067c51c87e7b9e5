"""1-D k-means on a large layer: slimkit's sorted Lloyd vs scikit-learn's KMeans (same k, same init).

Prints wall time of each, the time ratio, and the final inertia ratio (ours / sklearn).
Default: 1M weights (fast); the issue's figure uses ``--weights 10000000``.

    python benchmarks/kmeans_vs_sklearn.py --weights 10000000 --bits 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, default=5, help="k = 2**bits")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    from slimkit.quantize.kmeans import kmeans_1d

    k = 2**args.bits
    rng = np.random.default_rng(0)
    # A pruned, trained-looking layer: Laplace-distributed weights, the smallest 90% of a 10x larger layer removed.
    x = rng.laplace(scale=0.02, size=args.weights)
    start = time.perf_counter()
    ours = kmeans_1d(x, k, init="linear", max_iter=args.max_iter)
    t_ours = time.perf_counter() - start

    from sklearn.cluster import KMeans

    init = np.linspace(x.min(), x.max(), k).reshape(-1, 1)
    with threadpool_limits(args.threads):
        start = time.perf_counter()
        theirs = KMeans(k, init=init, n_init=1, max_iter=args.max_iter, algorithm="lloyd").fit(x.reshape(-1, 1))
        t_sk = time.perf_counter() - start
    print(f"weights={args.weights:,} k={k} max_iter={args.max_iter} threads={args.threads}")
    print(f"slimkit kmeans_1d: {t_ours:8.3f} s  inertia {ours.inertia:.6e}  iterations {ours.iterations}")
    print(f"sklearn KMeans   : {t_sk:8.3f} s  inertia {theirs.inertia_:.6e}  iterations {theirs.n_iter_}")
    print(f"time ratio sklearn/slimkit: {t_sk / t_ours:.1f}x   inertia ratio slimkit/sklearn: "
          f"{ours.inertia / theirs.inertia_:.6f}")


if __name__ == "__main__":
    main()
