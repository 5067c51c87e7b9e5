"""Sizes read at run time: ``B, N, C = x.shape`` where ``C`` counts pruned channels.

A forward that reads the size of a channel dim and uses it elsewhere
(``self.qkv(x).reshape(B, N, 3, heads, C // heads)`` in an attention block, ``reshape(B, N, C)``
after it) changes meaning when those channels are pruned, even where every op the tensors pass
through is understood. The builder therefore follows such sizes:

- ``x.shape`` / ``x.size()`` of an annotated tensor is a :class:`ShapeOf` (one :class:`SizeOf`,
  or None, per dim), ``x.size(d)`` and ``x.shape[d]`` a :class:`SizeOf` carrying the slots of
  that dim (``exact``: it *is* the channel count);
- integer arithmetic on them (``C // heads``, ``C * 2``) is a :class:`SizeOf` that is no longer exact;
- a size used as a target dim of ``view``/``reshape``/``expand`` that is the channel dim of
  the result, exactly, *unites* the result's channels with the ones it counts (the two counts
  stay equal after pruning: ``reshape(B, N, C)`` after attention ties the attention output to
  the residual stream);
- every other use (a size divided into heads, a size given to ``torch.zeros``, a slice bound,
  ``C ** -0.5`` as a scale, an ``_assert``) keeps the channels it counts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimkit.prune.graph.core import Ann, distinct

if TYPE_CHECKING:
    from slimkit.prune.graph.builder import Builder


@dataclass(frozen=True)
class SizeOf:
    """An int computed from the size of channel dims: ``slots`` (1-D) are the channels it counts.

    ``exact``: the value is the size of one channel dim, unchanged (``slots`` are that dim's, in order).
    """

    slots: np.ndarray
    exact: bool

    def __hash__(self) -> int:  # frozen dataclass with an array: identity is enough
        return id(self)


@dataclass(frozen=True)
class ShapeOf:
    """A ``torch.Size`` read from an annotated tensor: per dim, a :class:`SizeOf` or None."""

    parts: tuple[SizeOf | None, ...]


def run_time_shape(ann: Ann, ndim: int) -> ShapeOf:
    """The run-time shape of a tensor with annotation ``ann`` and ``ndim`` dims."""
    parts: list[SizeOf | None] = [None] * ndim
    flat = ann.slots.reshape(-1)
    for d in ann.dims:
        parts[d] = SizeOf(flat, True) if len(ann.dims) == 1 else SizeOf(distinct(flat), False)
    return ShapeOf(tuple(parts))


def _is_size(value: Any) -> bool:
    return isinstance(value, (SizeOf, ShapeOf))


def _counted(value: Any) -> list[np.ndarray]:
    """Slots counted by a size value (nested in lists, tuples, slices)."""
    if isinstance(value, SizeOf):
        return [value.slots]
    if isinstance(value, ShapeOf):
        return [p.slots for p in value.parts if p is not None]
    return []


def _walk(arg: Any, env: dict[str, Any], out: list[Any]) -> None:
    if isinstance(arg, torch.fx.Node):
        value = env.get(arg.name)
        if _is_size(value):
            out.append(value)
    elif isinstance(arg, (list, tuple)):
        for a in arg:
            _walk(a, env, out)
    elif isinstance(arg, dict):
        for a in arg.values():
            _walk(a, env, out)
    elif isinstance(arg, slice):
        for a in (arg.start, arg.stop, arg.step):
            _walk(a, env, out)


def size_args(node: torch.fx.Node, env: dict[str, Any]) -> list[Any]:
    """The size values among a node's arguments (anywhere inside them)."""
    out: list[Any] = []
    _walk(node.args, env, out)
    _walk(node.kwargs, env, out)
    return out


_RESHAPES = {"view", "reshape", torch.reshape, "expand", "broadcast_to", torch.broadcast_to}


def _target_dims(node: torch.fx.Node, env: dict[str, Any]) -> list[Any] | None:
    """Per output dim of a reshape-like call, what its size was written as (a value, an int), or None."""
    target = node.target
    if node.op not in ("call_method", "call_function") or target not in _RESHAPES:
        return None
    args = list(node.args[1:]) or list(node.kwargs.get("shape", node.kwargs.get("size", ())) or ())
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    if len(args) == 1 and isinstance(args[0], torch.fx.Node) and isinstance(env.get(args[0].name), ShapeOf):
        return list(env[args[0].name].parts)
    return [env.get(a.name) if isinstance(a, torch.fx.Node) else a for a in args]


def track(builder: Builder, node: torch.fx.Node, env: dict[str, Any]) -> Any:
    """The value of ``node`` once run-time sizes are accounted for (called after its rule ran).

    Returns ``env[node.name]`` (possibly a new size value); records unions and fixes.
    """
    value = env.get(node.name)
    if node.op not in ("call_function", "call_method", "call_module") or _is_size(value):
        return value
    if not any(isinstance(env.get(a.name), (SizeOf, ShapeOf)) for a in node.all_input_nodes):
        return value
    sizes = size_args(node, env)
    if not sizes:
        return value
    out_shape = builder.shape_of(node)  # a torch.Size value is recorded as a list of Nones
    tensor = isinstance(out_shape, tuple) or isinstance(out_shape, list) and any(s is not None for s in out_shape)
    if node.op != "call_module" and not tensor and node.target is not torch._assert:
        # integer arithmetic on sizes, or an index into a shape
        if node.target is operator.getitem and isinstance(sizes[0], ShapeOf) and node.args[0] is not None:
            idx = node.args[1]
            parts = sizes[0].parts
            if isinstance(idx, int) and -len(parts) <= idx < len(parts):
                return parts[idx]
            if isinstance(idx, slice) and all(isinstance(v, (int, type(None))) for v in (idx.start, idx.stop,
                                                                                           idx.step)):
                return ShapeOf(parts[idx])
        counted = [s for v in sizes for s in _counted(v)]
        return SizeOf(distinct(np.concatenate(counted)), False) if counted else None
    reason = f"{node.name}: uses the size of pruned channels"
    dims = _target_dims(node, env)
    if dims is not None:
        out = value if isinstance(value, Ann) else None
        accepted = node.meta.get("slimkit_split", ())  # a split the reshape rule checked
        for j, d in enumerate(dims):
            if not _is_size(d) or j in accepted:
                continue
            if (isinstance(d, SizeOf) and d.exact and out is not None and out.dims == (j,)
                    and len(out.slots) == len(d.slots)):
                builder.uf.union_arrays(out.slots, d.slots)
                continue
            for s in _counted(d):
                builder.uf.fix(s, reason)
            if out is not None and j in out.dims:
                builder.uf.fix(out.slots, reason)
        return value
    for v in sizes:
        for s in _counted(v):
            builder.uf.fix(s, reason)
    return value
