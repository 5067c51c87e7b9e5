"""Tracing: the fx graph of a model and the shape of every node's value on the example inputs.

Modules are leaves of the trace when fx keeps them whole (the ``torch.nn`` layers) or when
their class has a channel rule of its own (:func:`slimkit.prune.graph.register_channel_rule`);
every other module is traced through, so a subclass that calls the functional form
(``F.batch_norm(x, self.running_mean, ...)`` in timm's ``BatchNormAct2d``) reaches the
function rules. A forward with shape-dependent control flow is traced again with fx's
MetaTracer on a meta-device copy. Shapes are propagated on meta tensors (the parameters
swapped for meta tensors of their shapes: no arithmetic, about half the time of a real
forward), and again on the real inputs when an op needs data.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from typing import Any, NamedTuple

import torch
from torch import nn

from slimkit.exceptions import ConfigError, UnsupportedModelError
from slimkit.prune.graph.rules import module_rule


class _Tracer(torch.fx.Tracer):
    """fx's tracer, with modules that have a channel rule of their own class kept whole.

    A parameter read in a traced-through forward (``self.weight`` in timm's ``BatchNormAct2d``)
    is found by identity in a table built once; fx's own lookup walks every parameter of the
    model for each read (seconds on a timm model).
    """

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return torch.fx.Tracer.is_leaf_module(self, m, qualname) or module_rule(type(m), exact=True) is not None

    def _names(self) -> dict[int, tuple[str, bool]]:
        names = getattr(self, "_slimkit_names", None)
        if names is None:
            names = {}
            for name, p in self.root.named_parameters():
                names.setdefault(id(p), (name, True))
            for name, b in self.root.named_buffers():
                names.setdefault(id(b), (name, False))
            self._slimkit_names = names
        return names

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and not isinstance(a, torch.fx.Proxy):
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


def _symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _meta_trace(model: nn.Module, example_inputs: torch.Tensor) -> torch.fx.GraphModule:
    """Fallback: trace a meta-device copy so that control flow on shapes is resolved."""
    from torch.fx.experimental.meta_tracer import MetaTracer

    class _Meta(MetaTracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return _Tracer.is_leaf_module(self, m, qualname)

    meta_model = copy.deepcopy(model).to("meta")
    arg = next(iter(inspect.signature(model.forward).parameters))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = _Meta().trace(meta_model, meta_args={arg: example_inputs.to("meta")})
    return torch.fx.GraphModule(model, graph)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


class _ShapeProp(torch.fx.Interpreter):
    """Runs the graph once and records every node's shape (fx's ShapeProp, without its traceback print).

    ``shortcut``: layers that keep their input's shape return their input unchanged (on meta tensors).
    """

    shortcut = False

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            if self.shortcut and n.args and isinstance(n.args[0], torch.fx.Node) and (
                    (n.op == "call_module" and isinstance(self.module.get_submodule(n.target), _SAME_SHAPE_MODULES))
                    or (n.op == "call_function" and n.target in _SAME_SHAPE_FUNCTIONS)):
                result = self.env[n.args[0]]
            else:
                result = super().run_node(n)
        except Exception as err:
            raise _NodeError(n, err) from err
        n.meta["tensor_meta"] = _shapes(result)
        return result


def on_meta(module: nn.Module) -> contextlib.AbstractContextManager:
    """Inside the block, every parameter and buffer of ``module`` is a meta tensor of the same shape."""
    from torch.nn.utils.stateless import _reparametrize_module

    tensors = {name: torch.empty_like(t, device="meta")
               for name, t in [*module.named_parameters(remove_duplicate=False),
                               *module.named_buffers(remove_duplicate=False)]}
    return _reparametrize_module(module, tensors)


def propagate_on_meta(gm: torch.fx.GraphModule, example_inputs: torch.Tensor) -> bool:
    """Shapes of every node from a run on meta tensors (no arithmetic); False when an op needs real data."""
    try:
        with on_meta(gm):
            prop = _ShapeProp(gm)
            prop.extra_traceback = False
            prop.shortcut = True
            prop.run(example_inputs.to("meta"))
        return True
    except Exception:  # data-dependent ops (``.item()``, ``nonzero``) or ones without meta kernels
        return False


class _NodeError(Exception):
    def __init__(self, node: torch.fx.Node, err: BaseException) -> None:
        super().__init__(f"{_first_line(err)} (at fx node {node.name!r})")


def trace(model: nn.Module, example_inputs: torch.Tensor) -> torch.fx.GraphModule:
    """fx-trace ``model`` and record every node's output shape on ``example_inputs``.

    Raises UnsupportedModelError when fx cannot trace the forward, ConfigError (one line)
    when ``example_inputs`` do not fit the model.
    """
    try:
        gm = _symbolic_trace(model)
    except Exception as err:  # fx raises many types on shape-dependent control flow
        try:
            gm = _meta_trace(model, example_inputs)
        except Exception:
            raise UnsupportedModelError(
                f"{type(model).__name__} cannot be traced by torch.fx ({_first_line(err)}); "
                "make its forward free of data-dependent control flow or prune it layer by layer"
            ) from None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not propagate_on_meta(gm, example_inputs):
                prop = _ShapeProp(gm)
                prop.extra_traceback = False
                prop.run(example_inputs)
    except _NodeError as err:
        raise ConfigError(
            f"example_inputs of shape {tuple(example_inputs.shape)} do not fit {type(model).__name__}: "
            f"{_first_line(err)}; "
            "pass one batch the model accepts (e.g. [1, C, H, W] at its input size)"
        ) from None
    finally:
        model.train(was_training)
    return gm
