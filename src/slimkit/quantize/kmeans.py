"""Exact, fast 1-D k-means: Lloyd's algorithm on sorted data with prefix sums.

In one dimension the clusters of Lloyd's algorithm are contiguous runs of the sorted
data: the assignment step is a binary search of the midpoints between consecutive
centroids (``searchsorted``), and the update step is a difference of prefix sums. After an
``O(n log n)`` sort, each iteration costs ``O(k log n)`` instead of ``O(n k)``, and the
result is the same fixed point that Lloyd's algorithm reaches from the same initial
centroids (a local optimum, as in scikit-learn's ``KMeans``; not the global optimum a
``O(k n^2)`` dynamic program would give, unaffordable for layers of millions of weights).
Sums are taken in float64, so the centroids are exact means up to rounding.

Initialisations (Han, Mao & Dally 2016, section 3.2): ``linear`` spaces the centroids
evenly over ``[min, max]`` (their best), ``density`` puts them at evenly spaced quantiles
of the data (the CDF), ``random`` picks ``k`` distinct data points (seeded).

>>> import numpy as np
>>> result = kmeans_1d(np.array([0.0, 0.1, 0.2, 5.0, 5.2]), 2)
>>> result.centroids.round(3).tolist(), result.labels.tolist()
([0.1, 5.1], [0, 0, 0, 1, 1])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from slimkit.exceptions import ConfigError

Init = Literal["linear", "density", "random"]


@dataclass(frozen=True)
class KMeansResult:
    """``centroids`` [k] ascending, ``labels`` [n] (index into centroids, input order),
    ``inertia`` (sum of squared distances), ``iterations`` run."""

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    iterations: int


def init_centroids(sorted_x: np.ndarray, k: int, init: Init = "linear", seed: int = 0) -> np.ndarray:
    """Initial centroids [k] (ascending) for ascending data ``sorted_x``."""
    if init == "linear":
        return np.linspace(sorted_x[0], sorted_x[-1], k)
    if init == "density":
        return np.quantile(sorted_x, (np.arange(k) + 0.5) / k)
    if init == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(sorted_x, size=k, replace=sorted_x.size < k))
    raise ConfigError(f"k-means init must be one of linear, density, random (got {init!r})")


def kmeans_1d(
    x: np.ndarray, k: int, init: Init = "linear", max_iter: int = 300, seed: int = 0, init_centroids_: np.ndarray
    | None = None
) -> KMeansResult:
    """Cluster the values ``x`` (any shape, flattened) into at most ``k`` clusters.

    Iterates until no assignment changes (or ``max_iter``). Empty clusters keep their
    centroid. Raises ValueError for ``k < 1`` or empty ``x``.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if k < 1:
        raise ConfigError(f"k-means needs k >= 1 (got {k})")
    if x.size == 0:
        raise ConfigError("k-means needs at least one value (got an empty array)")
    order = np.argsort(x, kind="stable")
    xs = x[order]
    s1 = np.concatenate(([0.0], np.cumsum(xs)))
    s2 = np.concatenate(([0.0], np.cumsum(xs * xs)))
    c = np.sort(init_centroids(xs, k, init, seed) if init_centroids_ is None else np.asarray(init_centroids_, float))
    ends = None
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007
        # Segment j holds xs[starts[j]:ends[j]]: values closer to c[j] than to its neighbours.
        new_ends = np.concatenate((np.searchsorted(xs, (c[:-1] + c[1:]) / 2, side="right"), [xs.size]))
        if ends is not None and np.array_equal(new_ends, ends):
            break
        ends = new_ends
        starts = np.concatenate(([0], ends[:-1]))
        counts = ends - starts
        nonempty = counts > 0
        c = c.copy()
        c[nonempty] = (s1[ends] - s1[starts])[nonempty] / counts[nonempty]
        c = np.sort(c)  # means of ordered segments stay ordered; sort guards empty ones
    starts = np.concatenate(([0], ends[:-1]))
    counts = ends - starts
    sums, squares = s1[ends] - s1[starts], s2[ends] - s2[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        inertia = float(np.where(counts > 0, squares - 2 * c * sums + counts * c * c, 0.0).sum())
    labels_sorted = np.repeat(np.arange(k), counts)
    labels = np.empty_like(labels_sorted)
    labels[order] = labels_sorted
    return KMeansResult(c, labels, max(inertia, 0.0), iterations)
