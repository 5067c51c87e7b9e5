"""Surgery: physically remove channels, leaving plain smaller dense layers.

Each member axis of the pruned units (see :mod:`slimkit.prune.graph`) loses the positions
the units occupy there. How a layer loses them is its class's *surgery handler*, found
along the MRO in one registry (:func:`register_surgery_handler`; the built-ins below are
registered the same way): a conv loses filters (``out``) or input channels (``in``), a
BatchNorm its scale, shift and running statistics, a depthwise conv its filters and
groups, a grouped conv the same number of filters and of input channels in every group
(``groups`` stays, channels per group shrink), a GroupNorm its channels (its groups stay
unless it had one per channel), a LayerNorm its parameters and ``normalized_shape``. A
``param:<name>:<axis>`` axis (a parameter used directly in forward) loses slices of that
parameter, whatever the module. Modules keep their class and are edited in place, so the
model stays an ordinary ``nn.Module`` that :func:`slimkit.manifest.save_model` can store and
ONNX can export.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from slimkit.exceptions import UnsupportedModelError
from slimkit.prune.graph import Axis, ChannelGraph
from slimkit.prune.graph.core import UnitTable
from slimkit.prune.graph.rules import qualified_name
from slimkit.registry import Registry

#: handler(module, role, keep): cut ``module``'s ``role`` axis down to the positions ``keep``
#: (a sorted LongTensor), in place.
SurgeryHandler = Callable[[nn.Module, str, torch.Tensor], None]
SURGERY_HANDLERS: Registry[SurgeryHandler] = Registry("surgery handler")


def register_surgery_handler(cls: type[nn.Module] | str, handler: SurgeryHandler) -> None:
    """Cut layers of class ``cls`` (and subclasses) with ``handler(module, role, keep)``.

    ``cls``: the class, or its qualified name (``"timm.layers.mixed_conv2d.MixedConv2d"``:
    no import needed). ``role`` is the member axis (``out``, ``in`` or one a channel rule
    named) and ``keep`` the sorted positions that stay (a LongTensor, shared by the layers that
    lose the same positions: read it, never write it). Layers are cut deepest first (children
    before their parent), a layer's ``out`` before its ``in``. A later registration replaces an
    earlier one.
    """
    name = cls if isinstance(cls, str) else qualified_name(cls)
    SURGERY_HANDLERS.register(f"module:{name}", handler, replace=True)


def handler_for(module: nn.Module) -> SurgeryHandler | None:
    """The handler registered for ``module``'s class or its nearest base, or None."""
    for cls in type(module).__mro__:
        key = f"module:{qualified_name(cls)}".lower()
        if key in SURGERY_HANDLERS:
            return SURGERY_HANDLERS.get(key)
    return None


class _Cutter:
    """One prune's memo of the handler of each layer class and of the ``keep`` tensor of each removal
    (coupled axes, a conv's filters and its BatchNorm's channels, lose the same positions)."""

    def __init__(self) -> None:
        self.handlers: dict[type, SurgeryHandler | None] = {}
        self.keeps: dict[tuple[int, bytes], torch.Tensor] = {}

    def handler(self, m: nn.Module) -> SurgeryHandler | None:
        kind = type(m)
        if kind not in self.handlers:
            self.handlers[kind] = handler_for(m)
        return self.handlers[kind]

    def keep(self, size: int, drop: np.ndarray) -> torch.Tensor:
        key = (size, drop.tobytes())
        found = self.keeps.get(key)
        if found is None:
            found = self.keeps[key] = _keep(size, drop)
        return found


def removals_for(graph: ChannelGraph, unit_ids: Iterable[int]) -> dict[Axis, np.ndarray]:
    """Positions to delete on every member axis when the units ``unit_ids`` are pruned.

    Axes come in the order they first appear in the units' members (units in ``unit_ids`` order).
    """
    table = UnitTable.from_units(graph.units)
    rows = _rows_of(table, unit_ids)
    if not len(rows):
        return {}
    rank = np.full(len(table), -1, dtype=np.int64)
    rank[rows[::-1]] = np.arange(len(rows))[::-1]  # a unit's first place in unit_ids
    runs = np.flatnonzero(rank[table.run_unit] >= 0)
    axis_of = table.run_axis[runs]
    starts, lengths = table.run_start[runs], table.run_stop[runs] - table.run_start[runs]
    offsets = np.r_[0, np.cumsum(lengths)]
    entry_axis = np.repeat(axis_of, lengths)
    entry_pos = table.positions[np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, lengths)]
    if not len(entry_pos):
        return {}
    order = np.lexsort((entry_pos, entry_axis))
    entry_axis, entry_pos = entry_axis[order], entry_pos[order]
    distinct = np.r_[True, (np.diff(entry_axis) != 0) | (np.diff(entry_pos) != 0)]  # each (axis, position) once
    entry_axis, entry_pos = entry_axis[distinct], entry_pos[distinct]
    bounds = np.flatnonzero(np.r_[True, np.diff(entry_axis) != 0])
    found = dict(zip(entry_axis[bounds].tolist(), np.split(entry_pos, bounds[1:]), strict=True))
    first = axis_of[np.lexsort((runs, rank[table.run_unit[runs]]))]  # runs in unit_ids order, then member order
    _, at = np.unique(first, return_index=True)
    return {table.axes[a]: found[a] for a in first[np.sort(at)].tolist()}  # each axis once; positions ascending


def _rows_of(table: UnitTable, unit_ids: Iterable[int]) -> np.ndarray:
    """``table.index_of(unit_ids)`` with numpy (KeyError for an id the table does not have)."""
    wanted = np.fromiter(unit_ids, dtype=np.int64)
    if not len(wanted):
        return wanted
    if not len(table.ids):
        raise KeyError(int(wanted[0]))
    order = np.argsort(table.ids, kind="stable")
    rows = order[np.minimum(np.searchsorted(table.ids, wanted, sorter=order), len(order) - 1)]
    missing = np.flatnonzero(table.ids[rows] != wanted)
    if len(missing):
        raise KeyError(int(wanted[missing[0]]))
    return rows


def _keep(size: int, drop: np.ndarray) -> torch.Tensor:
    mask = np.ones(size, dtype=bool)
    mask[drop] = False
    return torch.from_numpy(np.flatnonzero(mask).astype(np.int64, copy=False))


def _param(t: torch.Tensor, keep: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(t.data.index_select(dim, keep), requires_grad=t.requires_grad)


def _plain_registration() -> bool:
    """No global parameter/buffer registration hooks: assigning into ``_parameters``/``_buffers`` is what
    ``nn.Module.__setattr__`` would do for a name already registered (at a fraction of the cost)."""
    return not (getattr(_torch_module, "_global_parameter_registration_hooks", None)
                or getattr(_torch_module, "_global_buffer_registration_hooks", None))


def cut_tensor(module: nn.Module, name: str, keep: torch.Tensor, dim: int) -> None:
    """Keep positions ``keep`` of ``module.<name>`` along ``dim`` (a parameter stays a parameter)."""
    params, buffers = module._parameters, module._buffers
    plain = type(module).__setattr__ is nn.Module.__setattr__ and _plain_registration()
    if plain and type(params.get(name)) is nn.Parameter:
        params[name] = _param(params[name], keep, dim)
        return
    if plain and buffers.get(name) is not None:
        buffers[name] = buffers[name].index_select(dim, keep)
        return
    tensor = getattr(module, name, None)
    if tensor is None:
        return
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, _param(tensor, keep, dim))
    else:
        setattr(module, name, tensor.index_select(dim, keep))


def sliced(out_params: Mapping[str, int], in_params: Mapping[str, int],
           counts: Mapping[str, str]) -> SurgeryHandler:
    """A handler that slices ``out_params`` / ``in_params`` (``{name: dim}``) and sets the ``counts`` attributes."""

    def handler(module: nn.Module, role: str, keep: torch.Tensor) -> None:
        for name, dim in (out_params if role == "out" else in_params if role == "in" else {}).items():
            cut_tensor(module, name, keep, dim)
        if role in counts:
            setattr(module, counts[role], len(keep))

    return handler


def _per_group_drops(size: int, groups: int, drop: np.ndarray) -> list[np.ndarray]:
    """Local positions to delete in each of ``groups`` equal blocks of ``size`` channels.

    ``drop``: global positions ``[k]``; raises when the blocks would lose different counts.
    """
    per = size // groups
    local = [drop[(drop >= k * per) & (drop < (k + 1) * per)] - k * per for k in range(groups)]
    if len({len(x) for x in local}) > 1:
        raise UnsupportedModelError("grouped conv: groups would lose different channel counts")
    return local


def _cut_grouped_inputs(weight: nn.Parameter, size: int, groups: int, drop: np.ndarray) -> nn.Parameter:
    """Weight ``[C_out, size/groups, *k]`` without the inputs ``drop``, chosen per group.

    Output block ``k`` (``C_out/groups`` filters) keeps group ``k``'s remaining inputs:
    result ``[C_out, (size - len(drop))/groups, *k]``.
    """
    rows = weight.shape[0] // groups
    blocks = [
        weight.data[k * rows:(k + 1) * rows].index_select(1, _keep(size // groups, local))
        for k, local in enumerate(_per_group_drops(size, groups, drop))
    ]
    return nn.Parameter(torch.cat(blocks, 0), requires_grad=weight.requires_grad)


def _drop(size: int, keep: torch.Tensor) -> np.ndarray:
    mask = np.ones(size, dtype=bool)
    mask[keep.numpy()] = False
    return np.flatnonzero(mask)


def _conv(m: nn.Module, role: str, keep: torch.Tensor) -> None:
    """Conv: filters (``out``; depthwise: its groups follow) or inputs (``in``; per group when grouped).

    Surgery cuts ``out`` before ``in``, so a conv that is depthwise now was depthwise before any cut.
    """
    if role == "out":
        before = m.out_channels
        depthwise = m.groups > 1 and m.groups == m.in_channels
        if m.groups > 1 and not depthwise:
            _per_group_drops(before, m.groups, _drop(before, keep))
        cut_tensor(m, "weight", keep, 0)
        cut_tensor(m, "bias", keep, 0)
        m.out_channels = len(keep)
        if depthwise:
            mult = before // m.groups
            m.groups = m.in_channels = len(keep) // mult
        return
    if m.groups > 1:
        m.weight = _cut_grouped_inputs(m.weight, m.in_channels, m.groups, _drop(m.in_channels, keep))
        m.in_channels = m.weight.shape[1] * m.groups
        return
    cut_tensor(m, "weight", keep, 1)
    m.in_channels = len(keep)


def _group_norm(m: nn.GroupNorm, role: str, keep: torch.Tensor) -> None:
    if m.num_groups == m.num_channels:
        m.num_groups = len(keep)
    m.num_channels = len(keep)
    cut_tensor(m, "weight", keep, 0)
    cut_tensor(m, "bias", keep, 0)


def _layer_norm(m: nn.LayerNorm, role: str, keep: torch.Tensor) -> None:
    m.normalized_shape = (len(keep),)
    cut_tensor(m, "weight", keep, 0)
    cut_tensor(m, "bias", keep, 0)


def _mixed_conv(m: nn.Module, role: str, keep: torch.Tensor) -> None:
    """timm's MixedConv2d: its ``split`` axis (the input channels) sets ``splits`` (its convs are cut on their own)."""
    bounds = np.cumsum([0, *m.splits])
    kept = keep.numpy()
    m.splits = [int(((kept >= a) & (kept < b)).sum()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    m.in_channels = sum(m.splits)
    m.out_channels = sum(c.out_channels for c in m.values())


def _rnn(m: nn.RNNBase, role: str, keep: torch.Tensor) -> None:
    """LSTM/GRU/RNN: input features (``in``) are the columns of the first layer's input weights."""
    for name in m._flat_weights_names:
        if name.startswith("weight_ih_l0"):  # ``weight_ih_l0`` and ``weight_ih_l0_reverse``
            cut_tensor(m, name, keep, 1)
    m.input_size = len(keep)


_PER_CHANNEL = {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}
register_surgery_handler(nn.RNNBase, _rnn)
register_surgery_handler("timm.layers.mixed_conv2d.MixedConv2d", _mixed_conv)
register_surgery_handler(nn.modules.conv._ConvNd, _conv)
register_surgery_handler(nn.Linear, sliced({"weight": 0, "bias": 0}, {"weight": 1},
                                           {"out": "out_features", "in": "in_features"}))
register_surgery_handler(nn.modules.batchnorm._BatchNorm, sliced(_PER_CHANNEL, {}, {"out": "num_features"}))
register_surgery_handler(nn.modules.instancenorm._InstanceNorm, sliced(_PER_CHANNEL, {}, {"out": "num_features"}))
register_surgery_handler(nn.PReLU, sliced({"weight": 0}, {}, {"out": "num_parameters"}))
register_surgery_handler(nn.GroupNorm, _group_norm)
register_surgery_handler(nn.LayerNorm, _layer_norm)
if hasattr(nn, "RMSNorm"):
    register_surgery_handler(nn.RMSNorm, _layer_norm)


def _cut(name: str, m: nn.Module, role: str, drop: np.ndarray, size: int, cutter: _Cutter | None = None) -> None:
    cutter = _Cutter() if cutter is None else cutter
    keep = cutter.keep(size, drop)
    if role.startswith("param:"):
        _, pname, axis = role.split(":")
        cut_tensor(m, pname, keep, int(axis))
        return
    handler = cutter.handler(m)
    if handler is None:
        raise UnsupportedModelError(
            f"surgery does not know how to prune {type(m).__name__} {name!r} ({role}); register a handler with "
            "slimkit.prune.register_surgery_handler (or out_params/in_params in register_channel_rule)")
    try:
        handler(m, role, keep)
    except UnsupportedModelError as err:  # name the layer (handlers see only the module)
        raise UnsupportedModelError(f"{type(m).__name__} {name!r} ({role}): {err}") from None


@torch.no_grad()
def prune_units_(model: nn.Module, graph: ChannelGraph, unit_ids: Iterable[int]) -> list[dict]:
    """Remove the units ``unit_ids`` of ``graph`` from ``model`` in place.

    Returns one row per edited axis: ``{"layer", "axis", "before", "after"}``. The graph
    describes the model as it was; build a new one before pruning again.
    """
    modules = graph.modules_of(model)
    changes = []
    cutter = _Cutter()
    removals = removals_for(graph, unit_ids)
    for (name, role), drop in sorted(removals.items(), key=lambda item: (-item[0][0].count("."), item[0][0],
                                                                          item[0][1] != "out", item[0][1])):
        size = len(graph.axes[(name, role)])
        _cut(name, modules[name], role, drop, size, cutter)
        changes.append({"layer": name, "axis": role, "before": int(size), "after": int(size - len(drop))})
    return sorted(changes, key=lambda row: (row["layer"], row["axis"]))
