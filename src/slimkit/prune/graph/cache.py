"""The graph cache: the last few graphs built, keyed by the structure of the model.

A deep copy of a traced model (one step of a ratio search) reuses its graph; any change
surgery makes (channel counts, parameter shapes, replaced modules) changes the key.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from slimkit.prune.graph.core import ChannelGraph, Group, Unit, UnitTable

_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_SKIPPED_ATTRS = {"training", "_parameters", "_buffers", "_modules"}
#: the tables every nn.Module has (hooks, ...): left out of the key while empty (a hook added shows)
_MODULE_TABLES = frozenset(k for k, v in vars(nn.Module()).items() if isinstance(v, (dict, set)))


_ATOM_TYPES = frozenset(_ATOMS)
_EMPTY = {dict: ("dict", ()), OrderedDict: ("dict", ()), set: ("set", frozenset()), list: ("list", ()),
          tuple: ("tuple", ())}


def _freeze(value: Any, depth: int = 0) -> Any:
    """Hashable stand-in for a module attribute: values for data, identities for objects."""
    kind = type(value)
    if kind in _ATOM_TYPES:  # the common cases first, by exact type (subclasses take the general path)
        return value
    if kind in _EMPTY and not value:  # an unused hook table, an empty list
        return _EMPTY[kind]
    if kind is tuple and all(type(v) in _ATOM_TYPES for v in value):
        return ("tuple", value)
    if isinstance(value, _ATOMS):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if depth < 8:
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(_freeze(v, depth + 1) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple((_freeze(k, depth + 1), _freeze(v, depth + 1)) for k, v in value.items()))
        if isinstance(value, (set, frozenset)):
            return ("set", frozenset(_freeze(v, depth + 1) for v in value))
        if isinstance(value, functools.partial):
            return ("partial", _freeze(value.func, depth + 1), _freeze(value.args, depth + 1),
                    _freeze(value.keywords, depth + 1))
    return ("object", type(value).__qualname__, id(value))


def _tensors(table: dict[str, torch.Tensor | None]) -> tuple:
    return tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in table.items())


def structure_key(model: nn.Module, example_inputs: torch.Tensor, *options: Any,
                  modules: dict[str, nn.Module] | None = None) -> tuple:
    """Hashable summary of everything the channel graph of ``model`` depends on.

    The module tree; every module's class and its ``forward``, attributes (hooks included)
    and parameter and buffer shapes; the input's shape, dtype and device; the build ``options``
    (``on_unsupported``, ``norm_channels``, the rule table's version).
    Two models with equal keys (a model and its deep copy) trace to the same graph; any
    change surgery makes (channel counts, parameter shapes, replaced modules) changes the key.
    Weights' values are not part of it; attributes that are neither data nor tensors count
    by identity. ``modules``: ``dict(model.named_modules())`` when the caller has it.
    """
    parts: list[Any] = [*options, tuple(example_inputs.shape), example_inputs.dtype,
                        example_inputs.device.type]
    for name, m in (model.named_modules() if modules is None else modules.items()):
        attrs = tuple((k, _freeze(v)) for k, v in vars(m).items()
                      if k not in _SKIPPED_ATTRS and not (k in _MODULE_TABLES and not v))
        parts.append((name, type(m), type(m).forward, attrs, _tensors(m._parameters), _tensors(m._buffers)))
    return tuple(parts)


class _GraphCache:
    """The last few graphs built, by :func:`structure_key`; hands out fresh containers only."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: OrderedDict[tuple, ChannelGraph] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> ChannelGraph | None:
        with self.lock:
            graph = self.entries.get(key)
            if graph is None:
                return None
            self.entries.move_to_end(key)
        return _share(graph)

    def put(self, key: tuple, graph: ChannelGraph) -> None:
        entry = _share(graph)
        with self.lock:
            self.entries[key] = entry
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


def _share(graph: ChannelGraph) -> ChannelGraph:
    """Copy of ``graph`` with its own dicts, lists, units and groups; the read-only arrays are shared."""
    return ChannelGraph(
        dict(graph.axes),
        graph.units.fresh() if isinstance(graph.units, UnitTable)
        else {uid: Unit(uid, dict(u.members), u.producers) for uid, u in graph.units.items()},
        [Group(g.name, g.producers, list(g.units), g.partitions and [list(p) for p in g.partitions])
         for g in graph.groups],
        dict(graph.fixed_reasons), list(graph.warnings),
        recorded=graph.traced if graph.traced is not None else graph.recorded,
    )


_CACHE = _GraphCache()


def clear_graph_cache() -> None:
    """Forget every cached graph (the next :func:`build_graph` traces again)."""
    _CACHE.clear()
