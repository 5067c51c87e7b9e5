"""Importance of channel units, aggregated over the members of each unit.

A criterion is ``fn(model, graph, ctx) -> {unit id: score}``; low scores are pruned first.
A unit a criterion cannot score (``bn_gamma`` on a unit without BatchNorm) gets NaN and
is skipped with a reason. Registered names: ``l1``, ``l2`` (filter norm, Li et al. 2017,
"Pruning Filters for Efficient ConvNets"), ``bn_gamma`` (|BN scale|, Liu et al. 2017,
"Learning Efficient Convolutional Networks through Network Slimming"), ``sparsity``
(the seeds' filter sparsity S alone), ``sparsity_gamma`` (S x |gamma|, the MobileNetV3
pruning paper of the seeds), ``taylor`` (first-order Taylor, Molchanov et al. 2019) and
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

from slimkit.prune.graph import ChannelGraph, Unit
from slimkit.registry import Registry


@dataclass
class ScoreContext:
    """What a criterion may use besides the weights: inputs (Taylor) and a seed (random)."""

    example_inputs: torch.Tensor | None = None
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
    seed: int = 0


Criterion = Callable[[nn.Module, ChannelGraph, ScoreContext], dict[int, float]]
CRITERIA: Registry[Criterion] = Registry("pruning criterion")

_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)


def _producer_rows(modules: dict[str, nn.Module], unit: Unit):
    """(module, weight rows of the unit as [k, fan_in]) for every conv/linear producer."""
    for (name, role), idx in unit.members.items():
        m = modules[name]
        if role == "out" and isinstance(m, _PRODUCERS) and name in unit.producers:
            w = m.weight.detach()
            yield m, w[torch.as_tensor(idx)].reshape(len(idx), -1)


def _bn_gammas(modules: dict[str, nn.Module], unit: Unit) -> list[torch.Tensor]:
    out = []
    for (name, role), idx in unit.members.items():
        m = modules[name]
        if role == "out" and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            out.append(m.weight.detach()[torch.as_tensor(idx)].abs())
    return out


def _norm(p: int) -> Criterion:
    def score(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
        modules = dict(model.named_modules())
        result = {}
        for uid, unit in graph.units.items():
            values = [rows.abs().sum() if p == 1 else rows.pow(2).sum().sqrt() for _, rows in
                      _producer_rows(modules, unit)]
            result[uid] = float(torch.stack(values).mean()) if values else float("nan")
        return result

    return score


CRITERIA.register("l1")(_norm(1))
CRITERIA.register("l2")(_norm(2))


@CRITERIA.register("bn_gamma")
def bn_gamma(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """Mean |gamma| of the BatchNorm layers the unit passes through (NaN when none)."""
    modules = dict(model.named_modules())
    result = {}
    for uid, unit in graph.units.items():
        gammas = _bn_gammas(modules, unit)
        result[uid] = float(torch.cat(gammas).mean()) if gammas else float("nan")
    return result


def filter_sparsity(model: nn.Module, graph: ChannelGraph) -> dict[int, float]:
    """``S``: mean over the unit's producers of the fraction of coefficients >= the layer mean."""
    modules = dict(model.named_modules())
    layer_mean: dict[int, torch.Tensor] = {}
    result = {}
    for uid, unit in graph.units.items():
        values = []
        for m, rows in _producer_rows(modules, unit):
            mean = layer_mean.setdefault(id(m), m.weight.detach().abs().mean())
            values.append((rows.abs() >= mean).float().mean(dim=1).mean())
        result[uid] = float(torch.stack(values).mean()) if values else float("nan")
    return result


@CRITERIA.register("sparsity")
def sparsity(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """Filter sparsity ``S`` alone (the seeds' ablation)."""
    return filter_sparsity(model, graph)


@CRITERIA.register("sparsity_gamma")
def sparsity_gamma(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """``S x |gamma|``: the importance of the seeds' MobileNetV3 pruning method."""
    s = filter_sparsity(model, graph)
    g = bn_gamma(model, graph, ctx)
    return {uid: s[uid] * g[uid] for uid in graph.units}


@CRITERIA.register("random")
def random(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """Uniform random scores from ``ctx.seed`` (reproducible)."""
    rng = np.random.default_rng(ctx.seed)
    return {uid: float(v) for uid, v in zip(graph.units, rng.random(len(graph.units)), strict=True)}


@CRITERIA.register("taylor")
def taylor(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """First-order Taylor: ``|sum of w * dL/dw|`` over the unit's producer and BN parameters.

    Uses ``ctx.batches`` of (inputs, targets) when given, else ``ctx.example_inputs`` with
    the model's own predictions as targets. Gradients of the model are left untouched.
    """
    batches: list[Any] = list(ctx.batches) if ctx.batches is not None else []
    if not batches:
        if ctx.example_inputs is None:
            raise ValueError("criterion taylor needs example inputs or batches of (inputs, targets)")
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
        modules = dict(model.named_modules())
        result = {}
        for uid, unit in graph.units.items():
            total = torch.zeros(())
            for (name, role), idx in unit.members.items():
                m = modules[name]
                if role != "out" or not (isinstance(m, _PRODUCERS + (nn.modules.batchnorm._BatchNorm,))):
                    continue
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if p is not None and p.grad is not None:
                        sel = torch.as_tensor(idx)
                        total = total + (p.detach()[sel] * p.grad[sel]).sum().abs()
            result[uid] = float(total)
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        model.train(was_training)
    return result
