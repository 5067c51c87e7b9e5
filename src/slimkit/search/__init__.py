"""Compress to a budget: per-layer sensitivity across techniques, latency tables, budget search.

>>> from slimkit.search import parse_budget
>>> parse_budget("latency_p99_ms=0.5x"), parse_budget("size_bytes=20000")
(('latency_p99_ms', 0.5, True), ('size_bytes', 20000.0, False))

:func:`search` runs the whole search (:mod:`slimkit.search.run`); the space is in
:mod:`~slimkit.search.space`, the sensitivity table in :mod:`~slimkit.search.sensitivity`,
per-layer latency in :mod:`~slimkit.search.latency`, the greedy and evolutionary searches
in :mod:`~slimkit.search.algorithms` and the Ray Tune trials in :mod:`~slimkit.search.trials`.
"""

from slimkit.search.run import METRICS, SearchConfig, parse_budget, search

__all__ = ["METRICS", "SearchConfig", "parse_budget", "search"]
