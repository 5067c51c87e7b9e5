"""One tracing helper: the torch.fx graph of a model, found by one fallback order.

Every path that needs a model's graph calls :func:`trace_model`: the channel graph of
structured pruning (:mod:`slimkit.prune.graph.trace`), peak activation memory
(:mod:`slimkit.measure.memory`), batch-norm folding (:mod:`slimkit.quantize.fold`) and
PyTorch's x86 int8 engine (:func:`slimkit.deploy.engines.torch_x86_int8`). So a model traces
for one figure iff it traces for the others. The order, first that works:

1. ``"symbolic"``: ``torch.fx`` symbolic tracing. torch's own modules are leaves (fx's
   default), and so is every module for which the caller's ``leaf`` predicate is true
   (structured pruning: classes with a channel rule of their own); every other module is
   traced through. A parameter read in a traced-through forward is found by identity. With
   ``example_inputs``, the forward's later parameters that have defaults (``mask=None``)
   are traced at their defaults, as a call with those inputs only passes them.
2. ``"meta"`` (only with ``example_inputs``): fx's ``MetaTracer`` on a meta-device copy,
   which resolves control flow on shapes (``if x.shape[-1] != 32``) for the example's
   shapes; the graph then holds for inputs of those shapes. Its root is the model itself.
3. ``"opaque"``: step 1 again with the submodule whose forward failed kept whole (a leaf),
   innermost first, repeated until the trace succeeds; :attr:`Traced.opaque` names them.
   A caller that must see inside every module (structured pruning) refuses such a graph.
4. Nothing traced (the model's own forward cannot be traced): :attr:`Traced.graph_module`
   is None and :attr:`Traced.error` says why; the caller raises a one-line error or uses
   a method that needs no graph.

Tracing does not change the model's train/eval mode: a forward that branches on
``self.training`` is traced in the mode the caller left it in.

>>> import torch
>>> from torch import nn
>>> class Fit(nn.Module):  # control flow on a shape: symbolic tracing fails, the meta trace resolves it
...     def forward(self, x):
...         return x if x.shape[-1] == 4 else nn.functional.adaptive_avg_pool2d(x, 4)
>>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Fit())
>>> trace_model(model).method, trace_model(model).opaque
('opaque', ('1',))
>>> trace_model(model, torch.zeros(1, 1, 4, 4)).method
'meta'
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

#: ``graph_module.meta`` key set on graphs from the ``"meta"`` step (see :func:`baked_sizes`).
BAKED_SIZES = "slimkit_baked_sizes"

#: ``leaf(module, qualified_name) -> True`` keeps a module whole in the trace (besides fx's default leaves).
LeafRule = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class Traced:
    """What :func:`trace_model` found (see the module docstring).

    - ``graph_module``: the traced ``fx.GraphModule`` (its modules are the model's), or None;
    - ``method``: ``"symbolic"``, ``"meta"``, ``"opaque"`` or ``"none"``;
    - ``opaque``: qualified names of the submodules kept whole because fx could not trace them;
    - ``error``: the first line of the symbolic trace's error (None when it succeeded);
    - ``reasons``: for each name in ``opaque``, the first line of the error its forward raised.
    """

    graph_module: fx.GraphModule | None
    method: str
    opaque: tuple[str, ...] = ()
    error: str | None = None
    reasons: tuple[str, ...] = ()


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its class name when empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _Scope(fx.proxy.Scope):
    def __copy__(self) -> fx.proxy.Scope:
        return fx.proxy.Scope(self.module_path, self.module_type)


class _ModuleStack(collections.OrderedDict):
    def __copy__(self) -> collections.OrderedDict:
        return collections.OrderedDict(self)


#: argument types fx stores in a node as they are
_PLAIN_ARGS = frozenset({int, float, bool, str, type(None)})


def is_tensor_method(func: Any) -> bool:
    """``torch.overrides.is_tensor_method_or_property(func)`` for a function that reached ``__torch_function__``:
    a function of ``torch.Tensor`` or ``TensorBase`` (by its qualified name), or a property getter. torch's test
    looks ``func`` up in the table of every overridable function, whose first build costs a cold prune ~13 ms;
    on that table the two tests agree on every function (tested)."""
    qualname = getattr(func, "__qualname__", None)
    return getattr(func, "__name__", None) == "__get__" or (
        isinstance(qualname, str) and qualname.partition(".")[0] in ("Tensor", "TensorBase"))


@functools.lru_cache(maxsize=8192)
def _node_name(target: str) -> str:
    """fx's node name for a string target (``features.0.0`` -> ``features_0_0``)."""
    return _naming_graph()._target_to_str(target)


@functools.cache
def _naming_graph() -> fx.Graph:
    return fx.Graph()


class _Proxy(fx.Proxy):
    """fx's proxy, with the tensor-method test of :func:`is_tensor_method` (the rest is fx's ``__torch_function__``:
    a script method or a higher-order operator goes to fx itself)."""

    @classmethod
    def __torch_function__(cls, orig_method: Callable[..., Any], types: tuple[type, ...],
                           args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None) -> fx.Proxy:
        if isinstance(orig_method, (torch._C.ScriptMethod, torch._ops.HigherOrderOperator)):
            return super().__torch_function__(orig_method, types, args, kwargs)
        args = args if args else ()
        kwargs = kwargs if kwargs else {}
        tracers = {a.tracer: None for a in torch.utils._pytree.tree_iter((args, kwargs)) if isinstance(a, fx.Proxy)}
        if len(tracers) != 1:  # fx's message for several tracers
            return super().__torch_function__(orig_method, types, args, kwargs)
        tracer = next(iter(tracers))
        if is_tensor_method(orig_method):
            return tracer.create_proxy("call_method", orig_method.__name__, args, kwargs)
        return tracer.create_proxy("call_function", orig_method, args, kwargs, name=_node_name(orig_method.__name__))


class _Tracer(fx.Tracer):
    """fx's tracer, with the caller's extra leaves and the opaque submodules kept whole.

    A parameter read in a traced-through forward (``self.weight`` in timm's ``BatchNormAct2d``)
    is found by identity in a table built once; fx's own lookup walks every parameter of the
    model for each read (seconds on a timm model). Remembers the innermost submodule whose
    forward failed (``failed``).
    """

    def __init__(self, leaf: LeafRule | None = None, opaque: frozenset[str] = frozenset()) -> None:
        super().__init__()
        # fx copies the scope for every module call and the module stack for every node; copy.copy of
        # these two classes goes through __reduce_ex__ (~5 % of a MobileNetV3 prune): copy them directly
        self.scope = _Scope(self.scope.module_path, self.scope.module_type)
        self.module_stack = _ModuleStack(self.module_stack)
        self.leaf = leaf
        self.opaque = opaque
        self.failed: str | None = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any | None = None,
                     proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None) -> fx.Proxy:
        if name is None and type(target) is str:  # the node's name as fx derives it from the target, remembered
            name = _node_name(target)
        return super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.opaque or fx.Tracer.is_leaf_module(self, m, qualname)
                or (self.leaf is not None and self.leaf(m, qualname)))

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = self.path_of_module(m)
            raise

    def _names(self) -> dict[int, tuple[str, bool]]:
        names = getattr(self, "_slimkit_names", None)
        if names is None:  # named_parameters() then named_buffers(), read from the modules' tables
            names = {}
            modules = list(self.root.named_modules())
            for table, is_param in (("_parameters", True), ("_buffers", False)):
                for prefix, m in modules:
                    for name, t in getattr(m, table).items():
                        if t is not None:
                            names.setdefault(id(t), (f"{prefix}.{name}" if prefix else name, is_param))
            self._slimkit_names = names
        return names

    def create_arg(self, a: Any) -> Any:
        # the common arguments first, as fx lowers them (a proxy to its node, a plain tuple element-wise, a
        # plain scalar as itself) without fx's chain of isinstance and opaque-type checks for each
        kind = type(a)
        if kind is _Proxy or kind is fx.Proxy:
            return a.node
        if kind is tuple:
            return tuple([self.create_arg(e) for e in a])
        if kind in _PLAIN_ARGS:
            return a
        if kind is list:
            return [self.create_arg(e) for e in a]
        if kind is dict and all(type(k) is str for k in a):
            return {k: self.create_arg(v) for k, v in a.items()}
        if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy):
            found = self._names().get(id(a))
            if found is not None:
                return self.create_node("get_attr", found[0], (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        found = self._names().get(id(attr_val))
        if found is None or not (found[1] or self.proxy_buffer_attributes) or (
                found[1] and not isinstance(attr_val, nn.Parameter)):
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        name = found[0]
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


def _defaults(model: nn.Module, n_inputs: int) -> dict[str, Any] | None:
    """The forward's parameters after the first ``n_inputs`` that have defaults, at their defaults.

    Traced as constants (fx's ``concrete_args``), so that ``forward(x, mask=None)`` traces the
    branch a call with ``n_inputs`` inputs takes, not one where ``mask`` is a proxy (timm's Hiera).
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    found = {p.name: p.default for p in params[n_inputs:]
             if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return found or None


def _graph_module(root: nn.Module, graph: fx.Graph, name: str, lazy: bool) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, name)``; ``lazy``: its Python code is generated on first call, not now
    (fx's lazy graph module; the code of a 700-node graph costs ~0.15 s and a graph that is only walked
    never needs it), and its submodules are the root's own children (fx copies the path of every
    target, making an empty module for each container on it: 8 ms on MobileNetV3, for a graph whose
    targets resolve the same way through the root's children)."""
    if lazy:
        try:
            from torch.fx._lazy_graph_module import _LazyGraphModule
        except ImportError:  # a torch without it: generate the code now
            pass
        else:
            from torch.fx.graph_module import _copy_attr

            gm = _LazyGraphModule(nn.Module(), fx.Graph(), name)
            gm._modules.update(root._modules)
            gm._parameters.update(root._parameters)
            gm._buffers.update(root._buffers)
            gm._non_persistent_buffers_set.update(root._non_persistent_buffers_set)
            gm.training = root.training
            for node in graph.nodes:  # what the trace stored on the root itself (``_tensor_constant0``)
                if node.op in ("get_attr", "call_module") and not hasattr(gm, node.target.split(".")[0]):
                    _copy_attr(root, gm, node.target)
            gm.graph = graph
            if graph._tracer_cls and "<locals>" not in graph._tracer_cls.__qualname__:
                gm._tracer_cls = graph._tracer_cls
            return gm
    return fx.GraphModule(root, graph, name)


def _symbolic(model: nn.Module, leaf: LeafRule | None, opaque: frozenset[str],
              concrete: dict[str, Any] | None = None,
              lazy: bool = False) -> tuple[fx.GraphModule | None, _Tracer, Exception | None]:
    tracer = _Tracer(leaf, opaque)
    try:
        graph = tracer.trace(model, concrete_args=concrete)
    except Exception as err:  # fx raises many types on data-dependent control flow
        return None, tracer, err
    return _graph_module(tracer.root, graph, type(model).__name__, lazy), tracer, None


def _meta(model: nn.Module, args: tuple[torch.Tensor, ...], leaf: LeafRule | None) -> fx.GraphModule:
    """Trace a meta-device copy with fx's MetaTracer, so that control flow on shapes is resolved."""
    from torch.fx.experimental.meta_tracer import MetaTracer

    class _Meta(MetaTracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return _Tracer.is_leaf_module(self, m, qualname)

    meta_model = copy.deepcopy(model).to("meta")
    names = list(inspect.signature(model.forward).parameters)[:len(args)]
    tracer = _Meta()
    tracer.leaf, tracer.opaque = leaf, frozenset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tracer.trace(meta_model, meta_args={n: t.to("meta") for n, t in zip(names, args)})
    gm = fx.GraphModule(model, graph)
    gm.meta[BAKED_SIZES] = True
    return gm


def baked_sizes(graph_module: fx.GraphModule) -> bool:
    """The graph came from the ``"meta"`` step: its sizes are constants the eager forward computes at run time."""
    return bool(graph_module.meta.get(BAKED_SIZES))


def trace_model(model: nn.Module, example_inputs: Any = None, *, leaf: LeafRule | None = None,
                lazy: bool = False, meta_leaf: LeafRule | None = None) -> Traced:
    """The fx graph of ``model`` by the fallback order of the module docstring (the model is not changed).

    ``example_inputs``: a Tensor or a tuple of Tensors (enables the meta trace, step 2);
    ``leaf``: extra modules to keep whole in every step (``meta_leaf``: in the meta step instead,
    where fx's MetaTracer runs a leaf's forward on meta tensors while tracing, so a leaf whose
    forward calls its children would record them as calls on constants); ``lazy``: a symbolic trace's
    GraphModule generates its Python code on its first call (for a caller that only walks
    or interprets the graph).
    """
    concrete = None
    if example_inputs is not None:
        from slimkit.measure.inputs import as_args

        concrete = _defaults(model, len(as_args(example_inputs)))
    gm, tracer, err = _symbolic(model, leaf, frozenset(), concrete, lazy)
    if gm is not None:
        return Traced(gm, "symbolic")
    error = first_line(err)
    if example_inputs is not None:
        try:
            return Traced(_meta(model, as_args(example_inputs), leaf if meta_leaf is None else meta_leaf), "meta",
                          error=error)
        except Exception:  # an op without a meta kernel, a forward that reads tensor values
            pass
    opaque: frozenset[str] = frozenset()
    reasons: dict[str, str] = {}
    while tracer.failed is not None and tracer.failed not in opaque:
        reasons[tracer.failed] = first_line(err)
        opaque |= {tracer.failed}
        gm, tracer, err = _symbolic(model, leaf, opaque, concrete, lazy)
        if gm is not None:
            order = [name for name, _ in model.named_modules() if name in opaque]
            return Traced(gm, "opaque", tuple(order), error, tuple(reasons[n] for n in order))
    return Traced(None, "none", error=error)


@contextlib.contextmanager
def on_meta(module: nn.Module) -> Iterator[None]:
    """Inside the block, every parameter and buffer of ``module`` is a meta tensor of the same shape
    (and strides and dtype).

    Each module's own tensors are swapped once in its tables, and put back after: a module
    reachable by two paths (CoaT's shared position encodings) is swapped once, a tensor tied
    between two modules in both. Tensors of one shape share one meta tensor (it holds no data).
    """
    metas: dict[tuple, torch.Tensor] = {}
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None:
                    swapped.append((table, name, t))
    try:
        for table, name, t in swapped:
            key = (tuple(t.shape), t.stride() if t.layout == torch.strided else t.layout, t.dtype)
            meta = metas.get(key)
            if meta is None:
                meta = metas[key] = torch.empty_like(t, device="meta")
            table[name] = meta
        yield
    finally:
        for table, name, t in reversed(swapped):
            table[name] = t
