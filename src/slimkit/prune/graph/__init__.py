"""Channel dependency graph: which output channels of which layers must be removed together.

The map (one job per module):

- :mod:`~slimkit.prune.graph.trace`: torch.fx trace of the model (modules with a rule of
  their own class are leaves; a subclass that calls ``F.batch_norm`` is traced through) and
  the shape of every node on the example inputs;
- :mod:`~slimkit.prune.graph.rules`: the op-rule table, keyed by module class, function and
  tensor-method name, and :func:`register_channel_rule`, the extension point;
- :mod:`~slimkit.prune.graph.oprules`: the built-in rules (conv, linear and norms as modules
  and as functional calls on ``get_attr`` parameters, activations, pooling, padding, shape
  ops, ``cat``/``split``/``chunk``, reductions, element-wise ops, matrix products);
- :mod:`~slimkit.prune.graph.heads`: attention heads as whole units (a split into
  ``num_heads`` heads, their merge back, the ``heads`` axis surgery cuts);
- :mod:`~slimkit.prune.graph.builder`: the walk over the graph that applies the rules;
- :mod:`~slimkit.prune.graph.assembly`: units and groups from the classes of slots;
- :mod:`~slimkit.prune.graph.cache`: the last graphs built, keyed by the model's structure;
- :mod:`~slimkit.prune.graph.core`: the data (units, groups, the union-find).

Every tensor carries an *annotation*: the tensor dims that hold channels (``dims``) and,
for every position along them, the id of a *slot* (an integer array of shape ``[size of
those dims]``). A conv or linear layer creates fresh slots for its output channels;
per-channel layers (BatchNorm, depthwise conv, PReLU, a ``(C,1,1)`` parameter) pass them
through and become members; element-wise ops between two annotated tensors (residual
additions, the SE multiply) *unite* the slots they pair; ``cat`` concatenates the arrays
(index offsets); reshapes, permutes and flatten move them (flatten -> linear maps one
channel onto ``H*W`` input features). Slots reaching something whose meaning would change
when a channel disappears (the model output, split/slices with fixed sizes, a view that
splits a channel dim into sizes that do not follow it, and, under
``norm_channels='keep'``, LayerNorm/GroupNorm statistics and reductions over channels) are
*fixed*. A grouped convolution (``1 < groups < in_channels``), a GroupNorm with groups < C
and an even ``chunk`` record their slots split into equal blocks: a group whose units are
exactly those slots gets ``partitions`` (every block must lose as many units); where that
fails the slots are fixed. A view into ``(K, C // K)`` unites along ``K`` (a channel
shuffle: the merge back interleaves whole units), one into heads of a module's ``num_heads``
unites along all but the heads dim (:mod:`.heads`). An op without a rule that tracked channels reach raises
UnsupportedModelError naming it and pointing at :func:`register_channel_rule`.

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

import warnings

import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.prune.graph import rules
from slimkit.prune.graph.assembly import assemble
from slimkit.prune.graph.builder import Builder
from slimkit.prune.graph.cache import _CACHE, clear_graph_cache, structure_key
from slimkit.prune.graph.core import Ann, Axis, ChannelGraph, Group, ParamRef, Unit, evaluating, gc_paused
from slimkit.prune.graph.rules import ChannelOp, register_channel_rule
from slimkit.prune.graph.trace import trace

NORM_CHANNELS = ("keep", "prune")


def build_graph(model: nn.Module, example_inputs: torch.Tensor, on_unsupported: str = "error",
                cache: bool = True, norm_channels: str = "keep", baked: str = "runtime") -> ChannelGraph:
    """Trace ``model`` on ``example_inputs`` and return its coupled channel units and groups.

    ``on_unsupported``: ``error`` raises UnsupportedModelError naming an op the graph does
    not understand when pruned channels reach it; ``skip`` keeps those channels (a warning
    is recorded in ``graph.warnings`` and emitted). ``norm_channels``: ``keep`` fixes the
    channels whose removal changes a normalization's statistics (LayerNorm over channels,
    GroupNorm with groups < C, reductions over channels: zero channels removed leave the
    outputs exactly equal); ``prune`` lets them be removed (ConvNeXt's residual stream).
    The model is not modified. ``cache``: reuse the graph of an earlier call whose
    :func:`structure_key` is equal (the same model again, or a deep copy of it, as in a
    ratio search); the last 4 are kept. The index arrays of the graph are read-only
    (graphs from the cache share them). ``baked``: how to read the constant sizes of a graph
    traced on meta tensors (:func:`slimkit.tracing.baked_sizes`, a forward with control flow on
    shapes): ``runtime`` takes them for sizes the forward reads from the tensor they shape (so
    they do not fix a channel count), ``fixed`` as fixed sizes, like a symbolic graph's
    constants (safe when a size is read from another tensor: ``C // heads`` of the input used
    on a projection's output).
    """
    if on_unsupported not in ("error", "skip"):
        raise ConfigError(f"on_unsupported must be 'error' or 'skip', got {on_unsupported!r}")
    if norm_channels not in NORM_CHANNELS:
        raise ConfigError(f"norm_channels must be 'keep' or 'prune', got {norm_channels!r}")
    if baked not in ("runtime", "fixed"):
        raise ConfigError(f"baked must be 'runtime' or 'fixed', got {baked!r}")
    if not isinstance(example_inputs, torch.Tensor):
        raise ConfigError(f"example_inputs must be one tensor batch, got {type(example_inputs).__name__}")
    with gc_paused():
        modules = dict(model.named_modules())
        key = (structure_key(model, example_inputs, on_unsupported, norm_channels, baked, rules.VERSION[0],
                             modules=modules) if cache else None)
        graph = _CACHE.get(key) if cache else None
        if graph is None:
            graph = _build(model, example_inputs, on_unsupported, norm_channels, baked, modules)
            if cache:
                _CACHE.put(key, graph)
        graph.modules = modules
    for w in graph.warnings:
        warnings.warn(w, stacklevel=2)
    return graph


def _build(model: nn.Module, example_inputs: torch.Tensor, on_unsupported: str, norm_channels: str,
           baked: str = "runtime", modules: dict[str, nn.Module] | None = None) -> ChannelGraph:
    with evaluating(model, modules), gc_paused():
        gm = trace(model, example_inputs, modules)
        builder = Builder(model, on_unsupported, norm_channels, baked, modules)
        builder.run(gm)
        graph = assemble(builder)
        graph.traced = gm
        return graph


__all__ = ["Ann", "Axis", "ChannelGraph", "ChannelOp", "Group", "ParamRef", "Unit", "build_graph",
           "clear_graph_cache", "gc_paused", "register_channel_rule", "structure_key", "trace"]
