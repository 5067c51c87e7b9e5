"""MACs from the traced graph: :func:`slimkit.measure.count_macs`'s figure from one run on meta tensors.

``count_macs`` runs the model and calls each layer's MAC rule from a forward hook; when every
call of a layer with a rule is found in the fx trace (a leaf, or a traced-through forward with
one input and one output), the same rules applied to the nodes of a meta run (shapes only,
shape-preserving layers skipped) give the same count for a fraction of a real forward; on the
model as traced, the shapes the trace recorded give it with no run at all. The traced graph
shares the model's modules, so it also counts the model after surgery. Anything else (a call
that cannot be found, an op without a meta kernel, a shape the graph baked in that no longer
fits) returns None: count for real.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.prune.graph.core import ChannelGraph, evaluating
from slimkit.prune.graph.trace import _SHAPE_ARITHMETIC, TensorShape, _ShapeProp, on_meta

#: node -> (layer, its inputs): the node's value is the output of one call of a layer with a MAC rule
Calls = dict[torch.fx.Node, tuple[str, tuple[Any, ...]]]


class _Counter(_ShapeProp):
    shortcut = True
    record = False

    def __init__(self, gm: torch.fx.GraphModule, model: nn.Module, ruled: dict[str, Any], calls: Calls) -> None:
        super().__init__(gm)
        self.model, self.ruled, self.calls = model, ruled, calls
        self.macs = 0

    def run_node(self, n: torch.fx.Node) -> Any:
        call = self.calls.get(n)
        if call is None:
            return super().run_node(n)
        module = self.model.get_submodule(call[0])  # a traced-through layer is not in the GraphModule
        if n.op != "call_module" or type(module) in _SHAPE_ARITHMETIC:  # its output shape is computed, not run
            out = super().run_node(n)
        else:
            self.shortcut = False  # a layer with a MAC rule always runs
            try:
                out = super().run_node(n)
            finally:
                self.shortcut = True
        args = tuple(self.env[a] if isinstance(a, torch.fx.Node) else a for a in call[1])
        self.macs += int(self.ruled[call[0]](module, args, out))
        return out


def _module_of(n: torch.fx.Node, names: set[str]) -> str | None:
    """The layer of ``names`` whose traced-through forward created ``n`` (from fx's ``nn_module_stack``)."""
    for key, value in (n.meta.get("nn_module_stack") or {}).items():
        path = value[0] if isinstance(value, tuple) else key
        if path in names:
            return path
    return None


def _calls(gm: torch.fx.GraphModule, ruled: dict[str, Any]) -> Calls | None:
    """Where every call of a layer with a MAC rule ends in the graph, or None when one cannot be found.

    A layer that is a leaf is its ``call_module`` node. One that fx traced through (timm's
    ``Linear``, an ``nn.Linear`` subclass that calls ``F.linear``) is a run of consecutive nodes
    from its forward: one tensor comes in, the last node's value is the only one used outside.
    """
    nodes = list(gm.graph.nodes)
    calls: Calls = {n: (n.target, tuple(n.args)) for n in nodes if n.op == "call_module" and n.target in ruled}
    inner = set(ruled) - {name for name, _ in calls.values()}
    spans: list[tuple[str, list[torch.fx.Node]]] = []
    for n in nodes if inner else ():
        name = _module_of(n, inner) if n.op not in ("placeholder", "output") else None
        if name is None:
            continue
        if spans and spans[-1][0] == name and spans[-1][1][-1].next is n:
            spans[-1][1].append(n)
        else:
            spans.append((name, [n]))
    for name, span in spans:
        inside = set(span)
        inputs = {a for x in span for a in x.all_input_nodes if a not in inside and a.op != "get_attr"}
        if len(inputs) != 1 or any(u not in inside for x in span[:-1] for u in x.users):
            return None
        calls[span[-1]] = (name, tuple(inputs))
    found = {name for name, _ in calls.values()}
    return calls if found == set(ruled) else None


def _meta_of(value: Any) -> Any:
    """An empty meta tensor of a recorded ``TensorShape`` (None for anything else)."""
    return torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, TensorShape) else None


def _recorded_macs(model: nn.Module, ruled: dict[str, Any], calls: Calls) -> int | None:
    """The MAC rules applied to the shapes the trace recorded (the model as traced), or None."""
    total = 0
    for n, (name, spec) in calls.items():
        out = _meta_of(n.meta.get("tensor_meta"))
        args = tuple(_meta_of(a.meta.get("tensor_meta")) if isinstance(a, torch.fx.Node) else a for a in spec)
        if out is None or any(a is None for a in args):
            return None
        total += int(ruled[name](model.get_submodule(name), args, out))
    return total


def traced_macs(graph: ChannelGraph, model: nn.Module, example_inputs: torch.Tensor,
                recorded: bool = False) -> int | None:
    """``count_macs(model, example_inputs)`` from a meta run of ``graph.traced``, or None where it may differ.

    ``recorded``: the model is still as traced (no surgery since): the MAC rules read the
    shapes the trace recorded, with no run at all.
    """
    from slimkit.measure.macs import mac_units, rule_for

    gm = graph.traced
    if gm is None:
        return None
    ruled = {name: rule_for(m) for name, m in mac_units(model) if rule_for(m) is not None}
    calls = _calls(gm, ruled)
    if calls is None:
        return None
    try:
        with evaluating(model), torch.no_grad(), on_meta(gm):
            macs = _recorded_macs(model, ruled, calls) if recorded else None
            if macs is None:
                counter = _Counter(gm, model, ruled, calls)
                counter.extra_traceback = False
                counter.run(example_inputs.to("meta"))
                macs = counter.macs
        return macs
    except Exception:  # see the module docstring: count for real
        return None
