"""Channel dependency graph: which output channels of which layers must be removed together.

The model is traced with :mod:`torch.fx` and run once on the example inputs (shape
propagation). Every tensor carries an *annotation*: the tensor dims that hold channels
(``dims``) and, for every position along them, the id of a *slot* (an integer array of
shape ``[size of those dims]``). A conv or linear layer creates fresh slots for its output
channels; per-channel layers (BatchNorm, depthwise conv, PReLU, a ``(C,1,1)`` parameter)
pass them through and become members; element-wise ops between two annotated tensors
(residual additions, the SE multiply) *unite* the slots they pair; ``cat`` concatenates the
arrays (index offsets); reshapes, permutes and flatten move them (flatten -> linear maps
one channel onto ``H*W`` input features). Slots reaching something whose meaning would
change when a channel disappears (the model output, LayerNorm/GroupNorm statistics,
``chunk``/``split``/slices with fixed sizes, a view that splits a channel dim as in a
channel shuffle, reductions over channels) are *fixed*. A grouped convolution
(``1 < groups < in_channels``) records its input and output slots split into ``groups``
equal blocks: a group whose units are exactly those slots gets ``partitions`` (every block
must lose as many units); where that fails (the slots span several groups, or two grouped
convs split one group in ways neither of which refines the other) the slots are fixed.

The union-find classes of slots are the prunable **units**: removing a unit removes one
position from every member axis it touches. Units whose producers are the same layers
form a **group** (the per-layer unit of selection).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> g = build_graph(net, torch.zeros(1, 3, 8, 8))
>>> [(grp.name, len(grp.units)) for grp in g.groups]
[('0', 8)]
>>> sorted(g.units[g.groups[0].units[0]].members)
[('0', 'out'), ('1', 'out'), ('3', 'in')]
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import operator
import threading
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.exceptions import ConfigError, UnsupportedModelError

#: Roles of a member axis: ``out`` (conv/linear/BN/... output channels and per-channel
#: parameters), ``in`` (conv/linear input channels), ``param:<name>:<axis>`` (a parameter
#: used directly in forward, e.g. ConvNeXt's ``layer_scale``).
Axis = tuple[str, str]


@dataclass
class Unit:
    """One prunable position: for every member axis, the indices it occupies there."""

    id: int
    members: dict[Axis, np.ndarray]
    producers: tuple[str, ...]


@dataclass
class Group:
    """Units produced by the same layers (one residual stream, one conv's filters).

    ``partitions``: set where the units reach a grouped conv: ``g`` lists of ``len(units) / g``
    unit ids (the conv's groups, in channel order); every list must lose as many units.
    """

    name: str
    producers: tuple[str, ...]
    units: list[int]
    partitions: list[list[int]] | None = None


@dataclass
class ChannelGraph:
    """Result of :func:`build_graph`; see the module docstring. Its index arrays are read-only."""

    axes: dict[Axis, np.ndarray]
    units: dict[int, Unit]
    groups: list[Group]
    fixed_reasons: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)


@dataclass
class _Ann:
    dims: tuple[int, ...]
    slots: np.ndarray  # shape = [shape[d] for d in dims]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: dict[int, str] = {}
        #: (first slot, count, producer axis) for every block of slots created with a producer
        self.produced: list[tuple[int, int, Axis]] = []

    def new(self, count: int, producer: Axis | None = None, fixed: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        if producer is not None:
            self.produced.append((start, count, producer))
        if fixed is not None:
            self.fixed.update(dict.fromkeys(range(start, start + count), fixed))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def fix(self, slots: np.ndarray, reason: str) -> None:
        for s in np.unique(slots).tolist():
            self.fixed.setdefault(s, reason)

    def roots(self) -> np.ndarray:
        """Root of every slot (the value :meth:`find` returns), as one int64 array."""
        parent = np.asarray(self.parent, dtype=np.int64)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand


_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.Softplus,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.sigmoid, F.silu, F.gelu, F.tanh, F.leaky_relu, F.elu,
    F.mish, F.dropout, F.dropout2d, F.dropout1d, F.softplus, torch.relu, torch.sigmoid, torch.tanh,
    torch.nn.functional.relu_, torch.clone, torch.neg,
}
#: functions outside torch recognised by name (torchvision's stochastic depth drops whole samples)
_PASS_FUNCTION_NAMES = {"stochastic_depth"}
_POOL_FUNCTIONS = {
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool2d, F.avg_pool2d, F.interpolate,
    F.adaptive_avg_pool1d, F.max_pool1d, F.avg_pool1d, torch.max_pool2d, torch.avg_pool1d,
    torch.adaptive_avg_pool1d,
}
_PASS_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "float", "to", "detach", "neg",
    "type_as", "requires_grad_",
}
_BINARY = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub, operator.truediv,
    operator.itruediv, torch.add, torch.mul, torch.sub, torch.div, torch.multiply,
}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}


def _meta_shapes(value: Any) -> Any:
    """Shapes from ShapeProp's tensor_meta (nested like the node's value)."""
    if value is None:
        return None
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [_meta_shapes(v) for v in value]
    return None


def _reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Blocks of dims of shape ``a`` that map onto blocks of ``b`` in a row-major reshape."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj = [], []
        pa = pb = 1
        if i < len(a):
            gi.append(i)
            pa = a[i]
            i += 1
        if j < len(b):
            gj.append(j)
            pb = b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        # swallow trailing size-1 dims into this block so they never form an empty block
        while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            gi.append(i)
            i += 1
        while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            gj.append(j)
            j += 1
        groups.append((gi, gj))
    return groups


class _Builder:
    def __init__(self, model: nn.Module, on_unsupported: str) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.params.update(dict(model.named_buffers()))
        self.on_unsupported = on_unsupported
        self.uf = _UnionFind()
        self.axes: dict[Axis, np.ndarray] = {}
        self.warnings: list[str] = []
        self.used: set[str] = set()
        #: (slots ``[C]``, groups g, reason): channel ``i`` is in conv group ``i // (C // g)``
        self.grouped: list[tuple[np.ndarray, int, str]] = []

    # -- helpers -----------------------------------------------------------------
    def member(self, axis: Axis, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        if axis in self.axes:  # module called twice: both calls see the same channels
            old = self.axes[axis]
            if old.shape != slots.shape:
                self.uf.fix(np.concatenate([old, slots]), f"{axis[0]} is called with different channel counts")
            else:
                for x, y in zip(old.tolist(), slots.tolist(), strict=True):
                    self.uf.union(x, y)
            return
        self.axes[axis] = slots

    def unsupported(self, node, what: str, anns: list[_Ann]) -> None:
        msg = f"operation {what} (fx node {node.name!r}) acts on pruned channels and slimkit cannot prune through it"
        if self.on_unsupported == "error":
            raise UnsupportedModelError(
                f"{msg}; use on_unsupported='skip' to keep the channels it touches, or list its producers in ignore"
            )
        self.warnings.append(msg + "; its channels are kept")
        for ann in anns:
            self.uf.fix(ann.slots, f"reaches {what}")

    def fresh_out(self, name: str, shape: tuple[int, ...], dim: int, role: str = "out") -> _Ann:
        slots = self.uf.new(shape[dim], producer=(name, role))
        self.axes[(name, role)] = slots
        return _Ann((dim % len(shape),), slots)

    # -- per op ------------------------------------------------------------------
    def run(self, gm: torch.fx.GraphModule) -> None:
        env: dict[str, Any] = {}
        for node in gm.graph.nodes:
            shape = _meta_shapes(node.meta.get("tensor_meta"))
            env[node.name] = self.visit(node, env, shape)

    def ann_of(self, arg: Any, env: dict[str, Any]) -> Any:
        if isinstance(arg, torch.fx.Node):
            return env.get(arg.name)
        return None

    def tensor_anns(self, node, env) -> list[_Ann]:
        found = []
        for arg in list(node.args) + list(node.kwargs.values()):
            args = arg if isinstance(arg, (list, tuple)) else [arg]
            for a in args:
                ann = self.ann_of(a, env)
                if isinstance(ann, _Ann):
                    found.append(ann)
                elif isinstance(ann, list):
                    found.extend(x for x in ann if isinstance(x, _Ann))
        return found

    def visit(self, node, env, shape) -> Any:
        op, target = node.op, node.target
        if op == "placeholder":
            return None
        if op == "get_attr":
            self.used.add(target.rpartition(".")[0])
            return ("param", target)
        if op == "output":
            for ann in self.tensor_anns(node, env):
                self.uf.fix(ann.slots, "reaches the model output")
            return None
        anns = self.tensor_anns(node, env)
        x = self.ann_of(node.args[0], env) if node.args else None
        if op == "call_module":
            self.used.add(target)
            return self.visit_module(node, self.modules[target], target, x, anns, shape)
        if op == "call_method":
            return self.visit_method(node, target, x, anns, env, shape)
        return self.visit_function(node, target, x, anns, env, shape)

    def visit_module(self, node, m: nn.Module, name: str, x, anns, shape) -> Any:
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            if x is not None and x.dims != (1,):
                self.unsupported(node, f"{type(m).__name__} {name} on channels outside dim 1", [x])
                x = None
            in_slots = x.slots if x is not None else self.uf.new(m.in_channels, fixed="model input")
            if m.groups == 1:
                self.member((name, "in"), in_slots)
                return self.fresh_out(name, shape, 1)
            if m.groups == m.in_channels:  # depthwise (channel multiplier k = out/in)
                mult = m.out_channels // m.in_channels
                out = np.repeat(in_slots, mult)
                self.member((name, "out"), out)
                return _Ann((1,), out)
            self.member((name, "in"), in_slots)
            self.grouped.append((in_slots, m.groups, f"input of grouped conv {name} (groups={m.groups})"))
            ann = self.fresh_out(name, shape, 1)
            self.grouped.append((ann.slots, m.groups, f"output of grouped conv {name} (groups={m.groups})"))
            return ann
        if isinstance(m, nn.Linear):
            last = len(shape) - 1
            if x is not None and x.dims != (last,):
                self.unsupported(node, f"Linear {name} on channels outside its last dim", [x])
                x = None
            in_slots = x.slots if x is not None else self.uf.new(m.in_features, fixed="model input")
            self.member((name, "in"), in_slots)
            return self.fresh_out(name, shape, last)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (
            isinstance(m, nn.PReLU) and m.num_parameters > 1
        ):
            if x is not None:
                if x.dims != (1,):
                    self.unsupported(node, f"{type(m).__name__} {name}", [x])
                    return None
                self.member((name, "out"), x.slots)
            return x
        if isinstance(m, nn.GroupNorm):
            if x is not None:
                if m.num_groups == m.num_channels and x.dims == (1,):
                    self.member((name, "out"), x.slots)
                else:
                    self.uf.fix(x.slots, f"GroupNorm {name} statistics (groups={m.num_groups})")
            return x
        if isinstance(m, (nn.LayerNorm,)):
            if x is not None:
                nd = len(m.normalized_shape)
                self._fix_dims(x, range(len(shape) - nd, len(shape)), f"LayerNorm {name} statistics")
            return x
        if isinstance(m, _PASS_MODULES) or (isinstance(m, nn.PReLU) and m.num_parameters == 1):
            return x
        if isinstance(m, _POOL_MODULES):
            return self._spatial(node, f"{type(m).__name__} {name}", x)
        if isinstance(m, nn.Flatten):
            return self._reshape(node, x, _meta_shapes(node.args[0].meta.get("tensor_meta")), shape)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            if x is not None:
                self._fix_dims(x, [m.dim % len(shape)] if m.dim is not None else range(len(shape)), f"{name}")
            return x
        if isinstance(m, nn.ChannelShuffle):
            if x is not None:
                self.uf.fix(x.slots, f"ChannelShuffle {name}")
            return x
        if not anns:
            return None
        self.unsupported(node, f"module {name} ({type(m).__name__})", anns)
        return None

    def _fix_dims(self, ann: _Ann, dims, reason: str) -> None:
        if any(d in ann.dims for d in dims):
            self.uf.fix(ann.slots, reason)

    def _spatial(self, node, what: str, x) -> Any:
        if x is None:
            return None
        if any(d >= 2 for d in x.dims) or 0 in x.dims:
            self.unsupported(node, what + " over channel dims", [x])
            return None
        return x

    def _reshape(self, node, x: _Ann | None, in_shape, out_shape) -> Any:
        if x is None or in_shape is None or out_shape is None:
            return None
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        groups = _reshape_groups(in_shape, out_shape)
        if groups is None:
            self.unsupported(node, f"reshape {in_shape}->{out_shape}", [x])
            return None
        d_in, d_out = [], []
        for gi, gj in groups:
            if any(d in x.dims for d in gi):
                annotated = [d for d in gi if d in x.dims and in_shape[d] > 1]
                if len(annotated) > 1 or len([j for j in gj if out_shape[j] > 1]) > 1:
                    # a channel dim split into several (channel shuffle) or two channel
                    # dims merged: the mapping changes with the channel count
                    self.uf.fix(x.slots, f"reshape {in_shape}->{out_shape} splits channels")
                d_in += gi
                d_out += gj
        # expand the annotation over d_in (broadcast along non-channel dims), then reshape
        arr = x.slots
        order = [x.dims.index(d) for d in d_in if d in x.dims]
        arr = np.transpose(arr, order) if order else arr
        expand_shape = []
        src = iter(range(arr.ndim))
        for d in d_in:
            if d in x.dims:
                expand_shape.append(in_shape[d])
                next(src)
            else:
                expand_shape.append(1)
        arr = arr.reshape(expand_shape)
        arr = np.broadcast_to(arr, [in_shape[d] for d in d_in]).reshape([out_shape[d] for d in d_out])
        ann = _Ann(tuple(d_out), np.ascontiguousarray(arr))
        return self._simplify(ann)

    @staticmethod
    def _simplify(ann: _Ann) -> _Ann:
        """Drop dims along which the slots are constant (size-1 or broadcast) when others remain."""
        dims, arr = list(ann.dims), ann.slots
        axis = 0
        while axis < arr.ndim and arr.ndim > 1:
            first = np.take(arr, [0], axis=axis)
            if np.all(arr == first):
                arr = np.squeeze(first, axis=axis)
                dims.pop(axis)
            else:
                axis += 1
        return _Ann(tuple(dims), arr)

    def _permute(self, x: _Ann | None, perm: list[int]) -> Any:
        if x is None:
            return None
        perm = [p % len(perm) for p in perm]
        new_dims = [perm.index(d) for d in x.dims]
        order = np.argsort(new_dims)
        return _Ann(tuple(new_dims[i] for i in order), np.transpose(x.slots, order))

    def _binary(self, node, env, shape) -> Any:
        operands = []
        for arg in node.args[:2]:
            ann = self.ann_of(arg, env)
            meta = _meta_shapes(arg.meta.get("tensor_meta")) if isinstance(arg, torch.fx.Node) else None
            operands.append((arg, ann, meta))
        tracked = [o for o in operands if isinstance(o[1], _Ann)]
        if not tracked:
            return None
        ndim = len(shape)
        out_dims = sorted({d + ndim - len(o[2]) for o in tracked for d in o[1].dims})
        target_shape = [shape[d] for d in out_dims]
        arrays = []
        for _arg, ann, meta in operands:
            if isinstance(ann, _Ann):
                offset = ndim - len(meta)
                dims = [d + offset for d in ann.dims]
                arr = ann.slots.reshape([ann.slots.shape[dims.index(d)] if d in dims else 1 for d in out_dims])
                arrays.append(np.broadcast_to(arr, target_shape))
            elif isinstance(ann, tuple) and ann[0] == "param" and meta is not None:
                offset = ndim - len(meta)
                axes = [d - offset for d in out_dims if d - offset >= 0 and meta[d - offset] > 1]
                if len(axes) == 1 and sum(1 for s in meta if s > 1) == 1:
                    full = np.broadcast_to(arrays[0] if arrays else tracked[0][1].slots, target_shape)
                    col = out_dims.index(axes[0] + offset)
                    slots = np.moveaxis(full, col, 0).reshape(full.shape[col], -1)[:, 0]
                    owner, _, pname = ann[1].rpartition(".")
                    self.member((owner, f"param:{pname}:{axes[0]}"), slots)
                elif any(s > 1 for s in meta):
                    for o in tracked:
                        self.uf.fix(o[1].slots, f"combined with parameter {ann[1]}")
            elif meta is not None and any(
                meta[d - (ndim - len(meta))] > 1 for d in out_dims if d - (ndim - len(meta)) >= 0
            ):
                for o in tracked:
                    self.uf.fix(o[1].slots, f"combined element-wise with an untracked tensor ({node.name})")
        if len(arrays) == 2:
            a, b = arrays
            pairs = np.unique(np.stack([a.reshape(-1), b.reshape(-1)], 1), axis=0)
            for s, t in pairs.tolist():
                self.uf.union(s, t)
        return _Ann(tuple(out_dims), np.ascontiguousarray(arrays[0]))

    def _dim_arg(self, node, index: int, name: str, default: Any) -> Any:
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    def _cat(self, node, env, shape) -> Any:
        tensors = node.args[0]
        dim = self._dim_arg(node, 1, "dim", 0) % len(shape)
        parts, any_ann = [], False
        for t in tensors:
            ann = self.ann_of(t, env)
            meta = _meta_shapes(t.meta.get("tensor_meta"))
            if isinstance(ann, _Ann):
                any_ann = True
                if ann.dims != (dim,):
                    self.unsupported(node, f"cat along dim {dim} of channels in dims {ann.dims}", [ann])
                    return None
                parts.append(ann.slots)
            else:
                parts.append(self.uf.new(meta[dim], fixed="concatenated with an untracked tensor"))
        if not any_ann:
            return None
        return _Ann((dim,), np.concatenate(parts))

    def _split(self, node, x: _Ann | None, shape) -> Any:
        if x is None:
            return None
        dim = self._dim_arg(node, 2, "dim", 0)
        dim = dim % len(_meta_shapes(node.args[0].meta.get("tensor_meta")))
        if dim in x.dims:
            self.uf.fix(x.slots, f"{node.name}: split/chunk with fixed sizes")
            return None
        return [x for _ in (shape or [])]

    def _getitem(self, node, env, shape) -> Any:
        src = self.ann_of(node.args[0], env)
        idx = node.args[1]
        if isinstance(src, list):
            return src[idx] if isinstance(idx, int) and idx < len(src) else None
        if not isinstance(src, _Ann):
            return None
        in_shape = _meta_shapes(node.args[0].meta.get("tensor_meta"))
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            fill = len(in_shape) - (len(idx) - 1 - sum(i is None for i in idx))
            idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
        dims_out: dict[int, int] = {}
        d_in = d_out = 0
        for i in idx:
            if i is None:
                d_out += 1
                continue
            if isinstance(i, slice):
                if d_in in src.dims and i != slice(None):
                    self.uf.fix(src.slots, f"{node.name}: slice of channels with fixed bounds")
                    return None
                dims_out[d_in] = d_out
                d_in += 1
                d_out += 1
            elif isinstance(i, int):
                if d_in in src.dims:
                    self.uf.fix(src.slots, f"{node.name}: indexing one channel")
                    return None
                d_in += 1
            else:
                self.unsupported(node, f"indexing with {type(i).__name__}", [src])
                return None
        for rest in range(d_in, len(in_shape)):
            dims_out[rest] = d_out + rest - d_in
        return _Ann(tuple(dims_out[d] for d in src.dims), src.slots)

    def visit_method(self, node, name: str, x, anns, env, shape) -> Any:
        if not anns:
            return None
        if name in _PASS_METHODS:
            return x
        if name in _BINARY_METHODS:
            return self._binary(node, env, shape)
        if name in _RESHAPE_METHODS:
            return self._reshape(node, x, _meta_shapes(node.args[0].meta.get("tensor_meta")), shape)
        if name in ("permute", "transpose"):
            in_nd = len(shape)
            perm = list(range(in_nd))
            if name == "permute":
                perm = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
            else:
                a, b = node.args[1] % in_nd, node.args[2] % in_nd
                perm[a], perm[b] = perm[b], perm[a]
            return self._permute(x, perm)
        if name in ("split", "chunk"):
            return self._split(node, x, shape)
        if name in _REDUCE_METHODS:
            return self._reduce(node, x, shape)
        if name in ("size", "dim", "numel"):
            return None
        self.unsupported(node, f"tensor method .{name}()", anns)
        return None

    def _reduce(self, node, x, shape) -> Any:
        in_shape = _meta_shapes(node.args[0].meta.get("tensor_meta"))
        dims = self._dim_arg(node, 1, "dim", None)
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        nd = len(in_shape)
        dims = list(range(nd)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
        dims = [d % nd for d in dims]
        if any(d in x.dims for d in dims):
            self.uf.fix(x.slots, f"{node.name}: reduction over channels")
            return None
        if keep:
            return x
        return _Ann(tuple(d - sum(r < d for r in dims) for d in x.dims), x.slots)

    def visit_function(self, node, fn, x, anns, env, shape) -> Any:
        if fn is operator.getitem:
            return self._getitem(node, env, shape)
        if not anns or fn in (getattr, len, torch._assert):  # shape queries and checks
            return None
            return None
        if fn in _PASS_FUNCTIONS or getattr(fn, "__name__", "") in _PASS_FUNCTION_NAMES:
            return x
        if fn in _BINARY:
            return self._binary(node, env, shape)
        if fn in _POOL_FUNCTIONS:
            return self._spatial(node, getattr(fn, "__name__", str(fn)), x)
        if fn in _RESHAPE_FUNCTIONS:
            return self._reshape(node, x, _meta_shapes(node.args[0].meta.get("tensor_meta")), shape)
        if fn in (torch.permute,):
            return self._permute(x, list(node.args[1]))
        if fn is torch.transpose:
            perm = list(range(len(shape)))
            a, b = node.args[1] % len(shape), node.args[2] % len(shape)
            perm[a], perm[b] = perm[b], perm[a]
            return self._permute(x, perm)
        if fn in (torch.cat, torch.concat):
            return self._cat(node, env, shape)
        if fn in (torch.split, torch.chunk):
            return self._split(node, x, shape)
        if fn in _REDUCE_FUNCTIONS:
            return self._reduce(node, x, shape)
        if fn is F.layer_norm:
            nd = len(node.args[1]) if len(node.args) > 1 else len(node.kwargs["normalized_shape"])
            self._fix_dims(x, range(len(shape) - nd, len(shape)), f"{node.name}: layer_norm statistics")
            return x
        if fn in (F.softmax, torch.softmax, F.log_softmax):
            dim = self._dim_arg(node, 1, "dim", -1) % len(shape)
            self._fix_dims(x, [dim], f"{node.name}: softmax over channels")
            return x
        if fn is torch.flatten:
            return self._reshape(node, x, _meta_shapes(node.args[0].meta.get("tensor_meta")), shape)
        self.unsupported(node, f"function {getattr(fn, '__name__', fn)}", anns)
        return None


def _meta_trace(model: nn.Module, example_inputs: torch.Tensor) -> torch.fx.GraphModule:
    """Fallback: trace a meta-device copy so that control flow on shapes is resolved."""
    import copy

    from torch.fx.experimental.meta_tracer import MetaTracer

    meta_model = copy.deepcopy(model).to("meta")
    arg = next(iter(inspect.signature(model.forward).parameters))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = MetaTracer().trace(meta_model, meta_args={arg: example_inputs.to("meta")})
    return torch.fx.GraphModule(model, graph)


def trace(model: nn.Module, example_inputs: torch.Tensor) -> torch.fx.GraphModule:
    """fx-trace ``model`` and record every node's output shape on ``example_inputs``."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types on shape-dependent control flow
        try:
            gm = _meta_trace(model, example_inputs)
        except Exception:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UnsupportedModelError(
                f"{type(model).__name__} cannot be traced by torch.fx ({first}); "
                "make its forward free of data-dependent control flow or prune it layer by layer"
            ) from None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_inputs)
    finally:
        model.train(was_training)
    return gm


def _members_by_root(axes: dict[Axis, np.ndarray], roots: np.ndarray) -> dict[int, dict[Axis, np.ndarray]]:
    """Positions every root's slots occupy on every axis.

    Roots come in the order their first slot appears when the axes are walked in insertion
    order; inside a root, axes keep that order and positions ascend.
    """
    names = [a for a, slots in axes.items() if len(slots)]
    if not names:
        return {}
    sizes = [len(axes[a]) for a in names]
    slot_roots = roots[np.concatenate([axes[a] for a in names])]
    axis_ids = np.repeat(np.arange(len(names)), sizes)
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])
    uniq, first, inverse = np.unique(slot_roots, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    order = np.argsort(rank[inverse.reshape(-1)], kind="stable")
    run_roots, run_axes = slot_roots[order], axis_ids[order]
    new_root = np.r_[True, np.diff(run_roots) != 0]
    starts = np.flatnonzero(new_root | np.r_[True, np.diff(run_axes) != 0])
    positions = positions[order]
    positions.setflags(write=False)
    bounds = np.r_[starts, len(positions)].tolist()
    runs = [positions[a:b] for a, b in zip(bounds, bounds[1:])]
    run_names = [names[a] for a in run_axes[starts].tolist()]
    root_bounds = np.r_[np.flatnonzero(new_root[starts]), len(starts)].tolist()
    return {root: dict(zip(run_names[a:b], runs[a:b], strict=True))
            for root, a, b in zip(run_roots[starts][root_bounds[:-1]].tolist(), root_bounds, root_bounds[1:])}


def _fixed_roots(uf: _UnionFind, roots: np.ndarray) -> dict[int, str]:
    """Reason of every fixed root: that of its slot fixed first."""
    if not uf.fixed:
        return {}
    slots = np.fromiter(uf.fixed, dtype=np.int64, count=len(uf.fixed))
    reasons = list(uf.fixed.values())
    fixed, first = np.unique(roots[slots], return_index=True)
    return {r: reasons[i] for r, i in zip(fixed.tolist(), first.tolist(), strict=True)}


def _producers_of(uf: _UnionFind, roots: np.ndarray) -> dict[int, set[str]]:
    """Names of the layers whose fresh slots joined each root."""
    out: dict[int, set[str]] = defaultdict(set)
    for start, count, (name, _) in uf.produced:
        for root in np.unique(roots[start:start + count]).tolist():
            out[root].add(name)
    return out


def _partition_of(slots: np.ndarray, g: int, roots: np.ndarray, fixed: dict[int, str],
                  producers_of: dict[int, set[str]], members: dict[tuple[str, ...], set[int]]):
    """(producers, partition) of one grouped-conv constraint, or None when it cannot hold.

    ``slots``: ``[C]`` channel slots of a grouped conv's input or output; ``g``: its groups.
    It holds when every channel is its own free unit and the units are exactly one group's.
    """
    r = roots[slots]
    if len(np.unique(r)) != len(r) or any(x in fixed for x in r.tolist()):
        return None
    producers = {tuple(sorted(producers_of.get(x, ()))) for x in r.tolist()}
    if len(producers) != 1:
        return None
    (p,) = producers
    if not p or set(r.tolist()) != members.get(p, set()):
        return None
    return p, [sorted(row) for row in r.reshape(g, -1).tolist()]


def _finer(a: list[list[int]], b: list[list[int]]) -> list[list[int]] | None:
    """The partition of ``a`` and ``b`` that refines the other (equal removal there holds for both), or None."""
    if a == b or all(any(set(x) <= set(y) for y in b) for x in a):
        return a
    if all(any(set(y) <= set(x) for x in a) for y in b):
        return b
    return None


def _group_partitions(constraints: list[tuple[np.ndarray, int, str]], roots: np.ndarray, fixed: dict[int, str],
                      producers_of: dict[int, set[str]], by_root: dict) -> dict[tuple[str, ...], list[list[int]]]:
    """Partition of each group that reaches grouped convs; fixes (in ``fixed``) the roots of the others.

    A constraint fails when its channels are not exactly one group's free units, or when two
    grouped convs split one group in ways neither of which refines the other (the finer one
    is kept otherwise); fixing its roots may break others, so repeat.
    """
    while True:
        members: dict[tuple[str, ...], set[int]] = defaultdict(set)
        for root in by_root:
            if root not in fixed:
                members[tuple(sorted(producers_of.get(root, ())))].add(root)
        partitions: dict[tuple[str, ...], list[list[int]]] = {}
        failed = None
        for slots, g, reason in constraints:
            r = roots[slots]
            if all(x in fixed for x in r.tolist()):
                continue
            found = _partition_of(slots, g, roots, fixed, producers_of, members)
            if found is not None:
                finer = _finer(partitions.setdefault(found[0], found[1]), found[1])
                if finer is not None:
                    partitions[found[0]] = finer
                    continue
            failed = (r, reason)
            break
        if failed is None:
            return partitions
        for x in np.unique(failed[0]).tolist():
            fixed.setdefault(x, failed[1])


def _assemble(builder: _Builder, model: nn.Module) -> ChannelGraph:
    """Units and groups from the builder's union-find classes, plus the unused-module warnings."""
    uf = builder.uf
    roots = uf.roots()
    fixed_roots = _fixed_roots(uf, roots)
    producers_of = _producers_of(uf, roots)
    units: dict[int, Unit] = {}
    fixed_reasons: dict[str, str] = {}
    grouped: dict[tuple[str, ...], list[int]] = defaultdict(list)
    by_root = _members_by_root(builder.axes, roots)
    partitions = _group_partitions(builder.grouped, roots, fixed_roots, producers_of, by_root)
    for root, members in by_root.items():
        producers = tuple(sorted(producers_of.get(root, ())))
        if root in fixed_roots or not producers:
            for p in producers:
                fixed_reasons.setdefault(p, fixed_roots.get(root, "no producer"))
            continue
        units[root] = Unit(root, members, producers)
        grouped[producers].append(root)
    groups = [Group(",".join(p), p, sorted(u), partitions.get(p)) for p, u in grouped.items()]
    used = builder.used
    for name, module in model.named_modules():
        if name and name not in used and any(True for _ in module.parameters(recurse=False)) and not any(
            name.startswith(k + ".") for k in used
        ):
            builder.warnings.append(f"module {name} has parameters but is not used by forward on the example inputs")
    for slots in builder.axes.values():
        slots.setflags(write=False)
    return ChannelGraph(builder.axes, units, groups, fixed_reasons, builder.warnings)


_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_SKIPPED_ATTRS = {"training", "_parameters", "_buffers", "_modules"}


def _freeze(value: Any, depth: int = 0) -> Any:
    """Hashable stand-in for a module attribute: values for data, identities for objects."""
    if isinstance(value, _ATOMS):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if depth < 8:
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(_freeze(v, depth + 1) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple((_freeze(k, depth + 1), _freeze(v, depth + 1)) for k, v in value.items()))
        if isinstance(value, (set, frozenset)):
            return ("set", frozenset(_freeze(v, depth + 1) for v in value))
        if isinstance(value, functools.partial):
            return ("partial", _freeze(value.func, depth + 1), _freeze(value.args, depth + 1),
                    _freeze(value.keywords, depth + 1))
    return ("object", type(value).__qualname__, id(value))


def _tensors(table: dict[str, torch.Tensor | None]) -> tuple:
    return tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in table.items())


def structure_key(model: nn.Module, example_inputs: torch.Tensor, on_unsupported: str) -> tuple:
    """Hashable summary of everything the channel graph of ``model`` depends on.

    The module tree; every module's class and its ``forward``, attributes (hooks included)
    and parameter and buffer shapes; the input's shape, dtype and device; ``on_unsupported``.
    Two models with equal keys (a model and its deep copy) trace to the same graph; any
    change surgery makes (channel counts, parameter shapes, replaced modules) changes the key.
    Weights' values are not part of it; attributes that are neither data nor tensors count
    by identity.
    """
    parts: list[Any] = [on_unsupported, tuple(example_inputs.shape), example_inputs.dtype,
                        example_inputs.device.type]
    for name, m in model.named_modules():
        attrs = tuple((k, _freeze(v)) for k, v in vars(m).items() if k not in _SKIPPED_ATTRS)
        parts.append((name, type(m), type(m).forward, attrs, _tensors(m._parameters), _tensors(m._buffers)))
    return tuple(parts)


class _GraphCache:
    """The last few graphs built, by :func:`structure_key`; hands out fresh containers only."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: OrderedDict[tuple, ChannelGraph] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> ChannelGraph | None:
        with self.lock:
            graph = self.entries.get(key)
            if graph is None:
                return None
            self.entries.move_to_end(key)
        return _share(graph)

    def put(self, key: tuple, graph: ChannelGraph) -> None:
        entry = _share(graph)
        with self.lock:
            self.entries[key] = entry
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


def _share(graph: ChannelGraph) -> ChannelGraph:
    """Copy of ``graph`` with its own dicts, lists, units and groups; the read-only arrays are shared."""
    return ChannelGraph(
        dict(graph.axes), {uid: Unit(uid, dict(u.members), u.producers) for uid, u in graph.units.items()},
        [Group(g.name, g.producers, list(g.units), g.partitions and [list(p) for p in g.partitions])
         for g in graph.groups],
        dict(graph.fixed_reasons), list(graph.warnings),
    )


_CACHE = _GraphCache()


def clear_graph_cache() -> None:
    """Forget every cached graph (the next :func:`build_graph` traces again)."""
    _CACHE.clear()


def build_graph(model: nn.Module, example_inputs: torch.Tensor, on_unsupported: str = "error",
                cache: bool = True) -> ChannelGraph:
    """Trace ``model`` on ``example_inputs`` and return its coupled channel units and groups.

    ``on_unsupported``: ``error`` raises UnsupportedModelError naming an op the graph does
    not understand when pruned channels reach it; ``skip`` keeps those channels (a warning
    is recorded in ``graph.warnings`` and emitted). The model is not modified.
    ``cache``: reuse the graph of an earlier call whose :func:`structure_key` is equal (the
    same model again, or a deep copy of it, as in a ratio search); the last 4 are kept.
    The index arrays of the graph are read-only (graphs from the cache share them).
    """
    if on_unsupported not in ("error", "skip"):
        raise ConfigError(f"on_unsupported must be 'error' or 'skip', got {on_unsupported!r}")
    if not isinstance(example_inputs, torch.Tensor):
        raise ConfigError(f"example_inputs must be one tensor batch, got {type(example_inputs).__name__}")
    key = structure_key(model, example_inputs, on_unsupported) if cache else None
    graph = _CACHE.get(key) if cache else None
    if graph is None:
        graph = _build(model, example_inputs, on_unsupported)
        if cache:
            _CACHE.put(key, graph)
    graph.modules = dict(model.named_modules())
    for w in graph.warnings:
        warnings.warn(w, stacklevel=2)
    return graph


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block.

    Tracing and the unit tables allocate many short-lived containers; with the collector on,
    they survive its young collections while in use and trigger full collections (about
    0.2 s each in a process that imported torch). Paused, the garbage is reclaimed by a
    cheap young collection afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _build(model: nn.Module, example_inputs: torch.Tensor, on_unsupported: str) -> ChannelGraph:
    was_training = model.training
    model.eval()
    try:
        with gc_paused():
            gm = trace(model, example_inputs)
            builder = _Builder(model, on_unsupported)
            builder.run(gm)
            return _assemble(builder, model)
    finally:
        model.train(was_training)
