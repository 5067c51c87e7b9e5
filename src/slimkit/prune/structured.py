"""``structured_``: prune whole channels and physically remove them.

The verb builds the channel dependency graph (:mod:`slimkit.prune.graph`), scores every
prunable unit with a criterion (:mod:`slimkit.prune.criteria`), selects the units to
remove (per layer or with one global threshold, with a cap per layer and optional rounding
of the channel counts), and cuts them out (:mod:`slimkit.prune.surgery`). The result is a
plain, smaller, dense model with the same inputs and outputs.

``ratio`` is a fraction of *channel units*: one unit is one coupled channel (a residual
stream channel counts once, however many layers share it). With ``target: macs`` or
``target: params`` the ratio is the reduction of MACs or parameters to reach instead
(found by bisection over the channel ratio).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
>>> report = structured_(net, torch.randn(1, 3, 16, 16), {"ratio": 0.5, "criterion": "l1"})
>>> net[0].out_channels, net[3].in_channels, net[3].out_channels, net[7].in_features
(8, 8, 8, 8)
>>> net(torch.randn(2, 3, 16, 16)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from slimkit import tracing
from slimkit.config import Config
from slimkit.exceptions import ConfigError, UnsupportedModelError
from slimkit.measure.macs import count_macs
from slimkit.measure.size import count_params, count_params_nonzeros
from slimkit.measure.storage import stored_bytes
from slimkit.prune.common import Scope, trace_input
from slimkit.prune.criteria import CRITERIA, ScoreContext
from slimkit.prune.graph import ChannelGraph, Group, build_graph, gc_paused
from slimkit.prune.graph.macs import traced_macs
from slimkit.prune.graph.rules import node_what
from slimkit.prune.surgery import prune_units_
from slimkit.reports import ModelSize, Report
from slimkit.selection import classifier_name, matches


class StructuredConfig(Config):
    """Settings of :func:`structured_` (and of the recipe stage ``structured``)."""

    ratio: float = Field(0.3, ge=0, lt=1, description="fraction of channel units (or of MACs/params) to remove")
    target: Literal["channels", "macs", "params"] = "channels"
    criterion: str = "l1"
    scope: Scope = "local"
    layers: tuple[str, ...] = Field(("*",), description="a group is pruned when one of its producers matches")
    ignore: tuple[str, ...] | None = Field(None, description="default: the classifier")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, description="no layer loses more than this fraction")
    round_to: int = Field(1, ge=1, description="kept channel counts rounded up to a multiple of this")
    normalize: Literal["none", "mean", "max"] = Field("none", description="per-group score scaling (global)")
    on_unsupported: Literal["error", "skip"] = "error"
    norm_channels: Literal["prune", "keep"] = Field(
        "prune", description="channels under LayerNorm/GroupNorm statistics: prune them, or keep them (exact)")
    seed: int = 0

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, value: str) -> str:
        CRITERIA.get(value)  # UnknownNameError (a ValueError) with the close matches
        return value


@dataclass(kw_only=True)
class StructuredReport(Report):
    """What :func:`structured_` / :func:`apply_structured_` did: per-group channel counts, edited layers, skips.

    ``units_before``: channel units of the graph; ``units_pruned``: units removed; ``ratio``: the
    channel ratio selected (solved for ``target: macs/params``); ``params_*`` / ``macs_*``:
    parameter entries and MACs of one forward of ``example_inputs`` around the surgery;
    ``groups``: ``{"group", "before", "after"}`` per pruned group; ``layers``: ``{"layer",
    "axis", "before", "after"}`` per edited axis; ``warnings``: what the graph noticed.
    """

    criterion: str
    scope: str
    ratio: float
    target: str
    units_before: int
    units_pruned: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class StructuredPlan:
    """Which channel units :func:`apply_structured_` removes, as :func:`plan_structured` chose them.

    ``graph``: the channel graph of the model as planned; ``groups``: the candidate groups;
    ``scores``: unit id -> criterion score; ``ratio``: the channel ratio selected; ``units``:
    unit ids to remove; ``skipped``: layer -> why its channels stay; ``params_before`` /
    ``macs_before``: the model's size as planned; ``shapes``: parameter name -> shape, the
    model the plan is valid for (a plan applies once, to that model).
    """

    config: StructuredConfig
    graph: ChannelGraph
    groups: list[Group]
    scores: dict[int, float]
    ratio: float
    units: list[int]
    skipped: dict[str, str]
    params_before: int
    macs_before: int
    shapes: dict[str, tuple[int, ...]]


def _graph_macs(graph: ChannelGraph, model: nn.Module, x: Any, recorded: bool = False) -> int:
    """MACs counted on the traced graph (meta tensors; ``recorded``: from the shapes the trace recorded,
    the model unchanged since) where that equals count_macs, else for real."""
    macs = traced_macs(graph, model, x, recorded)
    return macs if macs is not None else int(count_macs(model, x))


class _Stepper(torch.fx.Interpreter):
    """Runs a graph and remembers the node it is at (the one that raised, when it raises)."""

    node: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        self.node = n
        return super().run_node(n)


def _failing_op(graph: ChannelGraph, model: nn.Module, x: torch.Tensor) -> str:
    """`` at fx node 'n' (what)``: where the pruned model's traced graph fails on meta tensors, or ``""``.

    Not for graphs whose sizes the trace baked in (they fail at the first baked size, wherever the
    eager forward would).
    """
    gm = graph.traced
    if gm is None or tracing.baked_sizes(gm):
        return ""
    stepper = _Stepper(gm)
    stepper.extra_traceback = False
    try:
        with torch.no_grad(), tracing.on_meta(gm):
            stepper.run(x.to("meta"))
    except Exception:  # the op that raised is the answer
        n = stepper.node
        if n is not None and n.op != "placeholder":
            module = model.get_submodule(n.target) if n.op == "call_module" else None
            return f" at fx node {n.name!r}, {node_what(n, module)}"
    return ""


def _failing_line(err: BaseException) -> str:
    """`` at dir/file.py:line in fn``: the innermost frame of ``err`` outside torch and slimkit, or ``""``."""
    import traceback
    from pathlib import Path

    skip = (str(Path(torch.__file__).parent), str(Path(tracing.__file__).parent))
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(skip)]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


def _shapes(modules: Iterable[tuple[str, nn.Module]]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every parameter, named and ordered as ``named_parameters`` names them (a shared one
    once), read from the ``(name, module)`` pairs of ``named_modules``."""
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for prefix, m in modules:
        for name, p in m._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                shapes[f"{prefix}.{name}" if prefix else name] = tuple(p.shape)
    return shapes


def candidate_groups(graph: ChannelGraph, cfg: StructuredConfig, model: nn.Module, scores: dict[int, float],
                     skipped: dict[str, str]) -> list[Group]:
    """The groups of ``graph`` that ``cfg`` selects and the criterion scored; the others go into ``skipped``."""
    ignore = cfg.ignore if cfg.ignore is not None else (classifier_name(model, graph.modules_of(model)),)
    unscored = ({u for u, v in scores.items() if math.isnan(v)}
                if np.isnan(np.fromiter(scores.values(), dtype=np.float64, count=len(scores))).any() else set())
    chosen = []
    for group in graph.groups:
        if not any(matches(p, cfg.layers) for p in group.producers):
            for p in group.producers:
                skipped.setdefault(p, "not selected by layers")
            continue
        if any(matches(p, ignore) for p in group.producers):
            for p in group.producers:
                skipped.setdefault(p, "ignored")
            continue
        if unscored and not unscored.isdisjoint(group.units):
            for p in group.producers:
                skipped.setdefault(p, f"criterion {cfg.criterion} cannot score it (no BatchNorm?)")
            continue
        chosen.append(group)
    for name, reason in graph.fixed_reasons.items():
        skipped.setdefault(name, f"channels kept: {reason}")
    return chosen


def _min_keep(n: int, cfg: StructuredConfig) -> int:
    return max(1, math.ceil(n * (1 - cfg.max_layer_ratio) - 1e-9))


def _round_keep(keep: int, n: int, round_to: int) -> int:
    return min(n, int(math.ceil(keep / round_to) * round_to)) if round_to > 1 else keep


def _partition_keep(m: int, kept: int, groups: int, round_to: int) -> int:
    """Units to keep in each of ``groups`` partitions of ``m``: at least ``kept``, total a multiple of ``round_to``."""
    while kept < m and (kept * groups) % round_to:
        kept += 1
    return kept


def local_keep(n: int, ratio: float, cfg: StructuredConfig, partitions: int = 0) -> int:
    """Units local selection at ``ratio`` keeps of a group of ``n`` (of each of its ``partitions`` partitions of
    ``n`` when it reaches a grouped conv): ``floor(ratio * n)`` removed, at least ``1 - max_layer_ratio`` of ``n``
    kept, the kept count (all partitions together) rounded up to a multiple of ``round_to``."""
    kept = max(n - int(math.floor(ratio * n + 1e-9)), _min_keep(n, cfg))
    return _partition_keep(n, kept, partitions, cfg.round_to) if partitions else _round_keep(kept, n, cfg.round_to)


def _rows(group: Group, scores: dict[int, float]) -> list[list[int]]:
    """Row ``j``: the ``j``-th lowest-scored unit of every partition (``len(partitions)`` ids)."""
    ordered = [sorted(p, key=lambda u: (scores[u], u)) for p in group.partitions]
    return [list(row) for row in zip(*ordered, strict=True)]


def _local_rows(group: Group, scores: dict[int, float], ratio: float, cfg: StructuredConfig) -> list[int]:
    """Per-partition local selection: every partition of ``m`` units loses its lowest ``floor(ratio * m)``."""
    m = len(group.partitions[0])
    kept = local_keep(m, ratio, cfg, len(group.partitions))
    return [u for row in _rows(group, scores)[: m - kept] for u in row]


def _entries(group: Group, scores: dict[int, float], scale: float) -> list[tuple[float, int, str, tuple[int, ...]]]:
    """Global candidates of ``group``: one per unit, or one per row (mean score) when partitioned."""
    if not group.partitions:
        return [(scores[u] * scale, u, group.name, (u,)) for u in group.units]
    return [(float(np.mean([scores[u] for u in row])) * scale, row[0], group.name, tuple(row))
            for row in _rows(group, scores)]


def _global_keep(g: Group, taken: list[tuple[int, ...]], cfg: StructuredConfig) -> list[tuple[int, ...]]:
    """The taken entries of ``g`` after rounding its kept count up to ``round_to``."""
    if not g.partitions:
        n = len(g.units)
        return taken[: n - _round_keep(n - len(taken), n, cfg.round_to)]
    m = len(g.partitions[0])
    return taken[: m - _partition_keep(m, m - len(taken), len(g.partitions), cfg.round_to)]


def select_units(groups: list[Group], scores: dict[int, float], ratio: float, cfg: StructuredConfig) -> list[int]:
    """Units to prune: the lowest-scored ``ratio`` of the candidates, per group or globally.

    A partitioned group (it reaches a grouped conv) loses as many units from every partition:
    locally the lowest ``floor(ratio * m)`` of each partition of ``m``; globally whole rows
    (the ``j``-th lowest of every partition), ranked by their mean score.
    """
    pruned: list[int] = []
    if cfg.scope == "local":
        return _local_units(groups, scores, ratio, cfg)
    scale = {}
    for g in groups:
        vals = np.array([scores[u] for u in g.units])
        denom = {"none": 1.0, "mean": vals.mean(), "max": vals.max()}[cfg.normalize]
        scale[g.name] = 1.0 / denom if denom > 0 else 1.0
    entries = sorted(e for g in groups for e in _entries(g, scores, scale[g.name]))
    budget = int(math.floor(ratio * sum(len(g.units) for g in groups) + 1e-9))
    limit = {g.name: _global_limit(g, cfg) for g in groups}
    taken: dict[str, list[tuple[int, ...]]] = {g.name: [] for g in groups}
    for _, _, name, ids in entries:
        if budget <= 0:
            break
        if len(taken[name]) < limit[name] and len(ids) <= budget:
            taken[name].append(ids)
            budget -= len(ids)
    for g in groups:
        pruned += [u for ids in _global_keep(g, taken[g.name], cfg) for u in ids]  # ascending: give back the best
    return pruned


def _local_units(groups: list[Group], scores: dict[int, float], ratio: float, cfg: StructuredConfig) -> list[int]:
    """Local selection: each group's lowest-scored units by (score, id), as ``sorted`` would order them, group
    after group (all unpartitioned groups sorted in one call; a partitioned group by :func:`_local_rows`)."""
    plain = [g for g in groups if not g.partitions]
    sizes = np.fromiter((len(g.units) for g in plain), dtype=np.int64, count=len(plain))
    ids = list(itertools.chain.from_iterable(g.units for g in plain))
    units = np.array(ids, dtype=np.int64)
    vals = np.array(operator.itemgetter(*ids)(scores) if len(ids) > 1 else [scores[u] for u in ids],
                    dtype=np.float64)
    group_of = np.repeat(np.arange(len(plain)), sizes)
    order = np.lexsort((units, vals, group_of))
    starts = np.cumsum(sizes) - sizes
    drop = np.array([n - local_keep(n, ratio, cfg) for n in sizes.tolist()], dtype=np.int64)
    taken = units[order].tolist()
    chosen = iter([taken[a:a + d] for a, d in zip(starts.tolist(), drop.tolist(), strict=True)])
    pruned: list[int] = []
    for g in groups:
        pruned += _local_rows(g, scores, ratio, cfg) if g.partitions else next(chosen)
    return pruned


def _global_limit(g: Group, cfg: StructuredConfig) -> int:
    """Most entries (units, or rows when partitioned) global selection may take from ``g``."""
    m = len(g.partitions[0]) if g.partitions else len(g.units)
    return m - _min_keep(m, cfg)


def plan_structured(model: nn.Module, example_inputs: Any, config: StructuredConfig | dict | None = None, *,
                    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
                    baked: str = "runtime") -> StructuredPlan:
    """Choose the channel units :func:`structured_` would remove from ``model``; the model is left as it was.

    ``example_inputs``: one batch (a tensor or a tuple of tensors) to trace the model.
    ``batches``: (inputs, targets) for the data criteria (``taylor``, ``fisher``). With
    ``target: macs`` or ``params`` the channel ratio is found by bisection (each candidate is
    pruned, measured and undone). Raises UnsupportedModelError naming an operation the graph
    cannot prune through (unless ``on_unsupported: skip``), ConfigError for bad settings or
    ``example_inputs`` the model does not accept, or when no group is prunable. ``baked``: how
    the graph reads the constant sizes of a meta-traced forward (see
    :func:`slimkit.prune.graph.build_graph`).
    """
    cfg = StructuredConfig.coerce(config, where="structured")
    criterion = CRITERIA.get(cfg.criterion)
    x = trace_input(model, example_inputs)
    graph = build_graph(model, x, on_unsupported=cfg.on_unsupported, norm_channels=cfg.norm_channels, baked=baked)
    with gc_paused():
        scores = criterion(model, graph, ScoreContext(x, batches, cfg.seed))
    skipped: dict[str, str] = {}
    groups = candidate_groups(graph, cfg, model, scores, skipped)
    if not groups and cfg.ratio > 0:
        raise ConfigError(
            f"structured: no prunable channel group among layers={list(cfg.layers)} minus "
            f"ignore={list(cfg.ignore or [classifier_name(model)])}; skipped: {dict(list(skipped.items())[:5])}"
        )
    shapes = _shapes(graph.modules_of(model).items())
    params_before = sum(math.prod(s) for s in shapes.values())  # count_params: every parameter once
    macs_before = _graph_macs(graph, model, x, recorded=True)
    ratio = cfg.ratio
    if cfg.target != "channels" and cfg.ratio > 0:
        ratio = solve_ratio(model, x, graph, groups, scores, cfg, params_before, macs_before)
    return StructuredPlan(config=cfg, graph=graph, groups=groups, scores=scores, ratio=float(ratio),
                          units=select_units(groups, scores, ratio, cfg), skipped=skipped,
                          params_before=params_before, macs_before=macs_before, shapes=shapes)


def _size(model: nn.Module, macs: int) -> ModelSize:
    """``ModelSize.of(model, x)`` with the MACs already counted on the traced graph (no second forward)."""
    params, nonzeros = count_params_nonzeros(model)
    return ModelSize(params=params, nonzeros=nonzeros, macs=int(macs), bytes=stored_bytes(model))


def apply_structured_(model: nn.Module, example_inputs: Any, plan: StructuredPlan) -> StructuredReport:
    """Remove the channel units of ``plan`` from ``model`` in place; returns a :class:`StructuredReport`.

    ``model`` must be the model ``plan`` was made for, as it was (ConfigError otherwise: plan
    again). ``example_inputs``: the batch the MACs are counted on. When the pruned model's
    forward fails (an op the graph did not foresee) the model is restored and
    UnsupportedModelError says which layers to ignore.
    """
    shapes = _shapes(model.named_modules())
    if shapes != plan.shapes:
        changed = next((n for n in plan.shapes if shapes.get(n) != plan.shapes[n]), next(iter(shapes), "?"))
        raise ConfigError(f"apply_structured_: the model is not the one the plan was made for (parameter "
                          f"{changed!r}: planned {plan.shapes.get(changed)}, now {shapes.get(changed)}); "
                          "call plan_structured on this model")
    cfg, graph, unit_ids = plan.config, plan.graph, plan.units
    x = trace_input(model, example_inputs)
    before = _size(model, plan.macs_before)
    modules = graph.modules_of(model)
    snapshot = snapshot_modules(modules[name] for name in dict.fromkeys(name for name, _ in graph.axes))
    try:
        changes = prune_units_(model, graph, unit_ids)
        macs_after = _graph_macs(graph, model, x)
    except Exception as err:  # a forward the graph did not foresee: leave the model as it was
        while err.__cause__ is not None:  # the op's own error, not the "do not fit" of the MAC count's forward
            err = err.__cause__
        where = _failing_op(graph, model, x) or _failing_line(err)
        restore_modules(snapshot)
        text = str(err).strip().splitlines()
        raise UnsupportedModelError(
            f"pruning {type(model).__name__} would break its forward{where} ({type(err).__name__}: "
            f"{text[0] if text else ''}); the model is left as it was: keep the layers involved with ignore, "
            "or describe the op with slimkit.prune.register_channel_rule") from None
    chosen = set(unit_ids)
    group_rows = [
        {"group": g.name, "before": len(g.units), "after": len([u for u in g.units if u not in chosen])}
        for g in plan.groups
    ]
    after = _size(model, macs_after)
    return StructuredReport(
        verb="structured_", changed=list(dict.fromkeys(row["layer"] for row in changes)), skipped=dict(plan.skipped),
        before=before, after=after,
        criterion=cfg.criterion, scope=cfg.scope, ratio=plan.ratio, target=cfg.target,
        units_before=sum(len(g.units) for g in graph.groups), units_pruned=len(unit_ids),
        params_before=plan.params_before, params_after=after.params,
        macs_before=plan.macs_before, macs_after=macs_after,
        groups=group_rows, layers=changes, warnings=list(graph.warnings),
    )


def structured_(model: nn.Module, example_inputs: Any, config: StructuredConfig | dict | None = None, *,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> StructuredReport:
    """Prune channels of ``model`` in place and return a :class:`StructuredReport`.

    :func:`plan_structured` then :func:`apply_structured_`. ``example_inputs``: one batch (a
    tensor or a tuple of tensors) to trace the model; ``batches``: (inputs, targets) for the
    ``taylor`` / ``fisher`` criteria. Raises UnsupportedModelError naming an operation the
    dependency graph cannot prune through (unless ``on_unsupported: skip``;
    :func:`slimkit.prune.register_channel_rule` teaches it a new one), ConfigError for bad
    settings or ``example_inputs`` the model does not accept.
    """
    with gc_paused():  # a full collection triggered by the graph's temporaries costs more than the whole prune
        plan = plan_structured(model, example_inputs, config, batches=batches)
        try:
            return apply_structured_(model, example_inputs, plan)
        except UnsupportedModelError:
            gm = plan.graph.traced if plan.graph.traced is not None else plan.graph.recorded
            if gm is not None and not tracing.baked_sizes(gm):
                raise
        # a meta-traced graph's constants were read as run-time sizes of the tensors they shape, and one was
        # read from another tensor (Twins, NesT: ``C // heads`` of the input on the qkv output): read them as fixed
        return apply_structured_(model, example_inputs,
                                 plan_structured(model, example_inputs, config, batches=batches, baked="fixed"))


#: attributes every nn.Module has (its parameter/buffer/child tables, hooks, ``training``)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


@dataclass
class ModuleState:
    """What surgery may change in one module: its plain attributes and its own parameters and buffers."""

    module: nn.Module
    attributes: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _tensor_names(m: nn.Module) -> set[str]:
    return {n for n, _ in m.named_parameters(recurse=False)} | {n for n, _ in m.named_buffers(recurse=False)}


def snapshot_modules(modules: Iterable[nn.Module]) -> list[ModuleState]:
    """The state :func:`restore_modules` puts back (references to the same parameter and buffer objects)."""
    return [ModuleState(m, {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS},
                        {k: v for table in (m._parameters, m._buffers) for k, v in table.items() if v is not None})
            for m in modules]


def restore_modules(snapshot: list[ModuleState]) -> None:
    """Put the modules back as :func:`snapshot_modules` saw them (the same parameter and buffer objects)."""
    for state in snapshot:
        m = state.module
        added = (_tensor_names(m) | (set(vars(m)) - _MODULE_INTERNALS)) - set(state.tensors) - set(state.attributes)
        for name in added:
            delattr(m, name)
        for name, value in {**state.attributes, **state.tensors}.items():
            setattr(m, name, value)  # a Parameter stays a parameter, a buffer name stays a buffer


def solve_ratio(model: nn.Module, example_inputs: Any, graph: ChannelGraph, groups: list[Group],
                scores: dict[int, float], cfg: StructuredConfig, params0: int, macs0: int) -> float:
    """Smallest channel ratio whose pruned model reaches the MAC/param reduction ``cfg.ratio``.

    ``params0`` / ``macs0``: the model's size before. Each candidate prunes ``model`` in place,
    is measured and is undone (cheaper than a copy), so the model is left as it was.
    """
    measure = (lambda m: int(count_macs(m, example_inputs))) if cfg.target == "macs" else count_params
    base = macs0 if cfg.target == "macs" else params0
    modules = dict(model.named_modules())
    edited = [modules[name] for name in dict.fromkeys(name for name, _ in graph.axes)]

    def reduction(r: float) -> float:
        snapshot = snapshot_modules(edited)
        try:
            prune_units_(model, graph, select_units(groups, scores, r, cfg))
            return 1 - measure(model) / base
        finally:
            restore_modules(snapshot)

    lo, hi = 0.0, 0.99
    if reduction(hi) < cfg.ratio:
        return hi  # as far as the per-layer cap allows
    for _ in range(10):
        mid = (lo + hi) / 2
        if reduction(mid) >= cfg.ratio:
            hi = mid
        else:
            lo = mid
    return hi
