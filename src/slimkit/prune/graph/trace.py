"""Tracing: the fx graph of a model and the shape of every node's value on the example inputs.

The graph comes from :func:`slimkit.tracing.trace_model` (the one tracing helper, with its
fallback order: symbolic, then fx's meta tracer on a meta-device copy for a forward with
shape-dependent control flow). Modules are leaves of the trace when fx keeps them whole (the
``torch.nn`` layers) or when their class has a channel rule of its own
(:func:`slimkit.prune.graph.register_channel_rule`); every other module is traced through, so
a subclass that calls the functional form (``F.batch_norm(x, self.running_mean, ...)`` in
timm's ``BatchNormAct2d``) reaches the function rules. A submodule whose forward fx cannot
trace (data-dependent control flow, ``len`` of a proxy: the helper's ``"opaque"`` step finds
them by tracing, innermost first) stays a leaf of the graph, named in
``gm.meta["opaque"]``: the builder keeps every channel entering and leaving it and every
parameter inside it, so the rest of the model prunes and the leaf is never cut. Shapes are
propagated on meta tensors (the parameters swapped for meta tensors of their shapes: no
arithmetic, about half the time of a real forward), and again on the real inputs when an op
needs data.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch
from torch import nn

from slimkit.exceptions import ConfigError, UnsupportedModelError
from slimkit.measure.macs import SHAPE_RULES
from slimkit.prune.graph import (
    oprules,  # noqa: F401  (the built-in rules load with the tracer that asks them)
    rules,
)
from slimkit.prune.graph.core import evaluating
from slimkit.prune.graph.rules import module_rule
from slimkit.tracing import first_line, on_meta, trace_model

#: class -> whether it has a channel rule of its own, for the rule table's version in ``[0]``
_OWN_RULE: tuple[int, dict[type, bool]] = (-1, {})


def _has_own_rule(m: nn.Module, qualname: str) -> bool:
    """Leaf rule of the channel graph: a module whose class has a channel rule of its own is kept whole,
    and so is a norm-act layer whose activation and dropout are element-wise (see :func:`norm_act_leaf`)."""
    return _own_rule(m, qualname) or norm_act_leaf(m)


def _own_rule(m: nn.Module, qualname: str) -> bool:
    """The leaf rule of the meta trace: classes with a rule of their own (a norm-act leaf calls its children)."""
    global _OWN_RULE
    if _OWN_RULE[0] != rules.VERSION[0]:  # a rule was registered since: look again
        _OWN_RULE = (rules.VERSION[0], {})
    cls = type(m)
    own = _OWN_RULE[1].get(cls)
    if own is None:
        own = _OWN_RULE[1][cls] = module_rule(cls, exact=True) is not None
    return own


#: ``forward``s known to be the forward of their BatchNorm base class followed by the ``drop`` and ``act``
#: children (timm's ``BatchNormAct2d``: a copy of ``nn.BatchNorm2d.forward`` calling ``F.batch_norm``)
NORM_ACT_FORWARDS = frozenset({"timm.layers.norm_act.BatchNormAct2d.forward"})


def _elementwise(m: nn.Module) -> bool:
    """A torch.nn layer without parameters whose channel rule is ``pass`` (an activation, dropout, identity)."""
    entry = module_rule(type(m), exact=True)
    return (entry is not None and entry.fn is rules._pass and type(m).__module__.startswith("torch.nn.")
            and not m._parameters and not m._buffers and not m._modules)


def norm_act_leaf(m: nn.Module) -> bool:
    """A norm-act layer that can be a leaf of the trace, with its BatchNorm base class's channel rule.

    Its forward is one of :data:`NORM_ACT_FORWARDS`, it is a BatchNorm, and its only children,
    ``drop`` and ``act``, are element-wise torch layers without parameters: the layer then
    computes exactly its BatchNorm's per-channel map followed by element-wise ops, which is what
    the channel graph, the shape propagation (a BatchNorm keeps its input's shape), the MAC count
    (0, as for the traced-through ``F.batch_norm``) and surgery (BatchNorm's handler, the same one
    the traced-through layer gets) assume. Traced through, it costs ~10 fx nodes (``_assert`` on
    ``x.ndim``, four ``get_attr``, ``batch_norm``, ``drop``, ``act``); as a leaf, one.
    """
    forward = getattr(type(m), "forward", None)
    if f"{getattr(forward, '__module__', '')}.{getattr(forward, '__qualname__', '')}" not in NORM_ACT_FORWARDS:
        return False
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or set(m._modules) != {"drop", "act"}:
        return False
    return all(child is not None and _elementwise(child) for child in m._modules.values())


class TensorShape(NamedTuple):
    """What the rules read of a node's value: its shape and dtype (``node.meta["tensor_meta"]``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorShape(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return [_shapes(v) for v in value]
    return None


#: layers whose output has their input's shape; on meta tensors they are not run (meta BatchNorm
#: is a slow Python decomposition)
_SAME_SHAPE_MODULES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
                       nn.Hardsigmoid, nn.Sigmoid, nn.Identity, nn.Dropout, nn.LeakyReLU, nn.PReLU)
_SAME_SHAPE_FUNCTIONS = {torch.nn.functional.batch_norm, torch.batch_norm}


def _pool_shape(m: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    size = (m.output_size,) * 2 if isinstance(m.output_size, int) else tuple(m.output_size)
    if len(shape) != 4 or len(size) != 2 or any(n == 0 for n in shape):
        return None
    return (*shape[:2], *(n if k is None else k for n, k in zip(shape[2:], size, strict=True)))


#: exact classes whose output shape follows from their attributes and the input's shape (their meta
#: kernels are Python and cost ~1 ms per call); anything unexpected runs the kernel
_SHAPE_ARITHMETIC = {**SHAPE_RULES, nn.AdaptiveAvgPool2d: _pool_shape}
_BROADCAST_FUNCTIONS = {operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub}


def _mean(args: list[Any], keepdim: Any) -> torch.Tensor | None:
    """``x.mean(dims[, keepdim])`` on a floating meta tensor, from shapes (None for any other spelling)."""
    if len(args) == 3:
        args, keepdim = args[:2], args[2]
    if len(args) != 2 or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point() or \
            not isinstance(keepdim, bool):
        return None
    x, dims = args
    dims = [dims] if isinstance(dims, int) else dims
    if not isinstance(dims, (list, tuple)) or not dims or not all(type(d) is int and -x.dim() <= d < x.dim()
                                                                  for d in dims):
        return None
    axes = {d % x.dim() for d in dims}
    if len(axes) != len(dims):
        return None
    shape = [1 if i in axes else n for i, n in enumerate(x.shape) if keepdim or i not in axes]
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _broadcast(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """``torch.broadcast_shapes`` in plain Python (its reference is ~0.3 ms a call); None where they do not fit."""
    out = [1] * max(len(s) for s in shapes)
    for s in shapes:
        for i, n in enumerate(s, len(out) - len(s)):
            if n != 1:
                if out[i] != 1 and out[i] != n:
                    return None
                out[i] = n
    return tuple(out)


class _ShapeProp(torch.fx.Interpreter):
    """Runs the graph once and records every node's shape (fx's ShapeProp, without its traceback print).

    ``shortcut`` (on meta tensors): layers that keep their input's shape return their input
    unchanged; convs, linears, adaptive pooling and broadcasting arithmetic return an empty meta
    tensor of the shape they would compute.
    """

    shortcut = False
    #: write every node's shape into ``node.meta["tensor_meta"]`` (a MAC count after surgery does
    #: not: the graph keeps the shapes of the model as traced)
    record = True

    def submodule(self, target: str) -> nn.Module:
        table = self.submodules  # fx's ``dict(module.named_modules())``
        return table[target] if target in table else self.module.get_submodule(target)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """fx's ``Interpreter.run``; on meta tensors (``shortcut``) without its progress bar and the
        freeing of values after their last use (meta tensors hold no memory), ~20 us a node less."""
        if not self.shortcut or kwargs or type(self.graph._codegen) is not torch.fx.graph.CodeGen:
            return super().run(*args, **kwargs)
        self.env = env = {}
        self.args_iter = iter(args)
        for node in self.graph.nodes:
            env[node] = self.run_node(node)
            if node.op == "output":
                return env[node]
        return None

    def _computed(self, n: torch.fx.Node) -> torch.Tensor | None:
        """The node's meta result from shape arithmetic, or None (run it)."""
        args = [self.env[a] if isinstance(a, torch.fx.Node) else a for a in n.args]
        if n.op == "call_method" and n.target == "mean" and set(n.kwargs) <= {"keepdim"}:
            return _mean(args, n.kwargs.get("keepdim", False))
        if n.kwargs:
            return None
        if n.op == "call_module" and len(args) == 1:
            m = self.submodule(n.target)
            rule = _SHAPE_ARITHMETIC.get(type(m))
            x = args[0]
            if rule is None or not isinstance(x, torch.Tensor) or not x.is_floating_point() or (
                    isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dtype != x.dtype):
                return None
            shape = rule(m, tuple(x.shape))
            return None if shape is None else torch.empty(shape, dtype=x.dtype, device="meta")
        if n.op == "call_function" and n.target in _BROADCAST_FUNCTIONS and len(args) == 2:
            if not all(isinstance(a, (int, float)) or (isinstance(a, torch.Tensor) and a.is_contiguous()
                                                        and a.is_floating_point()) for a in args):
                return None
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if not tensors or any(type(a) is bool for a in args):
                return None
            shape = _broadcast([tuple(a.shape) for a in tensors])
            return None if shape is None else torch.empty(shape, dtype=torch.result_type(*args), device="meta")
        return None

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = None
            if self.shortcut and n.args and isinstance(n.args[0], torch.fx.Node):
                if (n.op == "call_module" and isinstance(self.submodule(n.target), _SAME_SHAPE_MODULES)
                        or (n.op == "call_function" and n.target in _SAME_SHAPE_FUNCTIONS)):
                    result = self.env[n.args[0]]
                else:
                    result = self._computed(n)
            if result is None:
                result = super().run_node(n)
        except Exception as err:
            raise _NodeError(n, err) from err
        if self.record:
            n.meta["tensor_meta"] = _shapes(result)
        return result


def propagate_on_meta(gm: torch.fx.GraphModule, example_inputs: torch.Tensor) -> bool:
    """Shapes of every node from a run on meta tensors (no arithmetic); False when an op needs real data."""
    try:
        with on_meta(gm):
            prop = _ShapeProp(gm, garbage_collect_values=False)
            prop.extra_traceback = False
            prop.shortcut = True
            prop.run(example_inputs.to("meta"))
        return True
    except Exception:  # data-dependent ops (``.item()``, ``nonzero``) or ones without meta kernels
        return False


class _NodeError(Exception):
    def __init__(self, node: torch.fx.Node, err: BaseException) -> None:
        super().__init__(f"{first_line(err)} (at fx node {node.name!r})")


def trace(model: nn.Module, example_inputs: torch.Tensor, modules: dict[str, nn.Module] | None = None
          ) -> torch.fx.GraphModule:
    """fx-trace ``model`` and record every node's output shape on ``example_inputs``.

    Raises UnsupportedModelError when fx cannot trace the forward, ConfigError (one line)
    when ``example_inputs`` do not fit the model. ``modules``: ``dict(model.named_modules())``
    when the caller has it.
    """
    traced = trace_model(model, example_inputs, leaf=_has_own_rule, lazy=True, meta_leaf=_own_rule)
    if traced.graph_module is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced by torch.fx ({traced.error}); "
            "make its forward free of data-dependent control flow or prune it layer by layer"
        )
    gm = traced.graph_module
    gm.meta["opaque"] = dict(zip(traced.opaque, traced.reasons))
    try:
        with evaluating(model, modules), torch.no_grad():
            if not propagate_on_meta(gm, example_inputs):
                prop = _ShapeProp(gm)
                prop.extra_traceback = False
                prop.run(example_inputs)
    except _NodeError as err:
        raise ConfigError(
            f"example_inputs of shape {tuple(example_inputs.shape)} do not fit {type(model).__name__}: "
            f"{first_line(err)}; "
            "pass one batch the model accepts (e.g. [1, C, H, W] at its input size)"
        ) from None
    return gm
