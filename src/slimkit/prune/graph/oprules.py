"""The built-in channel rules: every op of a CNN (and of the CNN parts of hybrids), by spelling.

Each rule is registered with :func:`slimkit.prune.graph.rules.register_channel_rule`, the
function a user calls for a layer of their own. Layers are recognised by what they do, in
whichever spelling they arrive: ``nn.Conv2d`` as a module, or ``F.conv2d(x, self.weight)``
inside a subclass (timm's ``Conv2dSame``, weight-standardized convs) whose weight comes from
a ``get_attr`` node (even through a standardization: a value computed from parameters only
that has the weight's shape is the weight); the same for linear, batch/instance/group/layer
norm and PReLU. Parameters of a layer that is a subclass of the torch layer (timm's
``BatchNormAct2d`` is an ``nn.BatchNorm2d``) are cut as that layer; others as ``param:``
slices. Norms whose statistics span channels (LayerNorm over C, GroupNorm with groups < C,
reductions over channels) keep their channels under ``norm_channels='keep'`` (exact) and are
pruned under ``'prune'`` (GroupNorm losing as many channels in every group).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimkit import tracing
from slimkit.prune.graph import heads
from slimkit.prune.graph.core import Ann, ParamRef, distinct
from slimkit.prune.graph.heads import united_along
from slimkit.prune.graph.rules import ChannelOp, register_channel_rule
from slimkit.prune.graph.sizes import SizeOf, run_time_shape


def rule(*targets: Any, producer: bool = False):
    """Register the decorated function as the rule of every target."""

    def add(fn):
        for t in targets:
            register_channel_rule(t, fn, producer=producer)
        return fn

    return add


# -- shared helpers --------------------------------------------------------------------

def simplify(ann: Ann) -> Ann:
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
    return Ann(tuple(dims), arr)


def reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
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


def reshape(op: ChannelOp, x: Ann | None, in_shape, out_shape) -> Any:
    """Move the channel annotation through a row-major reshape (view, flatten, unflatten, ...)."""
    if x is None or in_shape is None or out_shape is None:
        return None
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    groups = reshape_groups(in_shape, out_shape)
    if groups is None:
        return op.unsupported(f"reshape {in_shape}->{out_shape}")
    d_in, d_out, splits = [], [], []
    heads_at = None
    for gi, gj in groups:
        if any(d in x.dims for d in gi):
            annotated = [d for d in gi if d in x.dims and in_shape[d] > 1]
            big = [j for j in gj if out_shape[j] > 1]
            if len(annotated) > 1 or len(big) > 1:
                # a channel dim split into several (channel shuffle, attention heads) or two
                # channel dims merged: the mapping changes with the channel count, unless every
                # unit spans one constant dim whole (see _split_by_constant) or whole heads move
                # (see .heads)
                found = heads.split(op, x, annotated, big, out_shape, _target_sizes(op), baked_sizes(op))
                if found is not None:
                    splits += found[0]
                    heads_at = found[1]
                    const = -1
                elif _merge_whole(op, x, annotated, big) or heads.merge(op, x, annotated, big, in_shape,
                                                                         _target_sizes(op), baked_sizes(op)):
                    const = -1
                else:
                    const = _split_by_constant(op, x, annotated, big)
                if const is None:
                    op.fix(x, f"reshape {in_shape}->{out_shape} splits channels")
                    if len(annotated) == 1 and baked_sizes(op):
                        _fix_layer_input(op, in_shape[annotated[0]])
                elif const >= 0:
                    splits.append(const)
            d_in += gi
            d_out += gj
    arr = x.slots
    order = [x.dims.index(d) for d in d_in if d in x.dims]
    arr = np.transpose(arr, order) if order else arr
    arr = arr.reshape([in_shape[d] if d in x.dims else 1 for d in d_in])
    arr = np.broadcast_to(arr, [in_shape[d] for d in d_in]).reshape([out_shape[d] for d in d_out])
    for j in splits:  # every unit spans the constant dim: unite along it
        axis = d_out.index(j)
        op.builder.uf.union_arrays(np.broadcast_to(arr.take([0], axis), arr.shape), arr)
    if heads_at is not None:
        heads.record(op, arr, d_out.index(heads_at))
    return simplify(Ann(tuple(d_out), np.ascontiguousarray(arr)))


def _fix_layer_input(op: ChannelOp, total: int) -> None:
    """In a graph with baked sizes, a split of a linear's output into heads: keep the linear's input channels.

    ``self.qkv(x).reshape(B, N, 3, heads, C // heads)`` reads ``C`` from ``x`` at run time
    (CrossViT), which the constants of a graph traced on meta tensors hide; an input with as many
    channels as the split dim is taken to be that source.
    """
    src = op.node.args[0] if op.node.args else None
    layer = op.builder.modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
    if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) and src.args:
        value = op.value(src.args[0])
        if isinstance(value, Ann) and value.slots.size == total:
            op.fix(value, f"{op.name}: splits the output of {src.target} into heads with sizes baked into the graph")


def _split_by_constant(op: ChannelOp, x: Ann, annotated: list[int], big: list[int]) -> int | None:
    """A channel dim split into (constant K, computed Q), where units span K whole.

    SelectiveKernel's ``view(B, paths, C // paths, H, W)``: pruning q removes it from all K
    blocks, so the layout stays aligned. Returns the output dim of K (whose slots the caller
    unites), or None.
    """
    if len(x.dims) == 1 and len(annotated) == 1 and len(big) == 2:
        start, sizes = _target_sizes(op)
        spec = {j: sizes[j - start] for j in big if 0 <= j - start < len(sizes)}
        if len(spec) != 2:
            return None
        const = [j for j in big if isinstance(spec[j], int) and spec[j] > 1]
        computed = [j for j in big if spec[j] == -1 or isinstance(spec[j], torch.fx.Node) and isinstance(
            op.value(spec[j]), SizeOf) and np.array_equal(distinct(op.value(spec[j]).slots), distinct(x.slots))]
        if len(const) != 1 or len(computed) != 1:
            return None
        op.node.meta["slimkit_split"] = set(big)  # sizes and constant-target checks accept these
        return const[0]
    return None  # (a merge back is not accepted: channel shuffle's transpose + flatten would unite a whole stream)


def _merge_whole(op: ChannelOp, x: Ann, annotated: list[int], big: list[int]) -> bool:
    """A merge of channel dims ``(A, B)`` into one where every unit spans ``B`` whole: pruning keeps a
    rectangle ``(A', B)``, whose row-major flattening is the annotation without the removed units.

    The channel shuffle's ``transpose(1, 2)`` + ``view(b, c, h, w)`` (positions ``2j, 2j + 1``:
    the ``j``-th channel of each half, one unit, see :func:`_split_by_constant`). The merged size
    must be computed: ``-1``, or the channel count of a tensor holding the same slots (the size
    read before the split: its count stays equal, no union is needed).
    """
    if len(big) != 1 or len(annotated) != 2 or tuple(sorted(x.dims)) != tuple(annotated):
        return False
    if not united_along(op, x, annotated[1]):
        return False
    start, sizes = _target_sizes(op)
    w = sizes[big[0] - start] if 0 <= big[0] - start < len(sizes) else None
    if w == -1 and not baked_sizes(op):
        return True
    size = op.value(w) if isinstance(w, torch.fx.Node) else None
    if isinstance(size, SizeOf) and size.exact and np.array_equal(np.sort(size.slots), np.sort(x.slots.reshape(-1))):
        op.node.meta["slimkit_split"] = {big[0]}  # (the sizes check would unite position by position)
        return True
    return False


def permute(x: Ann | None, perm: list[int]) -> Any:
    if x is None:
        return None
    perm = [p % len(perm) for p in perm]
    new_dims = [perm.index(d) for d in x.dims]
    order = np.argsort(new_dims)
    return Ann(tuple(new_dims[i] for i in order), np.transpose(x.slots, order))


def _param_axis(ref: ParamRef, meta: tuple[int, ...], local: int) -> int | None:
    """Axis of the parameter ``ref`` that dim ``local`` of its current value (shape ``meta``) is."""
    if ref.frozen:
        return None
    if tuple(meta) == tuple(ref.shape):
        return local
    big = [i for i, s in enumerate(ref.shape) if s > 1]
    if len(big) == 1 and ref.shape[big[0]] == meta[local]:
        return big[0]
    return None


def _gathered_axis(arg: Any, ref: ParamRef) -> int | None:
    """Axis 0 of ``param[:, index]`` (a bias per attention head gathered by a position index:
    EfficientFormer's and LeViT's ``attention_biases``): the gather keeps the first axis first."""
    if not (isinstance(arg, torch.fx.Node) and arg.op == "call_function" and arg.target is operator.getitem):
        return None
    src, idx = arg.args
    if not (isinstance(src, torch.fx.Node) and src.op == "get_attr" and src.target == ref.target
            and isinstance(idx, tuple) and len(idx) == 2 and idx[0] == slice(None)
            and isinstance(idx[1], torch.fx.Node) and not ref.frozen):
        return None
    return 0


def elementwise(op: ChannelOp, args: list[Any]) -> Any:
    """Element-wise op of several operands with broadcasting: channels they pair are united."""
    shape = op.shape
    if shape is None:
        return op.unsupported()
    ndim = len(shape)
    operands = [(a, op.value(a), op.shape_of(a)) for a in args if isinstance(a, torch.fx.Node)]
    tracked = [o for o in operands if isinstance(o[1], Ann)]
    if not tracked:
        return None
    out_dims = sorted({d + ndim - len(o[2]) for o in tracked for d in o[1].dims})
    target_shape = [shape[d] for d in out_dims]
    arrays = []
    for _arg, ann, meta in operands:
        if isinstance(ann, Ann):
            dims = [d + ndim - len(meta) for d in ann.dims]
            arr = ann.slots.reshape([ann.slots.shape[dims.index(d)] if d in dims else 1 for d in out_dims])
            arrays.append(np.broadcast_to(arr, target_shape))
    full = arrays[0]
    for _arg, ann, meta in operands:
        if meta is None or isinstance(ann, Ann):
            continue
        offset = ndim - len(meta)
        spanned = [d for d in out_dims if d - offset >= 0 and meta[d - offset] > 1]
        if not spanned:
            continue
        axis = None
        if isinstance(ann, ParamRef) and len(spanned) == 1 and len(out_dims) == 1 and not any(
                math.prod(s) > 1 for _, s in ann.others):
            axis = _param_axis(ann, meta, spanned[0] - offset)
        elif isinstance(ann, ParamRef) and len(spanned) == 1 and len(out_dims) == 1 and spanned[0] == offset \
                and heads.whole_heads(op, tracked[0][1]):
            axis = _gathered_axis(_arg, ann)
        if axis is None:
            what = f"parameter {ann.target}" if isinstance(ann, ParamRef) else f"an untracked tensor ({op.node.name})"
            for o in tracked:
                op.fix(o[1], f"combined element-wise with {what}")
            continue
        op.member(ann.owner, f"param:{ann.pname}:{axis}", full.reshape(-1))
    for other in arrays[1:]:
        op.builder.uf.union_arrays(full, other)
    return Ann(tuple(out_dims), np.ascontiguousarray(full))


def spatial(op: ChannelOp) -> Any:
    """Pooling, resizing, padding over the spatial dims: channels (dim 1) go through."""
    x = op.x
    if x is None:
        return None
    if any(d >= 2 for d in x.dims) or 0 in x.dims:
        return op.unsupported(f"{op.what} over channel dims")
    return x


def _dims_arg(value: Any, nd: int) -> list[int] | None:
    if value is None:
        return None
    return [d % nd for d in ([value] if isinstance(value, int) else list(value))]


def reduce(op: ChannelOp, dims: Any, keep: bool, what: str = "reduction") -> Any:
    """A reduction over ``dims`` (None: all). Over channels: kept, or (``norm_channels='prune'``) let through."""
    x = op.x
    nd = len(op.in_shape)
    dims = list(range(nd)) if dims is None else _dims_arg(dims, nd)
    united = [d for d in dims if d in x.dims]
    if united and len(united) < len(x.dims) and 0 not in dims and all(united_along(op, x, d) for d in united):
        # over a dim each unit spans whole (SelectiveKernel's sum over paths): exact
        rest = [i for i, d in enumerate(x.dims) if d not in united]
        x = Ann(tuple(x.dims[i] for i in rest), x.slots[tuple(slice(None) if i in rest else 0
                                                              for i in range(len(x.dims)))])
    if any(d in x.dims for d in dims):
        if op.builder.norm_channels == "keep" or 0 in dims:
            op.fix(x, f"{op.name}: {what} over channels")
        return None
    if keep:
        return x
    return Ann(tuple(d - sum(r < d for r in dims) for d in x.dims), x.slots)


def _fix_dims(op: ChannelOp, x: Ann | None, dims, reason: str) -> None:
    if x is not None and any(d in x.dims for d in dims):
        op.fix(x, reason)


# -- conv / linear ---------------------------------------------------------------------

def _keep_known(op: ChannelOp, x: Ann, reason: str) -> None:
    """A known op that cannot prune the channels reaching it: they are kept, with a warning."""
    op.fix(x, reason)
    op.builder.warnings.append(f"{reason} (fx node {op.node.name!r}): those channels are kept")


def _mixes_other_dim(op: ChannelOp, layer: str, in_role: str, features: int) -> None:
    """A conv/linear whose features are a dim without channels: its inputs and outputs are not pruned."""
    op.member(layer, in_role, op.new_fixed(features, f"{layer} mixes a dim without channels"))

def _layer_roles(op: ChannelOp, ref: ParamRef | None, base: type) -> tuple[str, str, str, nn.Module | None]:
    """(layer, out role, in role, module) of a weight: the layer's axes when its owner is a ``base``."""
    if op.module is not None:
        return op.name, "out", "in", op.module
    owner = op.builder.modules.get(ref.owner) if ref is not None else None
    if isinstance(owner, base) and ref.pname == "weight":
        return ref.owner, "out", "in", owner
    return ref.owner, f"param:{ref.pname}:0", f"param:{ref.pname}:1", None


def _companions(op: ChannelOp, ref: ParamRef, out_slots: np.ndarray) -> None:
    """Parameters combined into a weight (a gain per filter) follow its output channels."""
    for name, shape in ref.others:
        if len(shape) and shape[0] == len(out_slots) and math.prod(shape) == len(out_slots):
            op.member(name.rpartition(".")[0], f"param:{name.rpartition('.')[2]}:0", out_slots)
        elif math.prod(shape) > 1:
            op.fix(Ann((0,), out_slots), f"weight of {ref.owner} is combined with {name}")


def conv(op: ChannelOp, weight_shape: tuple[int, ...], groups: int, ref: ParamRef | None = None,
         bias: ParamRef | None = None) -> Any:
    """A convolution: input channels on dim 1 are its ``in`` axis, its filters new channels.

    Depthwise (``groups == in channels``) passes the channels through (a member); a grouped
    conv records its input and output split into ``groups`` blocks. A 1-channel conv whose
    length axis carries the channels (ECA attention) passes them through along that axis.
    """
    x, shape = op.x, op.shape
    layer, out_role, in_role, module = _layer_roles(op, ref, nn.modules.conv._ConvNd)
    in_channels = weight_shape[1] * groups
    if x is not None and x.dims != (1,):
        if weight_shape[0] == weight_shape[1] == 1 and op.in_shape[1] == 1 and tuple(op.in_shape) == tuple(shape):
            return x  # ECA: the conv slides along the channel axis
        if 1 not in x.dims and 0 not in x.dims and all(
                weight_shape[d] == 1 and shape[d] == op.in_shape[d] for d in x.dims):
            # a 1x1 conv mixing a dim without channels (CoaT's aggregate of class tokens): each position on its own
            _mixes_other_dim(op, layer, in_role, in_channels)
            return x
        _keep_known(op, x, f"{op.what}: channels on dims {x.dims} it convolves")
        x = None
    in_slots = x.slots if x is not None else op.new_fixed(in_channels, "model input")
    if module is None and groups > 1:
        op.fix(x, f"groups of the functional conv on {layer} are not tracked")
        return op.fix(Ann((1,), op.produce(layer, 1, out_role).slots), f"{layer} (functional grouped conv)")
    if groups == 1:
        op.member(layer, in_role, in_slots)
        out = op.produce(layer, 1, out_role)
    elif groups == in_channels:  # depthwise (channel multiplier k = out/in)
        out = Ann((1,), np.repeat(in_slots, weight_shape[0] // in_channels))
        op.member(layer, out_role, out.slots)
    else:
        op.member(layer, in_role, in_slots)
        op.grouped(in_slots, groups, f"input of grouped conv {layer} (groups={groups})")
        out = op.produce(layer, 1, out_role)
        op.grouped(out.slots, groups, f"output of grouped conv {layer} (groups={groups})")
    if module is None and bias is not None:
        op.member(bias.owner, f"param:{bias.pname}:0", out.slots)
    if ref is not None:
        _companions(op, ref, out.slots)
    return out


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, producer=True)
def conv_module(op: ChannelOp) -> Any:
    return conv(op, tuple(op.module.weight.shape), op.module.groups)


def _weight(op: ChannelOp, index: int, name: str) -> ParamRef | None:
    ref = op.param(op.arg(index, name))
    return ref if ref is not None and op.shape_of(op.arg(index, name)) == tuple(ref.shape) else None


@rule(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, producer=True)
def conv_function(op: ChannelOp) -> Any:
    ref = _weight(op, 1, "weight")
    if ref is None:
        if not op.anns:
            return None
        return op.unsupported(f"{op.what} with a weight that is not a parameter")
    groups = op.arg(6, "groups", 1)
    if not isinstance(groups, int):
        return op.unsupported(f"{op.what} with computed groups")
    return conv(op, ref.shape, groups, ref, op.param(op.arg(2, "bias")))


def linear(op: ChannelOp, in_features: int, ref: ParamRef | None = None, bias: ParamRef | None = None) -> Any:
    """A linear layer over the last dim: its ``in`` axis and new output features."""
    x, shape = op.x, op.shape
    last = len(shape) - 1
    layer, out_role, in_role, module = _layer_roles(op, ref, nn.Linear)
    if x is not None and x.dims != (last,):
        if last not in x.dims:
            # it mixes a dim without channels (tokens: gMLP's spatial gating, a DCT): channels go through
            _mixes_other_dim(op, layer, in_role, in_features)
            return x
        _keep_known(op, x, f"{op.what}: channels in dims {x.dims}, its features among them")
        x = None
    op.member(layer, in_role, x.slots if x is not None else op.new_fixed(in_features, "model input"))
    out = op.produce(layer, last, out_role)
    if module is None and bias is not None:
        op.member(bias.owner, f"param:{bias.pname}:0", out.slots)
    if ref is not None:
        _companions(op, ref, out.slots)
    return out


@rule(nn.Linear, producer=True)
def linear_module(op: ChannelOp) -> Any:
    return linear(op, op.module.in_features)


@rule(F.linear, producer=True)
def linear_function(op: ChannelOp) -> Any:
    ref = _weight(op, 1, "weight")
    if ref is None:
        return op.unsupported(f"{op.what} with a weight that is not a parameter") if op.anns else None
    return linear(op, ref.shape[1], ref, op.param(op.arg(2, "bias")))


# -- per-channel layers and norms ------------------------------------------------------

def per_channel(op: ChannelOp, refs: list[ParamRef], base: type, what: str) -> Any:
    """A layer with one parameter slice per channel of dim 1 (BatchNorm, InstanceNorm, PReLU)."""
    x = op.x
    if x is None:
        return None
    if x.dims != (1,):
        return op.unsupported(f"{what} on channels outside dim 1")
    if op.module is not None:
        op.member(op.name, "out", x.slots)
        return x
    owners = {r.owner for r in refs}
    if len(owners) == 1 and isinstance(op.builder.modules.get(next(iter(owners))), base):
        op.member(next(iter(owners)), "out", x.slots)
        return x
    for r in refs:
        if len(r.shape) == 1 and r.shape[0] == len(x.slots):
            op.member(r.owner, f"param:{r.pname}:0", x.slots)
        elif math.prod(r.shape) > 1:
            return op.fix(x, f"{what}: parameter {r.target} does not follow the channels")
    return x


@rule(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def norm_module(op: ChannelOp) -> Any:
    return per_channel(op, [], nn.Module, op.what)


@rule(nn.PReLU)
def prelu_module(op: ChannelOp) -> Any:
    return op.x if op.module.num_parameters == 1 else per_channel(op, [], nn.Module, op.what)


def _refs(op: ChannelOp, *places: tuple[int, str]) -> list[ParamRef]:
    return [r for r in (op.param(op.arg(i, n)) for i, n in places) if r is not None]


@rule(F.batch_norm, torch.batch_norm)
def batch_norm_function(op: ChannelOp) -> Any:
    refs = _refs(op, (1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
    return per_channel(op, refs, nn.modules.batchnorm._BatchNorm, f"batch_norm {op.name}")


@rule(F.instance_norm, torch.instance_norm)
def instance_norm_function(op: ChannelOp) -> Any:
    refs = _refs(op, (1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
    return per_channel(op, refs, nn.modules.instancenorm._InstanceNorm, f"instance_norm {op.name}")


@rule(F.prelu, torch.prelu)
def prelu_function(op: ChannelOp) -> Any:
    refs = _refs(op, (1, "weight"))
    if refs and math.prod(refs[0].shape) == 1:
        return op.x
    return per_channel(op, refs, nn.PReLU, f"prelu {op.name}")


def group_norm(op: ChannelOp, groups: int, refs: list[ParamRef]) -> Any:
    """GroupNorm: per channel when ``groups == C``; else its statistics span channels."""
    x = op.x
    if x is None:
        return None
    if x.dims != (1,):
        return op.unsupported(f"{op.what} on channels outside dim 1")
    c = len(x.slots)
    if groups != c and op.builder.norm_channels == "keep":
        return op.fix(x, f"GroupNorm {op.name} statistics (groups={groups})") or x
    out = per_channel(op, refs, nn.GroupNorm, f"group_norm {op.name}")
    if 1 < groups < c:
        op.grouped(x.slots, groups, f"GroupNorm {op.name} (groups={groups})")
    return out


@rule(nn.GroupNorm)
def group_norm_module(op: ChannelOp) -> Any:
    return group_norm(op, op.module.num_groups, [])


@rule(F.group_norm, torch.group_norm)
def group_norm_function(op: ChannelOp) -> Any:
    groups = op.arg(1, "num_groups")
    if not isinstance(groups, int):
        return op.unsupported(f"{op.what} with computed groups")
    return group_norm(op, groups, _refs(op, (2, "weight"), (3, "bias")))


def layer_norm(op: ChannelOp, nd: int, refs: list[ParamRef]) -> Any:
    """LayerNorm over the last ``nd`` dims: channels among them follow its parameters (``prune``)."""
    x = op.x
    if x is None:
        return None
    ndim = len(op.in_shape)
    normalized = range(ndim - nd, ndim)
    inside = [d for d in x.dims if d in normalized]
    if not inside or len(inside) < len(x.dims) and all(united_along(op, x, d) for d in inside) and heads.whole_heads(
            op, x):
        return x  # (or over a dim each unit spans whole: q/k norm inside attention heads)
    if op.builder.norm_channels == "keep":
        return op.fix(x, f"LayerNorm {op.name} statistics") or x
    if len(x.dims) != 1:
        return op.fix(x, f"LayerNorm {op.name} over several channel dims") or x
    owner = op.module if op.module is not None else None
    name = op.name
    if owner is None and refs and isinstance(op.builder.modules.get(refs[0].owner), nn.LayerNorm):
        owner, name = op.builder.modules[refs[0].owner], refs[0].owner
    if isinstance(owner, nn.LayerNorm) and len(owner.normalized_shape) == 1:
        op.member(name, "out", x.slots)
        return x
    if not refs or not isinstance(op.arg(1, "normalized_shape"), torch.fx.Node) and owner is None:
        return op.fix(x, f"layer_norm {op.name}: its normalized shape is a constant") or x
    axis = x.dims[0] - (ndim - nd)
    for r in refs:
        op.member(r.owner, f"param:{r.pname}:{axis}", x.slots)
    return x


@rule(nn.LayerNorm)
def layer_norm_module(op: ChannelOp) -> Any:
    return layer_norm(op, len(op.module.normalized_shape), [])


@rule(F.layer_norm, torch.layer_norm)
def layer_norm_function(op: ChannelOp) -> Any:
    shape = op.arg(1, "normalized_shape")
    nd = 1 if isinstance(shape, (int, torch.fx.Node)) else len(shape)
    return layer_norm(op, nd, _refs(op, (2, "weight"), (3, "bias")))


def _rms_norm(op: ChannelOp) -> Any:
    shape = op.arg(1, "normalized_shape")
    nd = 1 if isinstance(shape, (int, torch.fx.Node)) else len(shape)
    return layer_norm(op, nd, _refs(op, (2, "weight")))


if hasattr(F, "rms_norm"):
    register_channel_rule(F.rms_norm, _rms_norm)
if hasattr(nn, "RMSNorm"):
    register_channel_rule(nn.RMSNorm, lambda op: layer_norm(op, len(op.module.normalized_shape), []))


# -- activations, element-wise maths, dropout: channels go through ---------------------

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardshrink, nn.Softshrink,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.RReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)
_PASS_FUNCTION_NAMES = (
    "relu", "relu_", "relu6", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu", "leaky_relu_", "rrelu",
    "rrelu_", "gelu", "logsigmoid", "hardshrink", "tanhshrink", "softsign", "softplus", "softshrink", "tanh",
    "sigmoid", "hardsigmoid", "silu", "mish", "hardswish", "hardtanh", "hardtanh_", "threshold", "threshold_",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
)
_UNARY = (
    "abs", "neg", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "square", "sign", "erf",
    "erfc", "reciprocal", "sin", "cos", "floor", "ceil", "round", "trunc", "frac", "clamp", "clip", "clamp_min",
    "clamp_max", "nan_to_num", "sigmoid", "tanh", "relu", "clone", "detach", "positive", "logit", "sgn",
)
_METHOD_PASS = _UNARY + tuple(n + "_" for n in _UNARY) + (
    "contiguous", "float", "double", "half", "bfloat16", "to", "type", "type_as", "requires_grad_", "cpu", "cuda",
    "gelu", "silu", "hardswish", "hardsigmoid", "softplus",
)
for _m in _PASS_MODULES:
    register_channel_rule(_m, "pass")
for _n in _PASS_FUNCTION_NAMES:
    register_channel_rule(getattr(F, _n), "pass")
for _n in _UNARY:
    if hasattr(torch, _n):
        register_channel_rule(getattr(torch, _n), "pass")
for _n in _METHOD_PASS:
    register_channel_rule(_n, "pass")
for _f in (torch.relu_, torch.sigmoid_ if hasattr(torch, "sigmoid_") else torch.sigmoid, torch.selu, torch.celu,
           torch.rrelu, torch.threshold, torch.dropout, torch.alpha_dropout, torch.feature_dropout,
           torch.clamp_min, torch.clamp_max):
    register_channel_rule(_f, "pass")
#: torchvision's stochastic depth drops whole samples (recognised without importing torchvision)
register_channel_rule("function:torchvision.ops.stochastic_depth.stochastic_depth", "pass")
register_channel_rule("function:timm.layers.drop.drop_path", "pass")


# -- pooling, resizing, padding --------------------------------------------------------

_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
_SPATIAL_FUNCTIONS = (
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "lp_pool1d", "lp_pool2d", "fractional_max_pool2d", "interpolate", "upsample", "upsample_nearest",
    "upsample_bilinear",
)
for _m in _SPATIAL_MODULES:
    register_channel_rule(_m, spatial)
for _n in _SPATIAL_FUNCTIONS:
    register_channel_rule(getattr(F, _n), spatial)
for _n in ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d"):
    if hasattr(torch, _n):
        register_channel_rule(getattr(torch, _n), spatial)
for _n in ("adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool2d", "avg_pool3d"):
    if hasattr(torch._C._nn, _n):
        register_channel_rule(getattr(torch._C._nn, _n), spatial)


@rule(F.pad)
def pad(op: ChannelOp) -> Any:
    """Padding of the last ``len(pad) // 2`` dims; padding a channel dim keeps it."""
    x, widths = op.x, op.arg(1, "pad")
    ndim = len(op.in_shape)
    if not isinstance(widths, (list, tuple)):
        return op.fix(x, f"{op.name}: padding computed at run time") or x
    padded = [ndim - 1 - i for i in range(len(widths) // 2) if widths[2 * i] or widths[2 * i + 1]]
    _fix_dims(op, x, padded, f"{op.name}: padding of a channel dim")
    return x


@rule(nn.Unfold)
def unfold_module(op: ChannelOp) -> Any:
    """im2col, ``[B, C, H, W] -> [B, C*k*k, L]``: channel ``c`` becomes positions ``c*k*k .. (c+1)*k*k - 1``.

    (The functional spelling ``F.unfold`` stays unknown: a layer built around it, as in the
    docs' custom-layer example, describes itself with a rule of its own.)
    """
    x = op.x
    if x.dims != (1,):
        return _keep_known(op, x, f"{op.what}: channels on dims {x.dims}")
    return Ann((1,), np.repeat(x.slots, op.shape[1] // op.in_shape[1]))


@rule(nn.Fold, F.fold)
def fold(op: ChannelOp) -> Any:
    """col2im, ``[B, C*k*k, L] -> [B, C, H, W]``: the ``k*k`` positions of a channel are pruned together."""
    x = op.x
    if x.dims != (1,):
        return _keep_known(op, x, f"{op.what}: channels on dims {x.dims}")
    rows = x.slots.reshape(op.shape[1], -1)
    op.builder.uf.union_arrays(np.broadcast_to(rows[:, :1], rows.shape), rows)
    return Ann((1,), np.ascontiguousarray(rows[:, 0]))


@rule("unfold")
def tensor_unfold(op: ChannelOp) -> Any:
    """``x.unfold(dim, size, step)``: windows along ``dim`` (a new last dim); channels on other dims go through."""
    x, nd = op.x, len(op.in_shape)
    dim = op.arg(1, "dimension")
    if not isinstance(dim, int) or dim % nd in x.dims:
        return _keep_known(op, x, f"{op.name}: unfold along a channel dim")
    return x


@rule(nn.LSTM, nn.GRU, nn.RNN)
def rnn(op: ChannelOp) -> Any:
    """A recurrent layer reads features on its last dim (its ``in`` axis: the input weights' columns).

    Its hidden state is not pruned (the output and the final states leave untracked).
    """
    x = op.x
    if x is not None:
        if x.dims == (len(op.in_shape) - 1,):
            op.member(op.name, "in", x.slots)
        else:
            _keep_known(op, x, f"{op.what}: channels on dims {x.dims}, its features among them")
    for other in op.anns:
        if other is not x:  # initial states
            op.fix(other, f"{op.what}: initial state")
    return [None, None]


@rule(F.grid_sample)
def grid_sample(op: ChannelOp) -> Any:
    x = op.x
    grid = op.value(op.arg(1, "grid"))
    if isinstance(grid, Ann):
        op.fix(grid, f"{op.name}: sampling grid")
    return x if x is not None and x.dims == (1,) else op.unsupported(f"{op.what} over channel dims")


@rule(F.pixel_shuffle, F.pixel_unshuffle, nn.PixelShuffle, nn.PixelUnshuffle, F.glu, nn.GLU)
def channel_structured(op: ChannelOp) -> Any:
    """Ops that read the channel axis as blocks (depth-to-space, GLU halves): channels kept."""
    return op.keep(f"{op.what} reads channels as blocks")


@rule(nn.ChannelShuffle, F.channel_shuffle, torch.channel_shuffle, torch.native_channel_shuffle)
def channel_shuffle(op: ChannelOp) -> Any:
    op.fix(op.x, f"ChannelShuffle {op.name}")
    return op.x


@rule(nn.MultiheadAttention)
def multihead_attention(op: ChannelOp) -> Any:
    """Fused projections with heads inside: the channels that reach it are kept."""
    op.keep(f"{op.what}: fused attention projections")
    return [None, None]


#: attention written as one wrapped function (fx keeps it whole): its channels are kept
for _key in ("function:torchvision.models.swin_transformer.shifted_window_attention",):
    register_channel_rule(_key, lambda op: op.keep(f"{op.what}: fused window attention"))
#: Swin's patch merging pads H and W of a channels-last tensor
register_channel_rule("function:torchvision.models.swin_transformer._patch_merging_pad", "pass")


@rule(F.scaled_dot_product_attention)
def sdpa(op: ChannelOp) -> Any:
    """Attention ``softmax(q k^T) v``: the query/key feature dims are contracted together."""
    q, k, v = (op.value(op.arg(i, n)) for i, n in ((0, "query"), (1, "key"), (2, "value")))
    nd = len(op.in_shape)
    if all(isinstance(t, Ann) and t.dims == (nd - 3, nd - 1) and united_along(op, t, nd - 1)
           and heads.whole_heads(op, t) for t in (q, k, v)) and q.slots.shape == k.slots.shape:
        # whole heads (see .heads): the heads dim is a batch dim here
        mask = op.arg(3, "attn_mask")
        mask_ann, mask_shape = op.value(mask), op.shape_of(mask)
        if isinstance(mask_ann, Ann) and mask_ann.dims == (len(mask_shape) - 3,) and len(mask_ann.slots) == len(
                q.slots):  # a bias per head computed by a layer (a relative-position MLP): it follows the heads
            op.builder.uf.union_arrays(q.slots[:, 0], mask_ann.slots)
        elif mask_ann is not None or mask_shape is not None and len(mask_shape) >= 3 and mask_shape[-3] > 1:
            return op.keep(f"{op.name}: attention mask per head")
        op.builder.uf.union_arrays(q.slots, k.slots)
        op.builder.uf.union_arrays(q.slots[:, :1], v.slots[:, :1])
        return v
    for t in (q, k, v):
        if isinstance(t, Ann) and t.dims != (nd - 1,):
            op.keep(f"{op.name}: attention heads are not pruned")
            return None
    if isinstance(q, Ann) and isinstance(k, Ann):
        op.builder.uf.union_arrays(q.slots, k.slots)
    elif isinstance(q, Ann) or isinstance(k, Ann):
        op.fix(q if isinstance(q, Ann) else k, f"{op.name}: query/key dim contracted with an untracked tensor")
    return v if isinstance(v, Ann) else None


# -- shape ops -------------------------------------------------------------------------

@rule(nn.Flatten, nn.Unflatten, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten,
      "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "squeeze_",
      "unsqueeze_", torch.ravel, "ravel")
def reshape_rule(op: ChannelOp) -> Any:
    out = reshape(op, op.x, op.in_shape, op.shape)
    _constant_target(op, out)
    return out


def _target_sizes(op: ChannelOp) -> tuple[int, list[Any]]:
    """(first output dim, the sizes written) of a view/reshape/expand/unflatten target; ``[]`` for other ops."""
    node, target = op.node, op.node.target
    if op.module is not None:
        if isinstance(op.module, nn.Unflatten):
            return op.module.dim % len(op.shape), list(op.module.unflattened_size)
        return 0, []
    if target in ("unflatten", torch.unflatten):
        sizes = op.arg(2, "sizes")
        return op.arg(1, "dim") % len(op.shape), list(sizes) if isinstance(sizes, (list, tuple)) else []
    if target not in ("view", "reshape", torch.reshape, "expand", "broadcast_to", torch.broadcast_to):
        return 0, []
    args = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size", ()))]
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    return 0, args


def baked_sizes(op: ChannelOp) -> bool:
    """The graph came from slimkit.tracing's meta step (control flow on shapes): every size is a constant there.

    Constants then stand for sizes the eager forward computes at run time, so they say nothing
    about which channel counts are fixed.
    """
    owner = op.node.graph.owning_module
    return op.builder.baked == "runtime" and owner is not None and tracing.baked_sizes(owner)


def _constant_target(op: ChannelOp, out: Any) -> None:
    """A channel dim whose size the target writes as a constant (``view(B, self.dim, -1)``) cannot shrink.

    (``-1`` is computed; sizes read at run time are followed by :mod:`.sizes`.)
    """
    if not isinstance(out, Ann) or baked_sizes(op):
        return
    start, sizes = _target_sizes(op)
    accepted = op.node.meta.get("slimkit_split", ())
    for j, size in enumerate(sizes, start):
        if isinstance(size, int) and size > 1 and j in out.dims and j not in accepted:
            op.fix(out, f"{op.name}: the size of a channel dim is a constant ({size})")
            return


@rule("permute", torch.permute)
def permute_rule(op: ChannelOp) -> Any:
    args = op.node.args[1:]
    perm = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
    if not perm:
        perm = list(op.node.kwargs.get("dims", ()))
    return permute(op.x, perm)


@rule("transpose", torch.transpose, "swapaxes", torch.swapaxes, "transpose_", "mT", torch.t, "t")
def transpose_rule(op: ChannelOp) -> Any:
    nd = len(op.shape)
    perm = list(range(nd))
    if len(op.node.args) >= 3:
        a, b = op.node.args[1] % nd, op.node.args[2] % nd
    else:
        a, b = nd - 2, nd - 1
    perm[a], perm[b] = perm[b], perm[a]
    return permute(op.x, perm)


@rule("movedim", torch.movedim, "moveaxis", torch.moveaxis)
def movedim_rule(op: ChannelOp) -> Any:
    nd = len(op.shape)
    src, dst = op.arg(1, "source"), op.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    order = [d for d in range(nd) if d not in [s % nd for s in src]]
    for s, d in sorted(zip([s % nd for s in src], [d % nd for d in dst], strict=True), key=lambda p: p[1]):
        order.insert(d, s)
    return permute(op.x, order)


@rule("expand", "expand_as", torch.broadcast_to, "broadcast_to")
def expand(op: ChannelOp) -> Any:
    x, nd_in, nd_out = op.x, len(op.in_shape), len(op.shape)
    out = Ann(tuple(d + nd_out - nd_in for d in x.dims), x.slots)
    _constant_target(op, out)
    return out


@rule("repeat", "tile", torch.tile, "flip", torch.flip, "roll", torch.roll, "repeat_interleave",
      torch.repeat_interleave)
def rearrange(op: ChannelOp) -> Any:
    """Repeats and flips: fine along other dims, channels kept when they act on a channel dim."""
    x, name = op.x, op.node.target if op.node.op == "call_method" else op.node.target.__name__
    in_shape, out_shape = op.in_shape, op.shape
    if name in ("flip", "roll"):
        dims = op.arg(1 if name == "flip" else 2, "dims")
        dims = range(len(in_shape)) if dims is None else _dims_arg(dims, len(in_shape))
        _fix_dims(op, x, dims, f"{op.name}: {name} over channels")
        return x
    offset = len(out_shape) - len(in_shape)
    if any(out_shape[d + offset] != in_shape[d] for d in x.dims):
        return op.fix(x, f"{op.name}: {name} along channels")
    return Ann(tuple(d + offset for d in x.dims), x.slots)


def _shape_query(op: ChannelOp) -> Any:
    return None


for _t in ("dim", "stride", "data_ptr", "is_contiguous", "get_device", len, torch._assert, isinstance, "__len__"):
    register_channel_rule(_t, _shape_query)


@rule("size", getattr)
def size_rule(op: ChannelOp) -> Any:
    """``x.shape``, ``x.size()``, ``x.size(d)``: the sizes of channel dims are followed (see :mod:`.sizes`)."""
    x, shape = op.x, op.in_shape
    if x is None or shape is None:
        return None
    if op.node.target is getattr:
        return run_time_shape(x, len(shape)) if op.node.args[1] == "shape" else None
    full = run_time_shape(x, len(shape))
    d = op.arg(1, "dim")
    return full if d is None else full.parts[d] if isinstance(d, int) else None


@rule("numel", "nelement", torch.numel)
def numel_rule(op: ChannelOp) -> Any:
    return None if op.x is None else SizeOf(distinct(op.x.slots), False)


@rule(torch.cat, torch.concat, torch.concatenate)
def cat(op: ChannelOp) -> Any:
    """Concatenation: along the channel dim the slots are joined (offsets); along another dim united."""
    tensors = op.arg(0, "tensors")
    dim = op.arg(1, "dim", 0) % len(op.shape)
    anns = [(t, op.value(t), op.shape_of(t)) for t in tensors]
    tracked = [a for _, a, _ in anns if isinstance(a, Ann)]
    if any(a.dims != (dim,) for a in tracked):
        if all(a.dims == tracked[0].dims and dim not in a.dims for a in tracked):
            return _cat_other(op, anns, tracked[0].dims)
        return op.unsupported(f"cat along dim {dim} of channels in dims {tracked[0].dims}")
    parts = [a.slots if isinstance(a, Ann) else op.new_fixed(meta[dim], "concatenated with an untracked tensor")
             for _, a, meta in anns]
    return Ann((dim,), np.concatenate(parts))


def _cat_other(op: ChannelOp, anns: list, dims: tuple[int, ...]) -> Any:
    """``cat`` along a non-channel dim (a class token before the patch tokens): channels united."""
    first = next(a for _, a, _ in anns if isinstance(a, Ann))
    for _node, a, meta in anns:
        if isinstance(a, Ann):
            op.builder.uf.union_arrays(first.slots, a.slots)
        elif isinstance(a, ParamRef) and len(dims) == 1 and not a.others:
            axis = _param_axis(a, meta, dims[0] - (len(op.shape) - len(meta)))
            if axis is None:
                op.fix(first, f"{op.name}: cat with parameter {a.target}")
            else:
                op.member(a.owner, f"param:{a.pname}:{axis}", first.slots)
        elif meta is not None and any(meta[d] > 1 for d in dims):
            op.fix(first, f"{op.name}: cat with an untracked tensor")
    return Ann(dims, first.slots)


@rule(torch.stack)
def stack(op: ChannelOp) -> Any:
    tensors = op.arg(0, "tensors")
    dim = op.arg(1, "dim", 0) % len(op.shape)
    anns = [op.value(t) for t in tensors]
    tracked = [a for a in anns if isinstance(a, Ann)]
    if len(tracked) != len(anns) or any(a.dims != tracked[0].dims for a in tracked):
        return op.keep(f"{op.name}: stack of differently tracked tensors")
    for a in tracked[1:]:
        op.builder.uf.union_arrays(tracked[0].slots, a.slots)
    return Ann(tuple(d + (d >= dim) for d in tracked[0].dims), tracked[0].slots)


def split(op: ChannelOp, dim: int, pieces: int, even: bool, drop_dim: bool = False) -> Any:
    """Split into ``pieces`` along ``dim``. Along channels: an even chunk loses as many per piece."""
    x = op.x
    nd = len(op.in_shape)
    dim %= nd
    if dim not in x.dims:
        if drop_dim:
            return [Ann(tuple(d - (d > dim) for d in x.dims), x.slots) for _ in range(pieces)]
        return [x for _ in range(pieces)]
    if united_along(op, x, dim) and heads.whole_heads(op, x):  # q, k, v = qkv.unbind(0), .split([d, d, dv], -1)
        if drop_dim:
            return [heads.take(op, x, dim, i) for i in range(pieces)]
        bounds = np.cumsum([0] + [s[dim] for s in op.shape])
        axis = x.dims.index(dim)
        return [Ann(x.dims, np.ascontiguousarray(np.take(x.slots, range(a, b), axis)))
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if not even or len(x.dims) != 1 or len(x.slots) % pieces:
        return op.fix(x, f"{op.name}: split of channels with fixed sizes")
    rows = x.slots.reshape(pieces, -1)
    if _spans_positions(op, x.slots) and not _balanced_rows(op, rows):
        # units already span several positions (the pairs of a channel shuffle): a per-block count
        # cannot hold, so position j of every block is one unit (each removal keeps them equal)
        op.builder.uf.union_arrays(np.broadcast_to(rows[:1], rows.shape), rows)
    else:
        op.grouped(x.slots, pieces, f"{op.name}: chunk into {pieces} equal blocks")
    return [Ann(x.dims, row) for row in rows]


def _roots(op: ChannelOp, slots: np.ndarray) -> np.ndarray:
    find = op.builder.uf.find
    return np.array([find(s) for s in slots.reshape(-1).tolist()], dtype=np.int64).reshape(slots.shape)


def _spans_positions(op: ChannelOp, slots: np.ndarray) -> bool:
    """Some unit among ``slots`` (1-D) occupies several positions."""
    roots = _roots(op, slots)
    return len(distinct(roots)) < len(roots)


def _balanced_rows(op: ChannelOp, rows: np.ndarray) -> bool:
    """Every unit has as many positions in each row (GLU's halves united channel by channel)."""
    roots = np.sort(_roots(op, rows), axis=1)
    return bool((roots == roots[0]).all())


@rule("chunk", torch.chunk)
def chunk(op: ChannelOp) -> Any:
    n = op.arg(1, "chunks")
    return split(op, op.arg(2, "dim", 0), len(op.shape), isinstance(n, int) and len(op.shape) == n)


@rule("split", torch.split, "split_with_sizes", torch.split_with_sizes, "tensor_split", torch.tensor_split,
      "hsplit", "vsplit")
def split_rule(op: ChannelOp) -> Any:
    return split(op, op.arg(2, "dim", 0), len(op.shape), False)


@rule("unbind", torch.unbind)
def unbind(op: ChannelOp) -> Any:
    return split(op, op.arg(1, "dim", 0), len(op.shape), False, drop_dim=True)


def getitem(op: ChannelOp) -> Any:
    """Indexing: slices along other dims move the annotation; a channel must be sliced whole."""
    src = op.x
    idx = op.node.args[1]
    in_shape = op.in_shape
    if src is None:  # tracked channels are the indices
        return op.keep(f"{op.name}: used as indices")
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        fill = len(in_shape) - (len(idx) - 1 - sum(i is None for i in idx))
        idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
    if sum(isinstance(i, torch.fx.Node) for i in idx) > 1 or any(isinstance(i, torch.fx.Node) for i in idx) and any(
            isinstance(i, int) or i is None for i in idx):
        return op.keep(f"{op.name}: advanced indexing with several index tensors")
    dims_out: dict[int, int] = {}
    d_in = d_out = 0
    for i in idx:
        if isinstance(i, torch.fx.Node):  # an index tensor: its dims replace the dims it indexes
            index = i.meta.get("tensor_meta")
            if index is None or not hasattr(index, "shape"):
                return op.unsupported(f"indexing with {i.name}")
            if isinstance(op.value(i), Ann):
                op.fix(op.value(i), f"{op.name}: used as indices")
            boolean = index.dtype == torch.bool
            consumed = len(index.shape) if boolean else 1
            if any(d in src.dims for d in range(d_in, d_in + consumed)):
                return op.fix(src, f"{op.name}: channels indexed by a tensor")
            d_in += consumed
            d_out += 1 if boolean else len(index.shape)
            continue
        if i is None:
            d_out += 1
            continue
        if isinstance(i, list) and all(isinstance(v, int) for v in i):  # a gather of fixed positions
            if d_in in src.dims:
                return op.fix(src, f"{op.name}: channels gathered by a constant index list")
            dims_out[d_in] = d_out
            d_in += 1
            d_out += 1
            continue
        if isinstance(i, slice):
            if d_in in src.dims and not _whole(i, in_shape[d_in]):
                return op.fix(src, f"{op.name}: slice of channels with fixed bounds")
            dims_out[d_in] = d_out
            d_in += 1
            d_out += 1
        elif isinstance(i, int):
            if d_in in src.dims:
                if len(idx) == 1 and united_along(op, src, d_in) and heads.whole_heads(op, src):  # qkv[0]
                    return heads.take(op, src, d_in, i)
                return op.fix(src, f"{op.name}: indexing one channel")
            d_in += 1
        else:
            return op.unsupported(f"indexing with {type(i).__name__}")
    for rest in range(d_in, len(in_shape)):
        dims_out[rest] = d_out + rest - d_in
    return Ann(tuple(dims_out[d] for d in src.dims), src.slots)


def _whole(s: slice, size: int) -> bool:
    """A slice that takes every position (``[:n]`` with ``n >= size`` stays whole after pruning)."""
    return (s.start in (None, 0) and s.step in (None, 1)
            and (s.stop is None or (isinstance(s.stop, int) and s.stop >= size)))


register_channel_rule(operator.getitem, getitem)


# -- element-wise binary and n-ary ops ---------------------------------------------------

def _elementwise_all(op: ChannelOp) -> Any:
    return elementwise(op, list(op.node.args) + list(op.node.kwargs.values()))


for _t in (operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.isub, operator.truediv,
           operator.itruediv, operator.floordiv, operator.pow, operator.neg, operator.pos, operator.abs, torch.add,
           torch.mul, torch.sub, torch.div, torch.multiply, torch.true_divide, torch.maximum, torch.minimum,
           torch.pow, torch.where, torch.addcmul, torch.addcdiv, torch.lerp, torch.fmax, torch.fmin,
           torch.masked_fill, torch.clamp, torch.clip, torch.rsub,
           "add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "pow", "pow_", "maximum", "minimum", "addcmul",
           "addcmul_", "addcdiv", "addcdiv_", "where", "masked_fill", "masked_fill_", "lerp", "lerp_", "rsub",
           "__radd__", "__rmul__", "__rsub__", "__rtruediv__", "true_divide", "multiply", "fmax", "fmin"):
    register_channel_rule(_t, _elementwise_all)


@rule(torch.max, torch.min, "max", "min")
def max_min(op: ChannelOp) -> Any:
    """``max(a, b)`` element-wise, or ``max(x, dim)`` a reduction returning (values, indices)."""
    other = op.arg(1, "other")
    if isinstance(other, torch.fx.Node) and op.shape_of(other) is not None:
        return elementwise(op, [op.arg(0), other])
    dim = op.arg(1, "dim")
    if dim is None:
        return reduce(op, None, False, "max")
    out = reduce(op, dim, op.arg(2, "keepdim", False), "max")
    return [out, out]


def _reduction(name: str, dim_at: int = 1, keep_at: int = 2):
    def rule_fn(op: ChannelOp) -> Any:
        return reduce(op, op.arg(dim_at, "dim"), op.arg(keep_at, "keepdim", False), name)

    return rule_fn


for _n in ("mean", "sum", "amax", "amin", "prod", "logsumexp", "nansum", "nanmean", "any", "all", "count_nonzero",
           "median", "nanmedian"):
    register_channel_rule(_n, _reduction(_n))
    if hasattr(torch, _n):
        register_channel_rule(getattr(torch, _n), _reduction(_n))
for _n in ("std", "var"):
    register_channel_rule(_n, _reduction(_n))
    register_channel_rule(getattr(torch, _n), _reduction(_n))
    register_channel_rule(f"{_n}_mean", _reduction(_n))
register_channel_rule("norm", _reduction("norm", 2, 3))
register_channel_rule(torch.norm, _reduction("norm", 2, 3))
register_channel_rule(torch.linalg.vector_norm, _reduction("norm", 2, 3))


@rule(F.normalize)
def normalize(op: ChannelOp) -> Any:
    reduce(op, op.arg(2, "dim", 1), True, "normalize")
    return op.x


@rule(F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, "softmax", "log_softmax", nn.Softmax,
      nn.LogSoftmax, nn.Softmin, nn.Softmax2d)
def softmax(op: ChannelOp) -> Any:
    x, nd = op.x, len(op.shape)
    if op.module is not None:
        dim = -3 if isinstance(op.module, nn.Softmax2d) else op.module.dim
    else:
        dim = op.arg(1, "dim")
    dims = range(nd) if dim is None else [dim % nd]
    if not (dim is not None and united_along(op, x, dim % nd)):  # over a dim each unit spans whole: exact
        _fix_dims(op, x, dims, f"{op.name}: softmax over channels")
    return x


# -- matrix products ---------------------------------------------------------------------

def einsum_core(op: ChannelOp, inputs: list[tuple[Any, str]], output: str) -> Any:
    """Channels through a product given as einsum letters: carried where a letter survives, united where
    a letter is contracted between tracked operands; fixed where an untracked operand shares them."""
    if any(isinstance(op.value(arg), Ann) and len(op.value(arg).dims) > 1 for arg, _ in inputs):
        if all(heads.whole_heads(op, op.value(arg)) for arg, _ in inputs if isinstance(op.value(arg), Ann)):
            return _einsum_heads(op, inputs, output)
    by_letter: dict[str, list[np.ndarray]] = {}
    untracked: dict[str, bool] = {}
    for arg, letters in inputs:
        value, meta = op.value(arg), op.shape_of(arg)
        if isinstance(value, Ann):
            if len(value.dims) != 1:
                return op.keep(f"{op.name}: product of channels in several dims")
            by_letter.setdefault(letters[value.dims[0]], []).append(value.slots)
        if meta is not None:
            for i, letter in enumerate(letters):
                if meta[i] > 1 and not (isinstance(value, Ann) and value.dims == (i,)):
                    untracked[letter] = True
    for letter, arrays in by_letter.items():
        for other in arrays[1:]:
            op.builder.uf.union_arrays(arrays[0], other)
        if untracked.get(letter):
            op.fix(Ann((0,), arrays[0]), f"{op.name}: channels multiplied with an untracked tensor")
    carried = [(output.index(letter), arrays[0]) for letter, arrays in by_letter.items() if letter in output]
    if len(carried) > 1:
        for _, arr in carried:
            op.fix(Ann((0,), arr), f"{op.name}: product with channels in two output dims")
        return None
    return Ann((carried[0][0],), carried[0][1]) if carried else None


def _einsum_heads(op: ChannelOp, inputs: list[tuple[Any, str]], output: str) -> Any:
    """:func:`einsum_core` where an operand's channels lie in several dims (whole attention heads, see .heads).

    A contracted channel letter must be spanned whole by every unit (``q @ k^T`` over a head's
    features); the remaining channel letters are carried, the operands' slots united where they
    share them (broadcast along the letters one lacks: the attention map's heads with v's).
    """
    kept: list[tuple[list[str], np.ndarray]] = []
    untracked: set[str] = set()
    values = []
    for arg, letters in inputs:
        value, meta = op.value(arg), op.shape_of(arg)
        if isinstance(value, Ann):
            values.append((value, letters))
            if any(letters[d] not in output and not united_along(op, value, d) for d in value.dims):
                return op.keep(f"{op.name}: product over part of a unit's channels")
            axes = [i for i, d in enumerate(value.dims) if letters[d] in output]
            index = tuple(slice(None) if i in axes else 0 for i in range(value.slots.ndim))
            kept.append(([letters[value.dims[i]] for i in axes], value.slots[index]))
        if meta is not None:
            for i, letter in enumerate(letters):
                if meta[i] > 1 and not (isinstance(value, Ann) and i in value.dims):
                    untracked.add(letter)
    if any(letters[d] in untracked for value, letters in values for d in value.dims):
        return op.keep(f"{op.name}: channels multiplied with an untracked tensor")
    sizes: dict[str, int] = {}
    for letters, arr in kept:
        sizes.update(zip(letters, arr.shape, strict=True))
    out_letters = sorted(sizes, key=output.index)
    full = None
    for letters, arr in kept:
        order = sorted(range(len(letters)), key=lambda i: out_letters.index(letters[i]))
        arr = np.transpose(arr, order).reshape([sizes[t] if t in letters else 1 for t in out_letters])
        arr = np.broadcast_to(arr, [sizes[t] for t in out_letters])
        if full is None:
            full = arr
        else:
            op.builder.uf.union_arrays(full, arr)
    if full is None or not out_letters:
        return None
    return Ann(tuple(output.index(t) for t in out_letters), np.ascontiguousarray(full))


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@rule(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__", torch.mm, "mm")
def matmul(op: ChannelOp) -> Any:
    a, b = op.arg(0), op.arg(1, "mat2", op.arg(1, "other"))
    sa, sb = op.shape_of(a), op.shape_of(b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return op.keep(f"{op.name}: matrix-vector product")
    batch = max(len(sa), len(sb)) - 2
    letters = _LETTERS[:batch]
    la = letters[batch - (len(sa) - 2):] + "yz"
    lb = letters[batch - (len(sb) - 2):] + "zw"
    return einsum_core(op, [(a, la), (b, lb)], letters + "yw")


@rule(torch.einsum)
def einsum(op: ChannelOp) -> Any:
    spec = op.node.args[0]
    operands = op.node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    spec = spec.replace(" ", "")
    if "..." in spec or "->" not in spec:
        return op.keep(f"{op.name}: einsum {spec!r} without explicit output letters")
    lhs, out = spec.split("->")
    return einsum_core(op, list(zip(operands, lhs.split(","), strict=True)), out)


def mixed_conv(op: ChannelOp) -> Any:
    """timm's ``MixedConv2d`` (MixNet): the input is split by ``splits`` among convs of several kernel sizes
    and their outputs concatenated; each piece follows its conv, the ``split`` axis updates ``splits``.
    Even splits lose as many channels each (no kernel size is emptied); uneven ones are kept."""
    x, m = op.x, op.module
    if x is not None and x.dims != (1,):
        return op.unsupported(f"{op.what} on channels outside dim 1")
    in_slots = x.slots if x is not None else op.new_fixed(m.in_channels, "model input")
    if len(set(m.splits)) == 1:  # every kernel size keeps as many inputs (none is emptied)
        op.grouped(in_slots, len(m.splits), f"input of {op.name} split among {len(m.splits)} kernel sizes")
    elif len(m.splits) > 1:
        op.fix(Ann((1,), in_slots), f"input of {op.name} split unevenly among kernel sizes")
    outs, start = [], 0
    for i, (conv, n) in enumerate(zip(m.values(), m.splits, strict=True)):
        piece, start, child = in_slots[start:start + n], start + n, f"{op.name}.{i}"
        if conv.groups == 1:
            op.member(child, "in", piece)
            outs.append(op.produce(child, 1, "out", size=conv.out_channels).slots)
        elif conv.groups == conv.in_channels:
            outs.append(np.repeat(piece, conv.out_channels // conv.in_channels))
            op.member(child, "out", outs[-1])
        else:
            op.fix(Ann((1,), piece), f"grouped conv {child} inside {op.name}")
            outs.append(op.new_fixed(conv.out_channels, f"grouped conv {child} inside {op.name}"))
    op.member(op.name, "split", in_slots)
    return Ann((1,), np.concatenate(outs))


register_channel_rule("module:timm.layers.mixed_conv2d.MixedConv2d", mixed_conv)


@rule(F.embedding, nn.Embedding)
def embedding(op: ChannelOp) -> Any:
    return op.keep(f"{op.what}: indices")

