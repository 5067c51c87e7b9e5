"""Attention heads as whole prunable units, where the head count is visible (a module's ``num_heads``).

A multi-head attention block splits a projection's output channels into heads,
``qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)``, and merges the heads back before
the output projection, ``(attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim)``. A channel
of one head cannot be removed alone (``head_dim`` is written in the forward and the scale
depends on it), but a whole head can: it removes its ``head_dim`` rows from each of q, k and v,
its ``head_dim`` input columns of the output projection, and one from ``num_heads`` (Michel,
Levy and Neubig, 2019, "Are Sixteen Heads Really Better than One?"; Voita et al., 2019,
"Analyzing Multi-Head Self-Attention").

The reshape rule (:func:`slimkit.prune.graph.oprules.reshape`) asks :func:`split` whether a split
of one channel dim into several is a head split: the innermost module around the op has an int
``num_heads`` equal to one of the new dims (the one before the last, ``(3, H, D)`` / ``(H, D)``,
else the first, ``(H, 3 * D)``), and every new dim is written as a constant or ``-1`` (a size
read at run time is left to :mod:`.sizes`). Its slots are then united along every new dim but
the heads dim (each head is one unit), and the module gets a ``heads`` axis (one position per
head: several head splits in one module, separate q/k/v projections, unite head ``h`` of
each). Products, softmax, ``unbind`` and LayerNorm over a dim each unit spans whole carry the
heads on; :func:`merge` accepts the merge back into one channel dim. Surgery cuts the
projections as linears and the module's ``heads`` axis with :func:`cut_heads` (``num_heads``
and the attention width attributes, :data:`WIDTH_ATTRS`), registered for the module's class
through :func:`slimkit.prune.surgery.register_surgery_handler` when a head split is found.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from slimkit.prune.graph.core import Ann

if TYPE_CHECKING:
    from slimkit.prune.graph.rules import ChannelOp

#: the attribute that holds a module's head count
HEADS_ATTR = "num_heads"
#: attributes holding ``num_heads * head_dim`` (the width of the merged heads), rescaled with the heads
WIDTH_ATTRS = ("attn_dim", "dim_attn", "key_attn_dim", "val_attn_dim")


def head_module(op: ChannelOp) -> tuple[str, nn.Module, int] | None:
    """``(name, module, heads)`` of the innermost module around ``op`` with an int ``num_heads > 1``."""
    stack = op.node.meta.get("nn_module_stack") or {}
    for key, value in reversed(list(stack.items())):
        path = value[0] if isinstance(value, tuple) else key
        module = op.builder.modules.get(path)
        heads = getattr(module, HEADS_ATTR, None)
        if isinstance(heads, int) and not isinstance(heads, bool) and heads > 1:
            return path, module, heads
    return None


def _cuttable(module: nn.Module) -> bool:
    """Whether surgery can cut ``module``'s heads: :func:`cut_heads` is (or becomes) its class's handler."""
    from slimkit.prune.surgery import handler_for, register_surgery_handler

    found = handler_for(module)
    if found is None:
        register_surgery_handler(type(module), cut_heads)
        return True
    return found is cut_heads


def _written(sizes: list[Any], start: int, j: int) -> Any:
    return sizes[j - start] if 0 <= j - start < len(sizes) else None


def split(op: ChannelOp, x: Ann, annotated: list[int], big: list[int], out_shape: tuple[int, ...],
          sizes: tuple[int, list[Any]], baked: bool) -> tuple[list[int], int] | None:
    """A head split of one channel dim: ``(output dims to unite along, the heads dim)``, or None.

    ``annotated``: the input's channel dims in this reshape block (one); ``big``: the block's
    output dims of size > 1; ``sizes``: ``(first dim, sizes written)`` of the target; ``baked``:
    the graph's sizes are constants (then the head dim must be ``-1`` or the module's
    ``head_dim``: a ``C // heads`` read from the input would not follow the pruned heads).
    """
    if len(x.dims) != 1 or len(annotated) != 1 or len(big) < 2:
        return None
    found = head_module(op)
    if found is None:
        return None
    name, module, heads = found
    at = big[-2] if out_shape[big[-2]] == heads else big[0] if out_shape[big[0]] == heads else None
    if at is None:
        return None
    start, written = sizes
    for j in big:
        w = _written(written, start, j)
        if not (isinstance(w, int) and (w == out_shape[j] or w == -1)):
            return None
    if baked:
        last = _written(written, start, big[-1])
        if last != -1 and getattr(module, "head_dim", None) != out_shape[big[-1]]:
            return None
    if not _cuttable(module):
        return None
    op.node.meta["slimkit_split"] = set(big)  # the sizes and constant-target checks accept these dims
    op.node.meta["slimkit_heads"] = name
    return [j for j in big if j != at], at


def record(op: ChannelOp, arr: np.ndarray, axis: int) -> None:
    """The module's ``heads`` axis follows the heads dim ``axis`` of ``arr`` (the split's united slots)."""
    name = op.node.meta["slimkit_heads"]
    index = tuple(slice(None) if a == axis else 0 for a in range(arr.ndim))
    op.member(name, "heads", np.ascontiguousarray(arr[index]))


def united_along(op: ChannelOp, x: Ann, dim: int) -> bool:
    """Whether the slots of ``x`` are one unit along channel dim ``dim`` (for every other position)."""
    if len(x.dims) < 2 or dim not in x.dims:
        return False
    find = op.builder.uf.find
    roots = np.array([find(s) for s in x.slots.reshape(-1).tolist()]).reshape(x.slots.shape)
    axis = x.dims.index(dim)
    return bool((roots == roots.take([0], axis)).all())


def merge(op: ChannelOp, x: Ann, annotated: list[int], big: list[int], in_shape: tuple[int, ...],
          sizes: tuple[int, list[Any]], baked: bool) -> bool:
    """Whether a reshape merging ``annotated`` dims (heads first, each unit spanning the others) is a head merge.

    The merged size must be written as ``-1``, read at run time (:mod:`.sizes` decides), or, as a
    constant, be an attention width attribute of the head module (:data:`WIDTH_ATTRS`) that
    :func:`cut_heads` rescales.
    """
    if len(big) != 1 or len(annotated) < 2 or tuple(sorted(x.dims)) != tuple(annotated):
        return False
    found = head_module(op)
    if found is None:
        return False
    name, module, heads = found
    if in_shape[annotated[0]] != heads or not all(united_along(op, x, d) for d in annotated[1:]):
        return False
    if (name, "heads") not in op.builder.axes:  # no head split seen in this module
        return False
    start, written = sizes
    w = _written(written, start, big[0])
    if isinstance(w, int) and w != -1:
        if baked or not any(getattr(module, a, None) == w for a in WIDTH_ATTRS):
            return False
        op.node.meta["slimkit_split"] = {big[0]}
    return True


def _head_roots(op: ChannelOp) -> set[int]:
    find = op.builder.uf.find
    return {find(s) for (_, role), slots in op.builder.axes.items() if role == "heads" for s in slots.tolist()}


def whole_heads(op: ChannelOp, x: Ann) -> bool:
    """Whether every unit of ``x`` is a head of a split found so far (the rules that carry heads act only then:
    elsewhere, a model without heads keeps the result it had before heads were units)."""
    heads = _head_roots(op)
    find = op.builder.uf.find
    return bool(heads) and all(find(s) in heads for s in x.slots.reshape(-1).tolist())


def keep_heads(op: ChannelOp, what: str) -> bool:
    """Keep whole heads reaching an op without a rule for them (RoPE's ``cat`` of halves, a transposed conv
    after the merged heads); True when done.

    Only where every annotation reaching the op is head-shaped (several channel dims, one unit
    along the last) or holds head units only: before heads were units, these channels were kept
    at the split and never reached the op.
    """
    anns = op.anns
    if not anns:
        return False
    if not all(len(a.dims) > 1 and united_along(op, a, a.dims[-1]) for a in anns):
        if not all(whole_heads(op, a) for a in anns):
            return False
    for a in anns:
        op.builder.uf.fix(a.slots, f"attention heads reach {what}")
    return True


def take(op: ChannelOp, x: Ann, dim: int, index: int) -> Ann | None:
    """Position ``index`` of channel dim ``dim`` that every unit spans whole (q of a fused qkv), the dim dropped."""
    if not united_along(op, x, dim):
        return None
    axis = x.dims.index(dim)
    return Ann(tuple(d - (d > dim) for d in x.dims if d != dim), np.ascontiguousarray(x.slots.take(index, axis)))


def cut_heads(module: nn.Module, role: str, keep: torch.Tensor) -> None:
    """Surgery of a module's ``heads`` axis: ``num_heads`` and the width attributes follow the heads kept.

    (Its projections are cut as the linears/convs they are.)
    """
    from slimkit.exceptions import UnsupportedModelError

    if role != "heads":
        raise UnsupportedModelError(f"only its attention heads can be cut here, not its {role!r} axis")
    before = getattr(module, HEADS_ATTR)
    for attr in WIDTH_ATTRS:
        width = getattr(module, attr, None)
        if isinstance(width, int) and not isinstance(width, bool) and width % before == 0:
            setattr(module, attr, width // before * len(keep))
    setattr(module, HEADS_ATTR, len(keep))
    if isinstance(getattr(module, "attention_bias_cache", None), dict):
        module.attention_bias_cache = {}  # per-head biases gathered from the parameter before the cut


__all__ = ["HEADS_ATTR", "WIDTH_ATTRS", "cut_heads", "head_module", "keep_heads", "merge", "record", "split", "take",
           "united_along"]
