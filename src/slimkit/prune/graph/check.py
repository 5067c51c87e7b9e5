"""The forward check without a forward: channel counts of a cut model along a graph of fixed layout.

A cut of a model whose every op keeps channels on dim 1 (:func:`slimkit.prune.graph.macs.fixed_layout`)
changes channel counts and nothing else, so whether the cut model still runs comes down to
each layer receiving as many channels as it now expects. :func:`channel_mismatch` walks the
traced graph once with one integer per node (the size of dim 1, from the cut layers' own
counts and the recorded shapes), in microseconds a node, where a run on meta tensors costs
milliseconds a layer. It reads the graph's modules as they are after surgery.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: the convs and the binary arithmetic of :func:`slimkit.prune.graph.macs.fixed_layout`'s op list
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BINARY = frozenset({operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub})


def _recorded(n: Any) -> tuple[int, ...] | None:
    meta = n.meta.get("tensor_meta") if isinstance(n, torch.fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _flatten_from_1(n: torch.fx.Node, channels: int) -> int | None:
    """``flatten(x, 1)``: the channels times the recorded sizes of the other dims (which a cut leaves)."""
    shape = _recorded(n.args[0]) if n.args else None
    return channels * math.prod(shape[2:]) if shape is not None and len(shape) >= 2 else None


def _layer(m: nn.Module, c: int | None, name: str) -> tuple[int | None, str | None]:
    """(channels out, or a mismatch) of one layer of the fixed-layout list receiving ``c`` channels."""
    if isinstance(m, CONVS):
        if c is not None and c != m.in_channels:
            return None, f"{name} expects {m.in_channels} input channels and receives {c}"
        if m.in_channels % m.groups or m.out_channels % m.groups:
            return None, f"{name}: {m.in_channels} -> {m.out_channels} channels do not divide into {m.groups} groups"
        return m.out_channels, None
    if isinstance(m, nn.Linear):
        if c is not None and c != m.in_features:
            return None, f"{name} expects {m.in_features} input features and receives {c}"
        return m.out_features, None
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if c is not None and c != m.num_features:
            return None, f"{name} normalizes {m.num_features} channels and receives {c}"
        return c, None
    return c, None


def _attr(modules: dict[str, nn.Module], target: str) -> torch.Tensor | None:
    """The parameter or buffer ``target`` names, read from the (cut) modules."""
    owner, _, leaf = target.rpartition(".")
    m = modules.get(owner)
    value = getattr(m, leaf, None) if m is not None else None
    return value if isinstance(value, torch.Tensor) else None


def channel_mismatch(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> str | None:
    """The first layer of a fixed-layout ``gm`` whose input channels no longer fit after a cut, or None.

    ``modules``: the cut model's ``named_modules`` as a dict. Only for graphs with a
    :func:`slimkit.prune.graph.macs.fixed_layout` (the ops listed there); dim 1 of every value is
    followed as one integer per node.
    """
    count: dict[torch.fx.Node, int | None] = {}

    def of(a: Any) -> int | None:
        return count.get(a) if isinstance(a, torch.fx.Node) else None

    for n in gm.graph.nodes:
        tensors = [a for a in n.args if isinstance(a, torch.fx.Node)]
        first = of(tensors[0]) if tensors else None
        out: int | None = first
        if n.op == "placeholder":
            shape = _recorded(n)
            out = shape[1] if shape is not None and len(shape) >= 2 else None
        elif n.op in ("get_attr", "output"):
            out = None
        elif n.op == "call_module":
            m = modules.get(n.target)
            if isinstance(m, nn.Flatten):
                out = _flatten_from_1(n, first) if first is not None else None
            elif m is not None:
                out, bad = _layer(m, first, n.target)
                if bad is not None:
                    return bad
        elif n.target in ("flatten",) or n.target is torch.flatten:
            out = _flatten_from_1(n, first) if first is not None else None
        elif n.target is torch.cat:
            parts = [of(a) for a in n.args[0]] if n.args and isinstance(n.args[0], (list, tuple)) else []
            out = sum(parts) if parts and all(p is not None for p in parts) else None
        elif n.target in BINARY:
            sizes = {c for a in tensors if (c := of(a)) is not None and c != 1}
            if len(sizes) > 1:
                return f"{n.name}: {n.target.__name__} of tensors with {sorted(sizes)} channels"
            out = sizes.pop() if sizes else first
        elif n.target is F.linear:
            weight = tensors[1] if len(tensors) > 1 else None
            w = _attr(modules, weight.target) if weight is not None and weight.op == "get_attr" else None
            if w is None:
                out = None
            elif first is not None and first != w.shape[1]:
                return f"{n.name}: weight {weight.target} expects {w.shape[1]} input features and receives {first}"
            else:
                out = w.shape[0]
        count[n] = out
    return None
