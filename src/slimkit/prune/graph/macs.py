"""MACs from the traced graph: :func:`slimkit.measure.count_macs`'s figure from one run on meta tensors.

``count_macs`` runs the model and calls each layer's MAC rule from a forward hook; when every
layer with a rule is a leaf of the fx trace, the same rules applied to the nodes of a meta
run (shapes only, shape-preserving layers skipped) give the same count for a fraction of a
real forward. The traced graph shares the model's modules, so it also counts the model after
surgery. Anything else (a layer with a rule that fx traced through, an op without a meta
kernel, a shape the graph baked in that no longer fits) returns None: count for real.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.prune.graph.core import ChannelGraph, evaluating
from slimkit.prune.graph.trace import _SHAPE_ARITHMETIC, TensorShape, _ShapeProp, on_meta


class _Counter(_ShapeProp):
    shortcut = True

    def __init__(self, gm: torch.fx.GraphModule, ruled: dict[str, Any]) -> None:
        super().__init__(gm)
        self.ruled = ruled
        self.macs = 0

    def run_node(self, n: torch.fx.Node) -> Any:
        rule = self.ruled.get(n.target) if n.op == "call_module" else None
        if rule is None:
            return super().run_node(n)
        module = self.module.get_submodule(n.target)
        args, _ = self.fetch_args_kwargs_from_env(n)
        if type(module) in _SHAPE_ARITHMETIC:  # its output shape is computed, not run
            out = super().run_node(n)
        else:
            self.shortcut = False  # a layer with a MAC rule always runs
            try:
                out = super().run_node(n)
            finally:
                self.shortcut = True
        self.macs += int(rule(module, args, out))
        return out


def _meta_of(value: Any) -> Any:
    """An empty meta tensor of a recorded ``TensorShape`` (None for anything else)."""
    return torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, TensorShape) else None


def _recorded_macs(gm: torch.fx.GraphModule, ruled: dict[str, Any]) -> int | None:
    """The MAC rules applied to the shapes the trace recorded (the model as traced), or None."""
    total = 0
    for n in gm.graph.nodes:
        rule = ruled.get(n.target) if n.op == "call_module" else None
        if rule is None:
            continue
        out = _meta_of(n.meta.get("tensor_meta"))
        args = tuple(_meta_of(a.meta.get("tensor_meta")) if isinstance(a, torch.fx.Node) else a for a in n.args)
        if out is None or any(a is None for a in args):
            return None
        total += int(rule(gm.get_submodule(n.target), args, out))
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
    if not set(ruled) <= {n.target for n in gm.graph.nodes if n.op == "call_module"}:
        return None
    try:
        with evaluating(model), torch.no_grad(), on_meta(gm):
            macs = _recorded_macs(gm, ruled) if recorded else None
            if macs is None:
                counter = _Counter(gm, ruled)
                counter.extra_traceback = False
                counter.run(example_inputs.to("meta"))
                macs = counter.macs
        return macs
    except Exception:  # see the module docstring: count for real
        return None
