"""Surgery: physically remove channels, leaving plain smaller dense layers.

Each member axis of the pruned units (see :mod:`slimkit.prune.graph`) loses the positions
the units occupy there: a conv loses filters (``out``) or input channels (``in``), a
BatchNorm its scale, shift and running statistics, a depthwise conv its filters and
groups, a grouped conv the same number of filters and of input channels in every group
(``groups`` stays, channels per group shrink), a parameter used in forward
(``param:<name>:<axis>``) its slices. Modules keep their class and are edited in place,
so the model stays an ordinary ``nn.Module`` that :func:`slimkit.manifest.save_model` can
store and ONNX can export.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from slimkit.exceptions import UnsupportedModelError
from slimkit.prune.graph import Axis, ChannelGraph


def removals_for(graph: ChannelGraph, unit_ids: Iterable[int]) -> dict[Axis, np.ndarray]:
    """Positions to delete on every member axis when the units ``unit_ids`` are pruned."""
    out: dict[Axis, list[np.ndarray]] = defaultdict(list)
    for uid in unit_ids:
        for axis, idx in graph.units[uid].members.items():
            out[axis].append(idx)
    return {axis: np.unique(np.concatenate(parts)) for axis, parts in out.items()}


def _keep(size: int, drop: np.ndarray) -> torch.Tensor:
    mask = np.ones(size, dtype=bool)
    mask[drop] = False
    return torch.as_tensor(np.flatnonzero(mask), dtype=torch.long)


def _param(t: torch.Tensor, keep: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(t.data.index_select(dim, keep), requires_grad=t.requires_grad)


def _per_group_drops(name: str, size: int, groups: int, drop: np.ndarray) -> list[np.ndarray]:
    """Local positions to delete in each of ``groups`` equal blocks of ``size`` channels.

    ``drop``: global positions ``[k]``; raises when the blocks would lose different counts.
    """
    per = size // groups
    local = [drop[(drop >= k * per) & (drop < (k + 1) * per)] - k * per for k in range(groups)]
    if len({len(x) for x in local}) > 1:
        raise UnsupportedModelError(f"grouped conv {name!r}: groups would lose different channel counts")
    return local


def _cut_grouped_inputs(name: str, weight: nn.Parameter, size: int, groups: int, drop: np.ndarray) -> nn.Parameter:
    """Weight ``[C_out, size/groups, *k]`` without the inputs ``drop``, chosen per group.

    Output block ``k`` (``C_out/groups`` filters) keeps group ``k``'s remaining inputs:
    result ``[C_out, (size - len(drop))/groups, *k]``.
    """
    rows = weight.shape[0] // groups
    blocks = [
        weight.data[k * rows:(k + 1) * rows].index_select(1, _keep(size // groups, local))
        for k, local in enumerate(_per_group_drops(name, size, groups, drop))
    ]
    return nn.Parameter(torch.cat(blocks, 0), requires_grad=weight.requires_grad)


def _cut_module(name: str, m: nn.Module, role: str, drop: np.ndarray, depthwise: bool = False) -> tuple[int, int]:
    """Delete positions ``drop`` of ``m``'s ``role`` axis; returns (before, after).

    ``depthwise``: ``m`` was a depthwise conv before any cut (its groups follow its channels).
    """
    if role.startswith("param:"):
        _, pname, axis = role.split(":")
        axis = int(axis)
        tensor = getattr(m, pname)
        keep = _keep(tensor.shape[axis], drop)
        if isinstance(tensor, nn.Parameter):
            setattr(m, pname, _param(tensor, keep, axis))
        else:
            setattr(m, pname, tensor.index_select(axis, keep))
        return tensor.shape[axis], len(keep)
    if isinstance(m, nn.modules.conv._ConvNd):
        if role == "out":
            before = m.out_channels
            keep = _keep(before, drop)
            if m.groups > 1 and not depthwise:
                _per_group_drops(name, before, m.groups, drop)
            m.weight = _param(m.weight, keep, 0)
            if m.bias is not None:
                m.bias = _param(m.bias, keep, 0)
            m.out_channels = len(keep)
            if depthwise:
                mult = before // m.groups
                m.groups = m.in_channels = len(keep) // mult
            return before, len(keep)
        before = m.in_channels
        if m.groups > 1:
            m.weight = _cut_grouped_inputs(name, m.weight, before, m.groups, drop)
            m.in_channels = m.weight.shape[1] * m.groups
            return before, m.in_channels
        keep = _keep(before, drop)
        m.weight = _param(m.weight, keep, 1)
        m.in_channels = len(keep)
        return before, len(keep)
    if isinstance(m, nn.Linear):
        dim = 0 if role == "out" else 1
        before = m.out_features if role == "out" else m.in_features
        keep = _keep(before, drop)
        m.weight = _param(m.weight, keep, dim)
        if role == "out":
            if m.bias is not None:
                m.bias = _param(m.bias, keep, 0)
            m.out_features = len(keep)
        else:
            m.in_features = len(keep)
        return before, len(keep)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        before = m.num_features
        keep = _keep(before, drop)
        if m.affine:
            m.weight = _param(m.weight, keep, 0)
            m.bias = _param(m.bias, keep, 0)
        if m.track_running_stats and m.running_mean is not None:
            m.running_mean = m.running_mean.index_select(0, keep)
            m.running_var = m.running_var.index_select(0, keep)
        m.num_features = len(keep)
        return before, len(keep)
    if isinstance(m, nn.PReLU):
        before = m.num_parameters
        keep = _keep(before, drop)
        m.weight = _param(m.weight, keep, 0)
        m.num_parameters = len(keep)
        return before, len(keep)
    if isinstance(m, nn.GroupNorm):
        before = m.num_channels
        keep = _keep(before, drop)
        if m.affine:
            m.weight = _param(m.weight, keep, 0)
            m.bias = _param(m.bias, keep, 0)
        m.num_channels = m.num_groups = len(keep)
        return before, len(keep)
    raise UnsupportedModelError(f"surgery does not know how to prune {type(m).__name__} {name!r} ({role})")


@torch.no_grad()
def prune_units_(model: nn.Module, graph: ChannelGraph, unit_ids: Iterable[int]) -> list[dict]:
    """Remove the units ``unit_ids`` of ``graph`` from ``model`` in place.

    Returns one row per edited axis: ``{"layer", "axis", "before", "after"}``. The graph
    describes the model as it was; build a new one before pruning again.
    """
    modules = dict(model.named_modules())
    depthwise = {name for name, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)
                 and m.groups > 1 and m.groups == m.in_channels}
    changes = []
    for (name, role), drop in sorted(removals_for(graph, unit_ids).items()):
        before, after = _cut_module(name, modules[name], role, drop, name in depthwise)
        changes.append({"layer": name, "axis": role, "before": int(before), "after": int(after)})
    return changes
