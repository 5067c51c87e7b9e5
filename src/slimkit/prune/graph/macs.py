"""MACs from the traced graph: :func:`slimkit.measure.count_macs`'s figure without a real forward.

``count_macs`` runs the model and calls each layer's MAC rule from a forward hook; when every
call of a layer with a rule is found in the fx trace (a leaf, or a traced-through forward with
one input and one output), the same rules applied to the right shapes give the same count:

- on the model as traced, the shapes the trace recorded (no run at all);
- after surgery, on a graph whose every op keeps channels on dim 1 and leaves the other dims
  alone (convs, linears on ``[N, F]``, BatchNorm, element-wise activations and arithmetic,
  spatial pooling and means, ``cat`` on dim 1, ``flatten(1)``: :func:`fixed_layout`), the
  recorded shapes with each conv's and linear's channel counts read from the cut layer (no run;
  the forward check is :func:`slimkit.prune.graph.check.channel_mismatch`, every layer's input
  channels against the counts flowing into it, and a mismatch goes to the run below);
- otherwise from one run of the graph on meta tensors (shapes only, shape-preserving layers
  skipped), which is also the check that the cut model's forward still runs (a graph with a
  size the cut may break is never on the first two paths).

The traced graph shares the model's modules, so it also counts the model after surgery; a
graph from the cache (a deep copy of a traced model) has only its recorded shapes
(``graph.recorded``): the first two paths. Anything else (a call that cannot be found, an op
without a meta kernel, a shape the graph baked in that no longer fits) returns None: count for real.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.prune.graph import rules
from slimkit.prune.graph.check import BINARY, CONVS, channel_mismatch
from slimkit.prune.graph.core import ChannelGraph, evaluating
from slimkit.prune.graph.trace import _SHAPE_ARITHMETIC, TensorShape, _ShapeProp, norm_act_leaf, on_meta
from slimkit.tracing import baked_sizes

#: node -> (layer, its inputs): the node's value is the output of one call of a layer with a MAC rule
Calls = dict[torch.fx.Node, tuple[str, tuple[Any, ...]]]


class _Counter(_ShapeProp):
    shortcut = True
    record = False

    def __init__(self, gm: torch.fx.GraphModule, model: nn.Module, ruled: dict[str, Any], calls: Calls) -> None:
        super().__init__(gm, garbage_collect_values=False)  # meta tensors
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


def _shape_rules() -> frozenset:
    """The built-in MAC rules: they read only ``numel()`` of their tensors, so a shape stands in for them."""
    from slimkit.measure.macs import bilinear_macs, conv_macs, conv_transpose_macs, linear_macs

    return frozenset({conv_macs, conv_transpose_macs, linear_macs, bilinear_macs})


def _stand_in(value: Any, by_shape: bool) -> Any:
    """What a MAC rule gets for a recorded ``TensorShape``: the shape itself (``by_shape``) or an empty meta tensor."""
    if not isinstance(value, TensorShape):
        return None
    if by_shape:
        from slimkit.measure.macs import ShapeOnly

        return ShapeOnly(value.shape)
    return _meta_of(value)


def _recorded_macs(modules: dict[str, nn.Module], ruled: dict[str, Any], calls: Calls) -> int | None:
    """The MAC rules applied to the shapes the trace recorded (the model as traced), or None."""
    total = 0
    by_shape = _shape_rules()
    for n, (name, spec) in calls.items():
        rule = ruled[name]
        quick = rule in by_shape
        out = _stand_in(n.meta.get("tensor_meta"), quick)
        args = tuple(_stand_in(a.meta.get("tensor_meta"), quick) if isinstance(a, torch.fx.Node) else a for a in spec)
        if out is None or any(a is None for a in args):
            return None
        total += int(rule(modules[name], args, out))
    return total


# -- graphs whose layout a cut cannot change ---------------------------------------------------

#: exact classes that act on dim 1 as channels and leave the other dims as they are (Flatten: see below)
_LAYOUT_MODULES = frozenset({*CONVS, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                             nn.AdaptiveMaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d,
                             nn.MaxPool2d, nn.MaxPool3d})
_POOL_FUNCTIONS = frozenset({F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d,
                             F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d})


def _flattens_from_1(args: tuple, kwargs: dict) -> bool:
    """``flatten(x, 1)`` (to ``[N, rest]``), in any spelling."""
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    return start == 1 and end == -1 and set(kwargs) <= {"start_dim", "end_dim"}


def _spatial_mean(n: torch.fx.Node) -> bool:
    """``x.mean(dims[, keepdim])`` over dims that are neither the batch nor the channels."""
    shape = n.args[0].meta.get("tensor_meta") if n.args and isinstance(n.args[0], torch.fx.Node) else None
    if not isinstance(shape, TensorShape) or len(n.args) not in (2, 3) or not set(n.kwargs) <= {"keepdim"}:
        return False
    dims = n.args[1]
    dims = [dims] if isinstance(dims, int) else dims
    ndim = len(shape.shape)
    return (isinstance(dims, (list, tuple)) and bool(dims)
            and all(type(d) is int and -ndim <= d < ndim and d % ndim >= 2 for d in dims))


def _is_pass(entry: rules.RuleEntry | None) -> bool:
    return entry is not None and entry.fn is rules._pass


def _keeps_layout(n: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether node ``n`` is an op of :func:`fixed_layout`'s list."""
    op, target = n.op, n.target
    if op in ("placeholder", "output"):
        return True
    if op == "get_attr":  # read by traced-through linears only
        return all(u.op == "call_function" and u.target is F.linear for u in n.users)
    if op == "call_module":
        m = modules.get(target)
        if m is None:
            return False
        if type(m) is nn.Flatten:
            return m.start_dim == 1 and m.end_dim == -1
        return (type(m) in _LAYOUT_MODULES or norm_act_leaf(m)
                or (_is_pass(rules.module_rule(type(m), exact=True)) and type(m).__module__.startswith("torch.nn.")))
    tensors = [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.fx.Node)]
    if op == "call_method":
        if target == "mean":
            return _spatial_mean(n)
        if target == "flatten":
            return _flattens_from_1(n.args, n.kwargs)
        return _is_pass(rules.method_rule(target)) and all(a.op != "get_attr" for a in tensors)
    if op != "call_function":
        return False
    if target in BINARY:
        return len(n.args) == 2 and not n.kwargs and all(
            isinstance(a, (int, float)) and type(a) is not bool or isinstance(a, torch.fx.Node) and a.op != "get_attr"
            for a in n.args)
    if target is torch.flatten:
        return _flattens_from_1(n.args, n.kwargs)
    if target is torch.cat:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        return dim == 1 and isinstance(n.args[0], (list, tuple)) and all(
            isinstance(a, torch.fx.Node) and a.op != "get_attr" for a in n.args[0])
    if target is F.linear:
        shape = n.args[0].meta.get("tensor_meta") if n.args and isinstance(n.args[0], torch.fx.Node) else None
        return isinstance(shape, TensorShape) and len(shape.shape) == 2 and all(
            a.op == "get_attr" for a in tensors[1:])
    if target in _POOL_FUNCTIONS:
        return all(a.op != "get_attr" for a in tensors)
    return _is_pass(rules.function_rule(target)) and all(a.op != "get_attr" for a in tensors)


def fixed_layout(gm: torch.fx.GraphModule, model: nn.Module | dict[str, nn.Module]) -> bool:
    """Every op of the graph keeps channels on dim 1 and leaves the other dims of every tensor alone.

    The ops: the input and output; convs; linears on ``[N, F]`` (modules, or ``F.linear`` on
    parameters); BatchNorm and the norm-act leaves; activations, dropout and other element-wise
    layers, functions and methods (the ``pass`` channel rule) and arithmetic between activations
    and numbers; spatial pooling and ``mean`` over dims >= 2; ``cat`` on dim 1; ``flatten(1)``.
    A cut of such a model changes the channel counts and nothing else, so every layer's input and
    output shape after the cut is the recorded one with those counts (see :func:`kept_macs`). Not
    for graphs with sizes baked in by the meta tracer. ``model``: the model, or its ``named_modules``
    as a dict. Computed once per graph (the graph's structure is the model's, whatever surgery did).
    """
    found = gm.meta.get("slimkit_fixed_layout")
    if found is None:
        modules = model if isinstance(model, dict) else dict(model.named_modules())
        found = not baked_sizes(gm) and all(_keeps_layout(n, modules) for n in gm.graph.nodes)
        gm.meta["slimkit_fixed_layout"] = found
    return found


def _cut_shapes(m: nn.Module, rule: Any, spec: tuple[Any, ...], out: Any) -> tuple[tuple, tuple] | None:
    """(input, output) shapes of one call of a conv or linear after the cut, from the recorded ones."""
    from slimkit.measure.macs import conv_macs, linear_macs

    shape_in = spec[0].meta.get("tensor_meta") if len(spec) == 1 and isinstance(spec[0], torch.fx.Node) else None
    if not isinstance(shape_in, TensorShape) or not isinstance(out, TensorShape):
        return None
    a, b = shape_in.shape, out.shape
    if rule is conv_macs and type(m) in CONVS and len(a) == len(b) == len(m.kernel_size) + 2:
        return (a[0], m.in_channels, *a[2:]), (b[0], m.out_channels, *b[2:])
    if rule is linear_macs and isinstance(m, nn.Linear) and len(a) == len(b) == 2:
        return (a[0], m.in_features), (b[0], m.out_features)
    return None


def kept_macs(gm: torch.fx.GraphModule, modules: dict[str, nn.Module], ruled: dict[str, Any],
              calls: Calls) -> int | None:
    """The MACs of a model after a cut, from the recorded shapes and the cut layers' channel counts.

    ``modules``: the model's ``named_modules`` as a dict.

    None unless the graph has a :func:`fixed_layout` and every layer with a MAC rule is a conv or
    a linear on ``[N, F]``.
    """
    from slimkit.measure.macs import ShapeOnly

    if not fixed_layout(gm, modules) or channel_mismatch(gm, modules) is not None:
        return None  # a cut that no longer fits is left to the run, which fails where the forward would
    total = 0
    for n, (name, spec) in calls.items():
        m, rule = modules[name], ruled[name]
        shapes = _cut_shapes(m, rule, spec, n.meta.get("tensor_meta"))
        if shapes is None:
            return None
        total += int(rule(m, (ShapeOnly(shapes[0]),), ShapeOnly(shapes[1])))  # conv_macs / linear_macs read numel()
    return total


def _ruled(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> dict[str, Any]:
    """Layer name -> MAC rule for every layer :func:`slimkit.measure.count_macs` counts with a rule.

    Once per graph and rule table: surgery keeps every module's class, and a model another graph
    of the cache is shared with has the same classes at the same names.
    """
    from slimkit.measure.macs import MAC_RULES, mac_units, rule_for

    table = tuple(MAC_RULES.items())
    memo = gm.meta.get("slimkit_mac_ruled")
    if memo is None or memo[0] != table:
        model = modules[""]
        memo = (table, {name: rule for name, m in mac_units(model) if (rule := rule_for(m)) is not None})
        gm.meta["slimkit_mac_ruled"] = memo
    return memo[1]


def _calls_of(gm: torch.fx.GraphModule, ruled: dict[str, Any]) -> Calls | None:
    """:func:`_calls`, once per graph and set of layers with a MAC rule (the names do not change under surgery)."""
    key = tuple(ruled)
    memo = gm.meta.get("slimkit_mac_calls")
    if memo is None or memo[0] != key:
        memo = (key, _calls(gm, ruled))
        gm.meta["slimkit_mac_calls"] = memo
    return memo[1]


def traced_macs(graph: ChannelGraph, model: nn.Module, example_inputs: torch.Tensor,
                recorded: bool = False) -> int | None:
    """``count_macs(model, example_inputs)`` from the traced graph, or None where it may differ.

    ``recorded``: the model is still as traced (no surgery since): the MAC rules read the
    shapes the trace recorded. Otherwise :func:`kept_macs` where the layout is fixed, else a run
    of ``graph.traced`` on meta tensors (not for a graph from the cache: its GraphModule calls
    another model's modules). See the module docstring.
    """
    live = graph.traced
    gm = live if live is not None else graph.recorded
    if gm is None:
        return None
    modules = graph.modules_of(model)
    try:
        ruled = _ruled(gm, modules)
        calls = _calls_of(gm, ruled)
        if calls is None:
            return None
        with torch.no_grad():
            macs = _recorded_macs(modules, ruled, calls) if recorded else kept_macs(gm, modules, ruled, calls)
        if macs is None and live is not None:
            with evaluating(model), torch.no_grad(), on_meta(gm):
                counter = _Counter(gm, model, ruled, calls)
                counter.extra_traceback = False
                counter.run(example_inputs.to("meta"))
                macs = counter.macs
        return macs
    except Exception:  # see the module docstring: count for real
        return None
