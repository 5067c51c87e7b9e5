"""Batch-norm folding: merge an eval-mode BatchNorm into the convolution that feeds it.

``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` is a convolution with weights
``w * gamma / sqrt(var + eps)`` (per output channel) and bias
``(b - mean) * gamma / sqrt(var + eps) + beta`` (Jacob et al. 2018, section 3.2). Folding
happens before quantizing so the integer model has no BN left; the folded model equals the
original in eval mode (to float rounding).

Pairs are found on the traced graph (:func:`slimkit.tracing.trace_model`, the tracing
helper every graph path uses) when the model traces, otherwise (and inside a submodule the
trace had to keep whole) by adjacency inside ``nn.Sequential`` containers; a conv is folded
only when the BN is its sole consumer.

>>> import torch
>>> from torch import nn
>>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
>>> m[1].running_mean.fill_(0.3); m[1].running_var.fill_(2.0)  # doctest: +ELLIPSIS
tensor(...
>>> x = torch.randn(2, 3, 8, 8)
>>> before = m(x)
>>> fold_bn_(m)
['0']
>>> torch.allclose(before, m(x), atol=1e-5), type(m[1]).__name__
(True, 'Identity')
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.selection import replace_module
from slimkit.tracing import trace_model

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _pairs_graph(model: nn.Module, graph: torch.fx.Graph) -> list[tuple[str, str]]:
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BNS):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), _CONVS)
            and len(src.users) == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module, prefix: str = "") -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules(prefix=prefix):
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if isinstance(a, _CONVS) and isinstance(b, _BNS):
                head = f"{name}." if name else ""
                pairs.append((head + a_name, head + b_name))
    return pairs


def conv_bn_pairs(model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs where the BN directly and solely consumes the conv.

    Found on the graph of :func:`slimkit.tracing.trace_model` (``example_inputs``, a Tensor or
    a tuple of Tensors, lets it resolve shape-dependent control flow); inside a submodule kept
    whole by the trace, and in a model that does not trace at all, by adjacency inside
    ``nn.Sequential`` containers.
    """
    traced = trace_model(model, example_inputs)
    if traced.graph_module is None:
        pairs = _pairs_sequential(model)
    else:
        pairs = _pairs_graph(model, traced.graph_module.graph)
        for name in traced.opaque:
            pairs += _pairs_sequential(model.get_submodule(name), prefix=name)
    modules = dict(model.named_modules())
    usage: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        usage[id(module)] = usage.get(id(module), 0) + 1
    return [(c, b) for c, b in pairs if usage[id(modules[c])] == 1 and usage[id(modules[b])] == 1]


@torch.no_grad()
def fold_into(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Rewrite ``conv``'s weight and bias so that ``conv`` alone computes ``bn(conv(x))`` (eval)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv.weight.mul_(factor.reshape(shape))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.clone())
    else:
        conv.bias.copy_(new_bias)


def fold_bn_(model: nn.Module, example_inputs: Any = None) -> list[str]:
    """Fold every BN that directly follows a conv into it, in place; BNs become Identity.

    Returns the names of the folded convolutions. Uses the BN's running statistics, so the
    result equals the original in eval mode only. ``example_inputs``: see :func:`conv_bn_pairs`.
    """
    folded = []
    for conv_name, bn_name in conv_bn_pairs(model, example_inputs):
        bn = model.get_submodule(bn_name)
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        fold_into(model.get_submodule(conv_name), bn)
        replace_module(model, bn_name, nn.Identity())
        folded.append(conv_name)
    return folded
