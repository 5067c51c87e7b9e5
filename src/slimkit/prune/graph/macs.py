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

from slimkit.prune.graph.core import ChannelGraph
from slimkit.prune.graph.trace import _ShapeProp, on_meta


class _Counter(_ShapeProp):
    shortcut = True

    def __init__(self, gm: torch.fx.GraphModule, ruled: dict[str, Any]) -> None:
        super().__init__(gm)
        self.ruled = ruled
        self.macs = 0

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        out = super().call_module(target, args, kwargs)
        rule = self.ruled.get(target)
        if rule is not None:
            self.macs += int(rule(self.module.get_submodule(target), args, out))
        return out

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_module" and n.target in self.ruled:
            self.shortcut = False  # a layer with a MAC rule always runs
            try:
                return super().run_node(n)
            finally:
                self.shortcut = True
        return super().run_node(n)


def traced_macs(graph: ChannelGraph, model: nn.Module, example_inputs: torch.Tensor) -> int | None:
    """``count_macs(model, example_inputs)`` from a meta run of ``graph.traced``, or None where it may differ."""
    from slimkit.measure.macs import mac_units, rule_for

    gm = graph.traced
    if gm is None:
        return None
    ruled = {name: rule_for(m) for name, m in mac_units(model) if rule_for(m) is not None}
    if not set(ruled) <= {n.target for n in gm.graph.nodes if n.op == "call_module"}:
        return None
    was_training = model.training
    model.eval()
    try:
        counter = _Counter(gm, ruled)
        counter.extra_traceback = False
        with torch.no_grad(), on_meta(gm):
            counter.run(example_inputs.to("meta"))
        return counter.macs
    except Exception:  # see the module docstring: count for real
        return None
    finally:
        model.train(was_training)
