"""The op-rule table: how channels flow through each op, whatever spelling it arrives in.

A rule is ``rule(op: ChannelOp) -> value``: it reads the channel annotations of the op's
inputs (``op.x``, ``op.value(arg)``), records what the op does to them (``op.produce``
fresh channels, ``op.member`` a parameter axis that follows them, ``op.fix`` channels that
must be kept, ``op.unsupported``) and returns the annotation of the op's output (an
:class:`~slimkit.prune.graph.core.Ann`, a list of them for a tuple, or None when no
tracked channels leave it). Rules are keyed by module class (looked up along the MRO),
by function and by tensor-method name, in one :class:`~slimkit.registry.Registry`; the
built-in rules (:mod:`slimkit.prune.graph.oprules`) are registered with the same
:func:`register_channel_rule` a user calls for a layer of their own.

>>> import torch
>>> from torch import nn
>>> class Gain(nn.Module):  # y = x * g, one gain per channel, written in C++ for speed
...     def __init__(self, c):
...         super().__init__()
...         self.g = nn.Parameter(torch.ones(c))
...     def forward(self, x):
...         return x * self.g.view(1, -1, 1, 1)
>>> register_channel_rule(Gain, "per_channel", out_params={"g": 0})
>>> module_rule(Gain) is not None
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slimkit.exceptions import ConfigError, UnsupportedModelError
from slimkit.prune.graph.core import Ann, ParamRef
from slimkit.registry import Registry

if TYPE_CHECKING:
    from slimkit.prune.graph.builder import Builder


@dataclass(frozen=True)
class RuleEntry:
    """A registered rule. ``producer``: it also runs when no tracked channels reach the op."""

    fn: Callable[[ChannelOp], Any]
    producer: bool = False


CHANNEL_RULES: Registry[RuleEntry] = Registry("channel rule", lazy_modules=("slimkit.prune.graph.oprules",))
#: bumped on every registration: part of the graph cache's key
VERSION = [0]


def qualified_name(obj: Any) -> str:
    """``module.qualname`` of a class or function (the key it is registered under)."""
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{module}.{name}" if module else name


def rule_key(target: Any) -> str:
    """Registry key of ``target``: ``module:...`` (a class), ``function:...``, ``method:...`` (a str)."""
    if isinstance(target, str):
        return target.lower() if ":" in target else f"method:{target}".lower()
    if isinstance(target, type):
        return f"module:{qualified_name(target)}".lower()
    if callable(target):
        return f"function:{qualified_name(target)}".lower()
    raise ConfigError(f"register_channel_rule: target must be a module class, a function or a tensor-method name, "
                      f"got {type(target).__name__}")


def module_rule(cls: type, exact: bool = False) -> RuleEntry | None:
    """The rule of module class ``cls`` or of its nearest registered base (``exact``: of ``cls`` only)."""
    for base in (cls,) if exact else cls.__mro__:
        key = rule_key(base)
        if key in CHANNEL_RULES:
            return CHANNEL_RULES.get(key)
    return None


def function_rule(fn: Any) -> RuleEntry | None:
    key = rule_key(fn) if callable(fn) else None
    return CHANNEL_RULES.get(key) if key is not None and key in CHANNEL_RULES else None


def method_rule(name: str) -> RuleEntry | None:
    key = f"method:{name}".lower()
    return CHANNEL_RULES.get(key) if key in CHANNEL_RULES else None


class ChannelOp:
    """One call of the traced graph, as a channel rule sees it (and what a rule may record)."""

    def __init__(self, builder: Builder, node: torch.fx.Node, module: torch.nn.Module | None, shape: Any,
                 env: dict[str, Any]) -> None:
        self.builder = builder
        self.node = node
        self.module = module
        #: output shape (a list of shapes for a tuple output)
        self.shape = shape
        self.env = env
        #: the module's qualified name for a module call, else the fx node's name
        self.name = node.target if node.op == "call_module" else node.name
        self.anns = builder.tensor_anns(node, env)
        self.x = self.value(node.args[0]) if node.args else None
        if not isinstance(self.x, Ann):
            self.x = None

    # -- reading --------------------------------------------------------------------
    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Argument ``index`` (or keyword ``name``) of the call, as written in the graph."""
        if len(self.node.args) > index:
            return self.node.args[index]
        return self.node.kwargs.get(name, default) if name else default

    def value(self, arg: Any) -> Any:
        """Annotation (Ann, ParamRef, list or None) of an argument node."""
        return self.env.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def shape_of(self, arg: Any) -> Any:
        """Shape of an argument node's value (None when it is not a tensor)."""
        return self.builder.shape_of(arg)

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        return self.shape_of(self.node.args[0]) if self.node.args else None

    def param(self, arg: Any) -> ParamRef | None:
        """The parameter behind an argument (a ``get_attr`` or a value computed from parameters only)."""
        value = self.value(arg)
        return value if isinstance(value, ParamRef) else None

    @property
    def what(self) -> str:
        """How an error message names this op."""
        return node_what(self.node, self.module)

    # -- recording ------------------------------------------------------------------
    def produce(self, layer: str, dim: int, role: str = "out", size: int | None = None) -> Ann:
        """Fresh channels along output dim ``dim`` produced by ``layer`` (its ``role`` axis)."""
        shape = self.shape
        n = shape[dim] if size is None else size
        slots = self.builder.uf.new(n, producer=(layer, role))
        self.builder.member((layer, role), slots)
        return Ann((dim % len(shape),), slots)

    def member(self, layer: str, role: str, slots: np.ndarray) -> None:
        """Axis ``role`` of ``layer`` follows ``slots`` (position i of the axis is slot i)."""
        self.builder.member((layer, role), slots)

    def fix(self, value: Any, reason: str) -> None:
        """Keep the channels of ``value`` (an Ann, a list of them, or None), with ``reason``."""
        for ann in value if isinstance(value, list) else [value]:
            if isinstance(ann, Ann):
                self.builder.uf.fix(ann.slots, reason)

    def keep(self, reason: str) -> None:
        """Keep every tracked channel that reaches the op; its output is untracked."""
        for ann in self.anns:
            self.builder.uf.fix(ann.slots, reason)
        return None

    def new_fixed(self, count: int, reason: str) -> np.ndarray:
        """Slots for ``count`` channels that are not prunable (an untracked input's)."""
        return self.builder.uf.new(count, fixed=reason)

    def grouped(self, slots: np.ndarray, groups: int, reason: str) -> None:
        """``slots`` ``[C]`` form ``groups`` equal blocks that must lose as many channels each."""
        self.builder.grouped.append((np.asarray(slots), groups, reason))

    def unsupported(self, what: str | None = None) -> None:
        """The op cannot be pruned through: error, or (``on_unsupported='skip'``) keep its channels.

        Whole attention heads (see :mod:`.heads`) reaching an op that does not know them are kept
        instead (before heads were units, they were kept at the split).
        """
        from slimkit.prune.graph.heads import keep_heads

        if keep_heads(self, what or self.what):
            return None
        self.builder.unsupported(self.node, what or self.what, self.anns)
        return None


# -- rule kinds a user can name instead of writing a rule ------------------------------

def _channel_dim(op: ChannelOp, dim: int) -> int | None:
    shape = op.in_shape
    return None if shape is None else dim % len(shape)


def _pass(op: ChannelOp) -> Any:
    return op.x


def _per_channel(dim: int) -> Callable[[ChannelOp], Any]:
    def rule(op: ChannelOp) -> Any:
        x = op.x
        if x is None:
            return None
        if x.dims != (_channel_dim(op, dim),):
            return op.unsupported(f"{op.what} with channels outside dim {dim}")
        op.member(op.name, "out", x.slots)
        return x

    return rule


def _conv_like(dim: int, in_size: str | None) -> Callable[[ChannelOp], Any]:
    def rule(op: ChannelOp) -> Any:
        x = op.x
        d = _channel_dim(op, dim)
        if x is not None and x.dims != (d,):
            op.unsupported(f"{op.what} with channels outside dim {dim}")
            x = None
        if x is None:
            n = op.in_shape[d] if op.in_shape is not None else getattr(op.module, in_size or "", 0)
            in_slots = op.new_fixed(n, "model input")
        else:
            in_slots = x.slots
        op.member(op.name, "in", in_slots)
        return op.produce(op.name, dim % len(op.shape))

    return rule


def _keep_rule(reason: str) -> Callable[[ChannelOp], Any]:
    def rule(op: ChannelOp) -> Any:
        return op.keep(reason.format(name=op.name))

    return rule


KINDS = ("pass", "per_channel", "conv", "keep")


def register_channel_rule(target: Any, rule: str | Callable[[ChannelOp], Any], *,
                          out_params: Mapping[str, int] | None = None, in_params: Mapping[str, int] | None = None,
                          counts: Mapping[str, str] | None = None, dim: int = 1, producer: bool = False) -> None:
    """Tell the channel graph how channels flow through ``target``, and how surgery cuts it.

    ``target``: a module class (its instances become leaves of the trace, looked up along
    the MRO), a function (``torch.cumsum``) or a tensor-method name (``"cumsum"``).
    ``rule``: one of the kinds

    - ``"pass"``: element-wise, channels go through unchanged (an activation);
    - ``"per_channel"``: one parameter slice per channel along dim ``dim``, channels go
      through (BatchNorm, a gain); the layer's ``out`` axis follows them;
    - ``"conv"``: reads channels along dim ``dim`` (its ``in`` axis) and produces new ones
      there (its ``out`` axis): a conv or linear layer (``dim=-1`` for channels-last);
    - ``"keep"``: channels reaching it are kept (the op's output is not tracked);

    or a callable ``rule(op: ChannelOp) -> output annotation`` for anything else
    (``producer=True``: call it even when no tracked channels reach the op).
    ``out_params`` / ``in_params``: for a module class, the parameters (and buffers) to slice
    when the layer loses output / input channels, as ``{name: dim}``; ``counts``:
    attributes that hold the channel counts, ``{"out": "out_channels", "in": "in_channels"}``.
    With any of them a surgery handler that slices exactly these is registered too
    (:func:`slimkit.prune.surgery.register_surgery_handler` registers one of your own).
    """
    if isinstance(rule, str):
        if rule not in KINDS:
            raise ConfigError(f"register_channel_rule: rule must be one of {', '.join(KINDS)} or a callable, "
                              f"got {rule!r}")
        producer = producer or rule == "conv"
        fn = {"pass": lambda: _pass, "per_channel": lambda: _per_channel(dim),
              "conv": lambda: _conv_like(dim, (counts or {}).get("in")),
              "keep": lambda: _keep_rule("kept by the rule of {name}")}[rule]()
    elif callable(rule):
        fn = rule
    else:
        raise ConfigError(f"register_channel_rule: rule must be a kind name or a callable, got {type(rule).__name__}")
    key = rule_key(target)
    CHANNEL_RULES.register(key, RuleEntry(fn, producer), replace=True)  # a later registration replaces an earlier one
    VERSION[0] += 1
    if out_params or in_params or counts:
        if not isinstance(target, type):
            raise ConfigError("register_channel_rule: out_params/in_params/counts need a module class as target")
        from slimkit.prune.surgery import register_surgery_handler, sliced

        register_surgery_handler(target, sliced(out_params or {}, in_params or {}, counts or {}))


def node_what(node: torch.fx.Node, module: torch.nn.Module | None = None) -> str:
    """How an error message names the op of ``node`` (``module``: the one a ``call_module`` node calls)."""
    if node.op == "call_module":
        return f"module {node.target} ({type(module).__name__})"
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    return f"function {getattr(node.target, '__name__', node.target)}"


def unknown_op_message(what: str, node_name: str) -> str:
    return (f"operation {what} (fx node {node_name!r}) acts on pruned channels and slimkit cannot prune through it; "
            "tell slimkit how channels flow through it with slimkit.prune.register_channel_rule, use "
            "on_unsupported='skip' to keep the channels it touches, or list its producers in ignore")


__all__ = ["CHANNEL_RULES", "ChannelOp", "UnsupportedModelError", "register_channel_rule"]
