"""Multiply-accumulates (MACs) of one forward pass, counted by forward hooks, per layer.

What is counted (the convention of torchvision's ``_ops`` figures, fvcore and ptflops):

- ``Conv1d/2d/3d`` (grouped and depthwise included): ``output elements * in_channels/groups *
  kernel volume``; ``ConvTranspose*``: ``input elements * out_channels/groups * kernel volume``;
- ``Linear``: ``output elements * in_features``; ``Bilinear``: ``output elements * in1 * in2``;
- bias additions, BatchNorm, activations, pooling, element-wise additions (residuals),
  softmax and every other layer count **0** — they are memory-bound and small next to the
  convolutions, and excluding them is what makes the figures comparable with published ones;
- functional matrix products outside modules (``torch.matmul`` in attention,
  ``nn.MultiheadAttention``'s fused projections) are **not counted**: out of scope for CNNs.

The count is for the whole batch of ``example_inputs`` (pass a batch of 1 for the usual
per-image figure) and for dense arithmetic: zeros in masked weights are still multiplied.
Modules of other classes can declare their cost with :func:`register_mac_rule`; a module
with a rule is measured as one unit (its children are not hooked separately). Only modules
that are *called* count: a wrapper that uses a child's weight functionally
(``F.conv2d(x, self.conv.weight)``) needs a rule of its own, or it counts 0.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
>>> count_macs(model, torch.zeros(1, 3, 4, 4))  # 8*4*4 * 3*3*3 + 10*128
4736
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimkit.measure.inputs import as_args, eval_mode, run_forward
from slimkit.measure.size import count_params

#: rule(module, inputs, output) -> MACs of one call.
MacRule = Callable[[nn.Module, tuple[Any, ...], Any], int]

#: class -> rule; looked up along the module's MRO, so subclasses (masked convs) inherit it.
MAC_RULES: dict[type[nn.Module], MacRule] = {}


def register_mac_rule(cls: type[nn.Module], rule: MacRule) -> None:
    """Declare the MACs of one call of a module class: ``rule(module, inputs, output) -> int``.

    Use it for a layer type of your own (a binary conv, a packed sparse linear) whose
    cost is not the dense conv/linear formula, or which computes through children that
    should not be counted separately.
    """
    MAC_RULES[cls] = rule


def conv_macs(m: nn.Module, inputs: tuple[Any, ...], out: Any) -> int:
    """The MAC rule of a convolution (any class with ``in_channels``, ``groups``, ``kernel_size``)."""
    return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def conv_transpose_macs(m: nn.Module, inputs: tuple[Any, ...], out: Any) -> int:
    """The MAC rule of a transposed convolution: input elements * out_channels/groups * kernel volume."""
    return inputs[0].numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)


def linear_macs(m: nn.Module, inputs: tuple[Any, ...], out: Any) -> int:
    """The MAC rule of a linear layer (any class with ``in_features``): output elements * in_features."""
    return out.numel() * m.in_features


def bilinear_macs(m: nn.Module, inputs: tuple[Any, ...], out: Any) -> int:
    """The MAC rule of ``nn.Bilinear``: output elements * in1_features * in2_features."""
    return out.numel() * m.in1_features * m.in2_features


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_mac_rule(_cls, conv_macs)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_mac_rule(_cls, conv_transpose_macs)
register_mac_rule(nn.Linear, linear_macs)
register_mac_rule(nn.Bilinear, bilinear_macs)


def rule_for(module: nn.Module) -> MacRule | None:
    """The MAC rule of ``module``'s class or of its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in MAC_RULES:
            return MAC_RULES[cls]
    return None


@dataclass(frozen=True)
class LayerProfile:
    """One measured layer: qualified name, class name, output shape of its first call, params, MACs, MAC share.

    ``share`` is this layer's fraction of the model's MACs, in [0, 1]. A layer called
    several times (a shared ReLU) sums the MACs of all its calls.
    """

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    params: int
    macs: int
    share: float


def mac_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules counted as one unit each: leaf modules and modules with a MAC rule (not descending
    into those), by qualified name (the root's class name when it is one itself), in ``named_modules`` order."""
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = list(module.named_children())
        if rule_for(module) is not None or not children:
            found.append((prefix or type(module).__name__, module))  # the root itself may be one layer
            return
        for name, child in children:
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


def _first_shape(output: Any) -> tuple[int, ...] | None:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return tuple(output[0].shape)
    return None


def layer_profiles(model: nn.Module, example_inputs: Any, *, meta: bool = False) -> tuple[LayerProfile, ...]:
    """Per-layer params and MACs of one forward of ``example_inputs``, in call order.

    Runs the model once in eval mode under ``torch.no_grad`` (so BatchNorm statistics are
    not touched) and restores every module's mode afterwards. Hooks are removed even
    when the forward fails. Layers that never ran are left out. ``meta``: run on meta
    tensors (the inputs' shapes, the parameters swapped for meta tensors of theirs, see
    :func:`slimkit.tracing.on_meta`): the same counts from shapes alone, no arithmetic; for
    models whose forward does not read tensor values.
    Raises ConfigError when ``example_inputs`` do not fit the model.
    """
    args = as_args(example_inputs)
    if meta:
        from slimkit.tracing import on_meta

        with on_meta(model):
            return layer_profiles(model, tuple(t.to("meta") for t in args))
    units = mac_units(model)
    calls: dict[str, dict[str, Any]] = {}  # name -> {"module", "macs", "shape"}, insertion = call order
    handles = []

    def make_hook(name: str, module: nn.Module) -> Callable[..., None]:
        rule = rule_for(module)

        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            entry = calls.setdefault(name, {"module": mod, "macs": 0, "shape": _first_shape(output)})
            if rule is not None:
                entry["macs"] += int(rule(mod, inputs, output))

        return hook

    try:
        for name, module in units:
            handles.append(module.register_forward_hook(make_hook(name, module)))
        with eval_mode(model), torch.no_grad():
            run_forward(model, args)
    finally:
        for handle in handles:
            handle.remove()

    total = sum(entry["macs"] for entry in calls.values())
    return tuple(
        LayerProfile(
            name=name,
            type=type(entry["module"]).__name__,
            output_shape=entry["shape"],
            params=count_params(entry["module"]),
            macs=entry["macs"],
            share=entry["macs"] / total if total else 0.0,
        )
        for name, entry in calls.items()
    )


class ShapeOnly(tuple):
    """A tensor's shape standing in for the tensor in a MAC rule (rules read ``numel()`` and ``shape``)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self)

    def numel(self) -> int:
        return math.prod(self)


def _conv_out(m: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    dims = len(m.kernel_size)
    if len(shape) != dims + 2 or shape[1] != m.in_channels:
        return None
    if m.padding == "same":
        return (shape[0], m.out_channels, *shape[2:])
    padding = (0,) * dims if m.padding == "valid" else m.padding
    spatial = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                    for n, p, d, k, s in zip(shape[2:], padding, m.dilation, m.kernel_size, m.stride, strict=True))
    return (shape[0], m.out_channels, *spatial) if all(n > 0 for n in spatial) else None


def _linear_out(m: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    return (*shape[:-1], m.out_features) if shape and shape[-1] == m.in_features else None


#: exact classes whose output shape follows from their attributes and the input's shape alone:
#: ``SHAPE_RULES[type(m)](m, in_shape) -> out_shape``, or None where the input does not fit (then run it)
SHAPE_RULES = {**{cls: _conv_out for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}, nn.Linear: _linear_out}


def count_macs_by_shape(model: nn.Module, in_shape: tuple[int, ...]) -> int:
    """:func:`count_macs` of one input of shape ``in_shape`` (batch axis included), from shapes alone.

    For a Conv1d/2d/3d or Linear layer, or an ``nn.Sequential`` chain of them (a low-rank
    decomposition's skeleton, on any device, the meta device included): each layer's output
    shape follows from conv arithmetic and its MACs from its registered rule, the rule
    :func:`count_macs` applies in its forward hooks, without running anything (a forward on
    meta tensors costs ~100x more). Any other module is counted by :func:`count_macs` on
    meta tensors.
    """
    layers = list(model) if type(model) is nn.Sequential else [model]
    shape = ShapeOnly(in_shape)
    total = 0
    for layer in layers:
        out_shape = SHAPE_RULES[type(layer)](layer, shape) if type(layer) in SHAPE_RULES else None
        if out_shape is None:
            return count_macs(model, torch.empty(in_shape, device="meta"), meta=True)
        out = ShapeOnly(out_shape)
        total += int(rule_for(layer)(layer, (shape,), out))
        shape = out
    return total


def count_macs(model: nn.Module, example_inputs: Any, *, meta: bool = False) -> int:
    """Total MACs of one forward of ``example_inputs`` (whole batch); see the module docstring for what counts.

    ``meta``: counted from shapes alone on meta tensors (see :func:`layer_profiles`).
    """
    return sum(layer.macs for layer in layer_profiles(model, example_inputs, meta=meta))
