"""Importance of channel units, aggregated over the members of each unit.

A criterion is ``fn(model, graph, ctx) -> {unit id: score}``; low scores are pruned first.
A unit a criterion cannot score (``bn_gamma`` on a unit without BatchNorm) gets NaN and
is skipped with a reason. Registered names: ``l1``, ``l2`` (filter norm, Li et al. 2017,
"Pruning Filters for Efficient ConvNets"), ``bn_gamma`` (|BN scale|, Liu et al. 2017,
"Learning Efficient Convolutional Networks through Network Slimming"), ``sparsity``
(the filter sparsity S of Liu & Lei 2022 alone), ``sparsity_gamma`` (S x |gamma|, Liu & Lei 2022,
"A Structured Pruning Method Integrating Characteristics of MobileNetV3"), ``taylor``
(first-order Taylor, Molchanov et al. 2019) and
``random`` (the baseline that keeps us honest).

Filter sparsity: for filter ``n`` of layer ``l``, ``S_l(n)`` is the fraction of its
coefficients with ``|w| >= M_l``, ``M_l`` the mean coefficient magnitude of layer ``l``.

>>> import torch
>>> from torch import nn
>>> from slimkit.prune.graph import build_graph
>>> net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 1, 1))
>>> with torch.no_grad():
...     _ = net[0].weight.copy_(torch.tensor([1.0, -3.0]).view(2, 1, 1, 1))
>>> g = build_graph(net, torch.zeros(1, 1, 2, 2))
>>> sorted(CRITERIA.get("l1")(net, g, ScoreContext()).values())
[1.0, 3.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.prune.graph import ChannelGraph
from slimkit.prune.graph.core import UnitTable, distinct
from slimkit.registry import Registry


@dataclass
class ScoreContext:
    """What a criterion may use besides the weights: inputs (Taylor) and a seed (random)."""

    example_inputs: torch.Tensor | None = None
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
    seed: int = 0


Criterion = Callable[[nn.Module, ChannelGraph, ScoreContext], dict[int, float]]
#: ``fisher`` (Theis 2018) lives in its own module, registered on first use of the registry
CRITERIA: Registry[Criterion] = Registry("pruning criterion", lazy_modules=("slimkit.prune.fisher",))
#: criteria that score from data: the ``structured`` stage hands them training batches
DATA_CRITERIA: set[str] = {"taylor"}

_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)

#: ATen reduces fewer elements than this in one thread: a row of a batched reduction over
#: dim 1 then has the same float bits as the row reduced alone (above it, with several
#: threads, a lone row is split between threads).
_SERIAL_NUMEL = 32768

#: a statistic of weight rows ``[k, fan_in]``: one scalar for ``one``, one per row for ``each``
Stat = Callable[[torch.Tensor], torch.Tensor]


def _row_table(t: torch.Tensor, one: Stat, each: Stat) -> tuple[np.ndarray, torch.dtype]:
    """``one`` of every single row of ``t`` (rows along dim 0, as float64: exact), and its dtype.

    Computed in one call of ``each`` where that gives the same bits, row by row otherwise.
    """
    rows = t.detach().reshape(t.shape[0], -1)
    if rows.shape[1] < _SERIAL_NUMEL:
        stat = each(rows)
        return stat.detach().to(torch.float64).numpy(), stat.dtype
    stats = [one(rows[i:i + 1]) for i in range(rows.shape[0])]
    return np.array([float(v) for v in stats], dtype=np.float64), stats[0].dtype


def _rows_value(tables: dict[str, tuple[np.ndarray, torch.dtype]], key: str, t: torch.Tensor, idx: np.ndarray,
                one: Stat, each: Stat) -> tuple[float, torch.dtype]:
    """``one`` of the rows ``idx`` of ``t``, and its dtype.

    A single row is looked up in the row table of ``t``, built on first use under ``key``.
    """
    if len(idx) != 1:
        stat = one(t.detach()[torch.tensor(idx)].reshape(len(idx), -1))
        return float(stat), stat.dtype
    if key not in tables:
        tables[key] = _row_table(t, one, each)
    table, dtype = tables[key]
    return float(table[idx[0]]), dtype


@dataclass
class Values:
    """Per unit of a :class:`UnitTable` (in its order), the values to average and their dtypes.

    Unit ``i``'s values are ``values[offsets[i]:offsets[i + 1]]`` (float64 holding the exact
    values); they are averaged in ``dtypes[codes[i]]``, the promotion of the dtypes of its values.
    """

    table: UnitTable
    values: np.ndarray
    offsets: np.ndarray
    codes: np.ndarray
    dtypes: list[torch.dtype]


def _promoted(n_units: int, run_units: np.ndarray, run_codes: np.ndarray, dtypes: list[torch.dtype]) -> np.ndarray:
    """Index into ``dtypes`` of every unit's promoted dtype (runs of unit ``run_units[k]`` have ``run_codes[k]``)."""
    codes = np.zeros(n_units, dtype=np.int64)
    if len(distinct(run_codes)) <= 1:
        codes[:] = run_codes[0] if len(run_codes) else 0
        return codes
    per_unit: dict[int, torch.dtype] = {}
    for u, c in zip(run_units.tolist(), run_codes.tolist(), strict=True):
        per_unit[u] = torch.promote_types(per_unit[u], dtypes[c]) if u in per_unit else dtypes[c]
    for u, dtype in per_unit.items():
        if dtype not in dtypes:
            dtypes.append(dtype)
        codes[u] = dtypes.index(dtype)
    return codes


def _values(table: UnitTable, runs: np.ndarray, values: np.ndarray, counts: np.ndarray, run_codes: np.ndarray,
            dtypes: list[torch.dtype]) -> Values:
    """:class:`Values` from the runs that carry values (ascending run indices): run ``runs[k]`` brings
    ``counts[k]`` consecutive entries of ``values``, of dtype ``dtypes[run_codes[k]]``."""
    units = table.run_unit[runs]
    per_unit = np.bincount(units, weights=counts, minlength=len(table)).astype(np.int64)
    return Values(table, values, np.r_[0, np.cumsum(per_unit)], _promoted(len(table), units, run_codes, dtypes),
                  dtypes)


def _code(dtypes: list[torch.dtype], dtype: torch.dtype) -> int:
    if dtype not in dtypes:
        dtypes.append(dtype)
    return dtypes.index(dtype)


def _means(v: Values) -> dict[int, float]:
    """Mean of every unit's values as ``torch.stack(values).mean()`` computes it (NaN when none).

    Units with as many values of the same dtype are averaged as the rows of one tensor.
    """
    result = dict.fromkeys(v.table, float("nan"))
    counts = np.diff(v.offsets)
    ids = v.table.ids
    keys = counts * (len(v.dtypes) + 1) + v.codes
    for key in distinct(keys[counts > 0]).tolist():
        sel = np.flatnonzero(keys == key)
        n, dtype = int(counts[sel[0]]), v.dtypes[int(v.codes[sel[0]])]
        rows = torch.from_numpy(v.values[v.offsets[sel][:, None] + np.arange(n)]).to(dtype)
        means = rows.mean(1) if n < _SERIAL_NUMEL else torch.stack([row.mean() for row in rows])
        result.update(zip(ids[sel].tolist(), means.tolist(), strict=True))
    return result


def _producer_weight(m: nn.Module, role: str) -> torch.Tensor | None:
    """The weight whose rows are a producer's output channels: ``weight`` of an ``out`` axis (a conv,
    a linear, a layer with a registered channel rule) or the parameter of a ``param:<name>:0`` axis."""
    pname = "weight" if role == "out" else role.split(":")[1] if role.startswith("param:") and role.endswith(":0") \
        else None
    w = getattr(m, pname, None) if pname else None
    return w if isinstance(w, torch.Tensor) and w.dim() >= 2 else None


def _runs_where(table: UnitTable, ok: Callable[[int, int], bool]) -> np.ndarray:
    """Indices of the runs whose (producer set, axis) pair passes ``ok(producer code, axis index)``."""
    codes, _ = table.producer_codes()
    pairs = codes[table.run_unit] * max(len(table.axes), 1) + table.run_axis
    uniq, inverse = np.unique(pairs, return_inverse=True)
    n = max(len(table.axes), 1)
    passed = np.array([ok(p // n, p % n) for p in uniq.tolist()], dtype=bool)
    return np.flatnonzero(passed[inverse.reshape(-1)]) if len(uniq) else np.zeros(0, dtype=np.int64)


def _producer_values(modules: dict[str, nn.Module], graph: ChannelGraph,
                     stat_for: Callable[[nn.Module], tuple[Stat, Stat]]) -> Values:
    """Per unit, the statistic ``stat_for(layer)`` of its rows in every conv/linear producer.

    A unit's single row in a layer is read from the layer's row table (one batched call for all
    its rows); several rows of one unit are reduced together.
    """
    table = UnitTable.from_units(graph.units)
    _, producer_sets = table.producer_codes()
    weights = [_producer_weight(modules[name], role) for name, role in table.axes]
    runs = _runs_where(table, lambda c, a: weights[a] is not None and table.axes[a][0] in producer_sets[c])
    starts, lengths, axis_of = table.run_start[runs], table.run_stop[runs] - table.run_start[runs], table.run_axis[runs]
    dtypes: list[torch.dtype] = []
    values, codes = np.zeros(len(runs)), np.zeros(len(runs), dtype=np.int64)
    for a in distinct(axis_of).tolist():
        w = weights[a]
        one, each = stat_for(modules[table.axes[a][0]])
        here = np.flatnonzero(axis_of == a)
        single = here[lengths[here] == 1]
        if len(single):
            stats, dtype = _row_table(w, one, each)
            values[single] = stats[table.positions[starts[single]]]
            codes[single] = _code(dtypes, dtype)
        for k in here[lengths[here] != 1].tolist():
            idx = table.positions[starts[k]:starts[k] + lengths[k]]
            stat = one(w.detach()[torch.tensor(idx)].reshape(len(idx), -1))
            values[k], codes[k] = float(stat), _code(dtypes, stat.dtype)
    return _values(table, runs, values, np.ones(len(runs)), codes, dtypes)


def _bn_gammas(modules: dict[str, nn.Module], graph: ChannelGraph) -> Values:
    """Per unit, |gamma| of its channels in every affine BatchNorm it passes through."""
    table = UnitTable.from_units(graph.units)
    gammas: list[np.ndarray | None] = []
    dtypes: list[torch.dtype] = []
    axis_codes = []
    for name, role in table.axes:
        m = modules[name]
        ok = role == "out" and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
        gammas.append(np.asarray(m.weight.detach().abs().tolist(), dtype=np.float64) if ok else None)
        axis_codes.append(_code(dtypes, m.weight.dtype) if ok else -1)
    runs = _runs_where(table, lambda c, a: gammas[a] is not None)
    starts, stops, axis_of = table.run_start[runs], table.run_stop[runs], table.run_axis[runs]
    lengths = stops - starts
    offsets = np.r_[0, np.cumsum(lengths)]
    entry = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, lengths)  # index into table.positions
    entry_axis = np.repeat(axis_of, lengths)
    values = np.zeros(len(entry))
    for a in distinct(axis_of).tolist():
        here = entry_axis == a
        values[here] = gammas[a][table.positions[entry[here]]]
    return _values(table, runs, values, lengths, np.array(axis_codes, dtype=np.int64)[axis_of], dtypes)


class _Scratch:
    """One reusable buffer per dtype for the element-wise step of a row statistic: the same values as a
    fresh tensor (so the same sums, bit for bit), without a new allocation, and its page faults, per layer
    (half the time of ``rows.abs().sum(1)`` over MobileNetV3's weights)."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def like(self, rows: torch.Tensor) -> torch.Tensor | None:
        """A buffer of ``rows``' shape and dtype (None for rows that are not contiguous: their own layout)."""
        if not rows.is_contiguous():
            return None
        flat = self.buffers.get(rows.dtype)
        if flat is None or flat.numel() < rows.numel():
            flat = self.buffers[rows.dtype] = torch.empty(rows.numel(), dtype=rows.dtype)
        return flat[: rows.numel()].view(rows.shape)


def _norm(p: int) -> Criterion:
    def score(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
        scratch = _Scratch()
        if p == 1:
            stats = (lambda rows: rows.abs().sum(), lambda rows: torch.abs(rows, out=scratch.like(rows)).sum(1))
        else:
            stats = (lambda rows: rows.pow(2).sum().sqrt(),
                     lambda rows: torch.pow(rows, 2, out=scratch.like(rows)).sum(1).sqrt())
        return _means(_producer_values(graph.modules_of(model), graph, lambda m: stats))

    return score


CRITERIA.register("l1")(_norm(1))
CRITERIA.register("l2")(_norm(2))


@CRITERIA.register("bn_gamma")
def bn_gamma(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """Mean |gamma| of the BatchNorm layers the unit passes through (NaN when none)."""
    return _means(_bn_gammas(graph.modules_of(model), graph))


def filter_sparsity(model: nn.Module, graph: ChannelGraph) -> dict[int, float]:
    """``S``: mean over the unit's producers of the fraction of coefficients >= the layer mean."""
    stats: dict[int, tuple[Stat, Stat]] = {}

    def stat_for(m: nn.Module) -> tuple[Stat, Stat]:
        if id(m) not in stats:
            mean = m.weight.detach().abs().mean()
            stats[id(m)] = (lambda rows: (rows.abs() >= mean).float().mean(dim=1).mean(),
                            lambda rows: (rows.abs() >= mean).float().mean(dim=1))
        return stats[id(m)]

    return _means(_producer_values(graph.modules_of(model), graph, stat_for))


@CRITERIA.register("sparsity")
def sparsity(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """Filter sparsity ``S`` alone (the ablation of Liu & Lei 2022)."""
    return filter_sparsity(model, graph)


@CRITERIA.register("sparsity_gamma")
def sparsity_gamma(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """``S x |gamma|``: the importance of Liu & Lei 2022's MobileNetV3 pruning method."""
    s = filter_sparsity(model, graph)
    g = bn_gamma(model, graph, ctx)
    return {uid: s[uid] * g[uid] for uid in graph.units}


@CRITERIA.register("random")
def random(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """Uniform random scores from ``ctx.seed`` (reproducible)."""
    rng = np.random.default_rng(ctx.seed)
    return {uid: float(v) for uid, v in zip(graph.units, rng.random(len(graph.units)), strict=True)}


def _abs_sum(rows: torch.Tensor) -> torch.Tensor:
    return rows.sum().abs()


def _abs_row_sums(rows: torch.Tensor) -> torch.Tensor:
    return rows.sum(1).abs()


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


def _accumulate(terms: list[tuple[float, torch.dtype]]) -> float:
    """``torch.zeros(())`` plus every ``(value, dtype)`` term in order, with torch's dtype promotion."""
    start = torch.get_default_dtype()
    if start in _NUMPY_FLOATS and all(d in _NUMPY_FLOATS for _, d in terms):
        total = _NUMPY_FLOATS[start](0)
        for value, dtype in terms:
            total = total + _NUMPY_FLOATS[dtype](value)
        return float(total)
    total = torch.zeros(())
    for value, dtype in terms:
        total = total + torch.tensor(value, dtype=dtype)
    return float(total)


def _taylor_scores(modules: dict[str, nn.Module], graph: ChannelGraph) -> dict[int, float]:
    """``|sum of w * dL/dw|`` of every producer and BN parameter row of each unit, summed per unit."""
    products: dict[str, torch.Tensor] = {}
    tables: dict[str, tuple[list[float], torch.dtype]] = {}
    result = {}
    for uid, unit in graph.units.items():
        terms = []
        for (name, role), idx in unit.members.items():
            m = modules[name]
            if role != "out" or not isinstance(m, _PRODUCERS + (nn.modules.batchnorm._BatchNorm,)):
                continue
            for pname in ("weight", "bias"):
                p = getattr(m, pname, None)
                if p is not None and p.grad is not None:
                    key = f"{name}.{pname}"
                    if key not in products:
                        products[key] = p.detach() * p.grad
                    terms.append(_rows_value(tables, key, products[key], idx, _abs_sum, _abs_row_sums))
        result[uid] = _accumulate(terms)
    return result


@CRITERIA.register("taylor")
def taylor(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """First-order Taylor: ``|sum of w * dL/dw|`` over the unit's producer and BN parameters.

    Uses ``ctx.batches`` of (inputs, targets) when given, else ``ctx.example_inputs`` with
    the model's own predictions as targets. Gradients of the model are left untouched.
    """
    batches: list[Any] = list(ctx.batches) if ctx.batches is not None else []
    if not batches:
        if ctx.example_inputs is None:
            raise ConfigError("criterion taylor needs example inputs or batches of (inputs, targets)")
        with torch.no_grad():
            model.eval()
            targets = model(ctx.example_inputs).argmax(1)
        batches = [(ctx.example_inputs, targets)]
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [None if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
        result = _taylor_scores(dict(model.named_modules()), graph)
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        model.train(was_training)
    return result
