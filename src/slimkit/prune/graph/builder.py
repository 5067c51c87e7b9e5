"""The builder: walks the traced graph once and applies the op rule of every node.

It owns the union-find of slots, the member axes, the grouped-conv constraints and the
warnings; the rules (:mod:`slimkit.prune.graph.oprules`) do the per-op work through
:class:`~slimkit.prune.graph.rules.ChannelOp`. Values that are computed from parameters
only (a standardized conv weight) travel as :class:`~slimkit.prune.graph.core.ParamRef`.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch import nn

from slimkit.exceptions import UnsupportedModelError
from slimkit.prune.graph import sizes
from slimkit.prune.graph.core import Ann, Axis, ParamRef, UnionFind
from slimkit.prune.graph.rules import ChannelOp, function_rule, method_rule, module_rule, unknown_op_message


def meta_shapes(value: Any) -> Any:
    """Shapes from ShapeProp's tensor_meta (nested like the node's value)."""
    if value is None:
        return None
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [meta_shapes(v) for v in value]
    return None


_RESHAPES = {"view", "reshape", torch.reshape, "expand"}


def _constant_shape(args: tuple) -> bool:
    """A target shape written as constants only (no ``-1``, nothing computed at run time)."""
    flat = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
    return bool(flat) and all(isinstance(a, int) and a > 1 or a == 1 for a in flat) and any(a > 1 for a in flat)


class Builder:
    """State of one graph build; ``norm_channels`` is ``keep`` or ``prune`` (see build_graph)."""

    def __init__(self, model: nn.Module, on_unsupported: str, norm_channels: str = "keep",
                 baked: str = "runtime", modules: dict[str, nn.Module] | None = None) -> None:
        self.model = model
        self.modules = dict(model.named_modules()) if modules is None else modules
        self.params: dict[str, tuple[int, ...]] = {}  # named_parameters() then named_buffers(), each tensor once
        seen: set[int] = set()
        for table in ("_parameters", "_buffers"):
            for prefix, m in self.modules.items():
                for name, t in getattr(m, table).items():
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        self.params[f"{prefix}.{name}" if prefix else name] = tuple(t.shape)
        self.on_unsupported = on_unsupported
        self.norm_channels = norm_channels
        #: a meta-traced graph's constant sizes stand for run-time sizes (``runtime``) or are fixed (see build_graph)
        self.baked = baked
        self.uf = UnionFind()
        self.axes: dict[Axis, np.ndarray] = {}
        self.warnings: list[str] = []
        self.used: set[str] = set()
        #: (slots ``[C]``, groups g, reason): channel ``i`` is in block ``i // (C // g)``
        self.grouped: list[tuple[np.ndarray, int, str]] = []
        #: submodules fx could not trace, kept as leaves (name -> why; see :mod:`slimkit.prune.graph.trace`)
        self.opaque: dict[str, str] = {}

    # -- recording ----------------------------------------------------------------
    def member(self, axis: Axis, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if axis in self.axes:  # module called twice: both calls see the same channels
            old = self.axes[axis]
            if old.shape != slots.shape:
                self.uf.fix(np.concatenate([old, slots]), f"{axis[0]} is called with different channel counts")
            else:
                self.uf.union_arrays(old, slots)
            return
        self.axes[axis] = slots

    def unsupported(self, node: torch.fx.Node, what: str, anns: list[Ann]) -> None:
        if self.on_unsupported == "error":
            raise UnsupportedModelError(unknown_op_message(what, node.name))
        self.warnings.append(f"operation {what} (fx node {node.name!r}) acts on pruned channels and slimkit "
                             "cannot prune through it; its channels are kept")
        for ann in anns:
            self.uf.fix(ann.slots, f"reaches {what}")

    # -- reading ------------------------------------------------------------------
    @staticmethod
    def shape_of(arg: Any) -> Any:
        return meta_shapes(arg.meta.get("tensor_meta")) if isinstance(arg, torch.fx.Node) else None

    def tensor_anns(self, node: torch.fx.Node, env: dict[str, Any]) -> list[Ann]:
        found = []
        for arg in list(node.args) + list(node.kwargs.values()):
            for a in arg if isinstance(arg, (list, tuple)) else [arg]:
                ann = env.get(a.name) if isinstance(a, torch.fx.Node) else None
                if isinstance(ann, Ann):
                    found.append(ann)
                elif isinstance(ann, list):
                    found.extend(x for x in ann if isinstance(x, Ann))
        return found

    def param_refs(self, node: torch.fx.Node, env: dict[str, Any]) -> list[ParamRef]:
        found = []
        for arg in list(node.args) + list(node.kwargs.values()):
            for a in arg if isinstance(arg, (list, tuple)) else [arg]:
                ref = env.get(a.name) if isinstance(a, torch.fx.Node) else None
                if isinstance(ref, ParamRef):
                    found.append(ref)
        return found

    # -- the walk -----------------------------------------------------------------
    def run(self, gm: torch.fx.GraphModule) -> None:
        self.opaque = gm.meta.get("opaque", {})
        env: dict[str, Any] = {}
        for node in gm.graph.nodes:
            env[node.name] = self.visit(node, env)
            if node.all_input_nodes:  # sizes of channel dims read at run time (see .sizes)
                env[node.name] = sizes.track(self, node, env)
        if self.opaque:
            self._fix_inside_opaque()

    def _opaque_leaf(self, node: torch.fx.Node, env: dict[str, Any]) -> None:
        """A submodule fx cannot trace: the channels entering it are kept; its output is untracked (kept too)."""
        name = node.target
        if name not in self.used:  # the first call of the module warns
            self.warnings.append(f"module {name} ({type(self.modules[name]).__name__}) cannot be traced by torch.fx "
                                 f"({self.opaque[name]}); it is kept whole: its parameters and the channels entering "
                                 "and leaving it are not pruned")
        self.used.add(name)
        for ann in self.tensor_anns(node, env):
            self.uf.fix(ann.slots, f"enters {name}, which torch.fx cannot trace")
        return None

    def _fix_inside_opaque(self) -> None:
        """A layer inside an opaque submodule that is also used outside it (shared) is not cut either."""
        prefixes = tuple(name + "." for name in self.opaque)
        for (layer, _role), slots in self.axes.items():
            if layer in self.opaque or layer.startswith(prefixes):
                self.uf.fix(slots, f"{layer} is inside a module torch.fx cannot trace")

    def visit(self, node: torch.fx.Node, env: dict[str, Any]) -> Any:
        op, target = node.op, node.target
        if op == "placeholder":
            return None
        if op == "get_attr":
            self.used.add(target.rpartition(".")[0])
            shape = self.params.get(target)
            return ParamRef(target, shape) if shape is not None else None
        if op == "output":
            for ann in self.tensor_anns(node, env):
                self.uf.fix(ann.slots, "reaches the model output")
            return None
        if op == "call_function" and target is operator.getitem:
            src = env.get(node.args[0].name) if isinstance(node.args[0], torch.fx.Node) else None
            if isinstance(src, list):
                idx = node.args[1]
                return src[idx] if isinstance(idx, int) and -len(src) <= idx < len(src) else None
            if isinstance(src, ParamRef):
                return self._derived(node, env)
        module = None
        if op == "call_module":
            if target in self.opaque:
                return self._opaque_leaf(node, env)
            self.used.add(target)
            module = self.modules[target]
            entry = module_rule(type(module))
        elif op == "call_method":
            entry = method_rule(target)
        else:
            entry = function_rule(target)
        shape = meta_shapes(node.meta.get("tensor_meta"))
        call = ChannelOp(self, node, module, shape, env)
        if not call.anns and (entry is None or not entry.producer):
            return self._derived(node, env) if op != "call_module" else None
        if entry is None:
            return call.unsupported()
        return entry.fn(call)

    def _derived(self, node: torch.fx.Node, env: dict[str, Any]) -> ParamRef | None:
        """A value computed from parameters only carries them on (None when there are none)."""
        refs = self.param_refs(node, env)
        if not refs:
            return None
        first = refs[0]
        others = dict(first.others)
        for ref in refs[1:]:
            others.setdefault(ref.target, ref.shape)
            others.update(dict(ref.others))
        others.pop(first.target, None)
        frozen = any(r.frozen for r in refs) or (
            node.target in _RESHAPES and _constant_shape(node.args[1:]) and len(node.args) > 1)
        return ParamRef(first.target, first.shape, tuple(others.items()), frozen)
