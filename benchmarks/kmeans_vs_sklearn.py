"""1-D k-means on a large layer: slimkit's sorted Lloyd vs scikit-learn's KMeans (same k, same init).

Prints wall and CPU time of each, the time ratios, and the final inertia ratio (ours / sklearn).
Both sides run one k-means from the same linear init (``n_init=1``), with the same
``max_iter``, on one thread. Default: 1M weights (fast); the issue's figure uses
``--weights 10000000`` (sklearn's side takes minutes there).

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
    start, cpu = time.perf_counter(), time.process_time()
    ours = kmeans_1d(x, k, init="linear", max_iter=args.max_iter)
    t_ours, c_ours = time.perf_counter() - start, time.process_time() - cpu
    print(f"weights={args.weights:,} k={k} max_iter={args.max_iter} threads={args.threads}")
    print(f"slimkit kmeans_1d: {t_ours:8.3f} s (cpu {c_ours:.3f} s)  inertia {ours.inertia:.6e}  "
          f"iterations {ours.iterations}", flush=True)

    from sklearn.cluster import KMeans

    init = np.linspace(x.min(), x.max(), k).reshape(-1, 1)
    with threadpool_limits(args.threads):
        start, cpu = time.perf_counter(), time.process_time()
        theirs = KMeans(k, init=init, n_init=1, max_iter=args.max_iter, algorithm="lloyd").fit(x.reshape(-1, 1))
        t_sk, c_sk = time.perf_counter() - start, time.process_time() - cpu
    print(f"sklearn KMeans   : {t_sk:8.3f} s (cpu {c_sk:.3f} s)  inertia {theirs.inertia_:.6e}  "
          f"iterations {theirs.n_iter_}")
    print(f"time ratio sklearn/slimkit: wall {t_sk / t_ours:.1f}x, cpu {c_sk / c_ours:.1f}x   "
          f"inertia ratio slimkit/sklearn: {ours.inertia / theirs.inertia_:.6f}")


if __name__ == "__main__":
    main()
