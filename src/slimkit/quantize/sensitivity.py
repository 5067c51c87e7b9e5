"""Per-layer quantization sensitivity and automatic bit widths under a size budget.

:func:`layer_sensitivity` measures, for every quantizable layer and every candidate
weight width ``b``, the accuracy drop when *only that layer's weights* are quantized at
``b`` bits (everything else float, activations float): the table that says which layers
tolerate 4 or 2 bits (HAWQ and HAQ rank layers the same way, with Hessian traces or RL
instead of a direct measurement; Dong 2019, Wang 2019).

:func:`choose_bits` then assigns widths greedily: every layer starts at the widest
candidate; while the stored size exceeds the budget, the layer whose next narrower width
costs the least accuracy per byte saved is lowered. Sizes are the real stored bytes
(:func:`slimkit.quantize.uniform.layer_stored_bytes`: packed codes + scales + biases), so a
3-bit choice is never offered (it packs into 4 bits and would cost the same).

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
>>> x = torch.randn(32, 1, 8, 8)
>>> y = m(x).argmax(1)
>>> acc = lambda model: 100.0 * float((model(x).argmax(1) == y).float().mean())
>>> table = layer_sensitivity(m, acc, candidates=(8, 4, 2))
>>> sorted(table), sorted(table["3"])
(['0', '3'], [2, 4, 8])
>>> plan = choose_bits(m, table, budget_bytes=400, act_bits=8)
>>> plan.bits["3"] < 8, plan.stored_bytes <= 400
(True, True)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.quantize.packing import packed_nbytes
from slimkit.selection import select_modules

Evaluate = Callable[[nn.Module], float]


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, evaluate: Evaluate, candidates: Sequence[int] = (8, 4, 2),
                      layers: Sequence[str] = ("*",), ignore: Sequence[str] = (), per_channel: bool = True,
                      symmetric: bool = True, weight_observer: str = "minmax") -> dict[str, dict[int, float]]:
    """``{layer: {bits: accuracy drop in points}}`` quantizing one layer's weights at a time.

    ``model`` is not modified (each trial swaps one layer for a weight-only fake-quantized
    copy, evaluates, and swaps it back). ``evaluate(model) -> accuracy %``; the drop is
    measured against ``evaluate(model)`` in float. Fold batch norm first (as
    :func:`~slimkit.quantize.uniform.quantize_` will) so that the grids are the deployed ones.
    """
    from slimkit.quantize.fake import QuantConv2d, QuantLinear

    bad = [b for b in candidates if not isinstance(b, int) or not 2 <= b <= 8]
    if bad or not candidates:
        raise ConfigError(f"sensitivity candidates must be integers in [2, 8], got {list(candidates)}")
    chosen = select_modules(model, (nn.Conv2d, nn.Linear), layers, ignore, what="sensitivity.layers")
    was_training = model.training
    model.eval()
    reference = float(evaluate(model))
    table: dict[str, dict[int, float]] = {}
    try:
        for name, module in chosen.items():
            cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
            table[name] = {}
            for bits in sorted(set(candidates), reverse=True):
                trial = cls.from_float(module, bits=bits, act_bits=None, per_channel=per_channel, symmetric=symmetric)
                trial.set_weight_qparams(weight_observer)
                trial.eval()
                _set(model, name, trial)
                try:
                    table[name][bits] = round(reference - float(evaluate(model)), 4)
                finally:
                    _set(model, name, module)
    finally:
        model.train(was_training)
    return table


@dataclass
class BitPlan:
    """The outcome of :func:`choose_bits`: per-layer widths, the size they give, and the path taken."""

    bits: dict[str, int]
    stored_bytes: int
    budget_bytes: int
    predicted_drop: float  # sum of the single-layer drops of the chosen widths (an estimate, not measured)
    steps: list[str] = field(default_factory=list)

    def overrides(self) -> dict[str, int]:
        """``QuantConfig.overrides`` that realise this plan (exact layer names as globs)."""
        return dict(self.bits)


def _layer_bytes(module: nn.Module, bits: int, per_channel: bool, symmetric: bool, act_bits: int | None,
                 scale_bytes: int = 2) -> int:
    """Stored bytes of one layer at ``bits`` (same formula as ``uniform.layer_stored_bytes``)."""
    scales = module.weight.shape[0] if per_channel else 1
    size = packed_nbytes(module.weight.numel(), bits) + scale_bytes * scales + (0 if symmetric else scales)
    if getattr(module, "bias", None) is not None:
        size += 4 * module.bias.numel()
    return size + (5 if act_bits else 0)


@torch.no_grad()
def weight_noise(module: nn.Module, bits: int, per_channel: bool = True, symmetric: bool = True) -> float:
    """Relative quantization noise of a layer's weights, ``||W - Q(W)||^2 / ||W||^2`` (min-max grid)."""
    from slimkit.quantize.fake import QuantConv2d, QuantLinear

    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    q = cls.from_float(module, bits=bits, act_bits=None, per_channel=per_channel, symmetric=symmetric)
    q.set_weight_qparams("minmax")
    w = module.weight.detach().float()
    return float(((q.dequantized_weight() - w) ** 2).sum() / (w**2).sum().clamp(min=1e-12))


def choose_bits(model: nn.Module, table: dict[str, dict[int, float]], budget_bytes: int,
                act_bits: int | None = 8, per_channel: bool = True, symmetric: bool = True,
                fixed: dict[str, int] | None = None, scale_bytes: int = 2) -> BitPlan:
    """Greedy widths for the layers of ``table`` so that the stored model fits ``budget_bytes``.

    ``model`` is the float model (BN folded) the table was measured on; layers not in the
    table count at their fp32 size (and, in ``fixed``, at the given width: pinned layers).
    ``scale_bytes``: 2 for float16 weight scales (``scale_dtype: float16``), 4 for float32.
    Raises ConfigError when even the narrowest widths do not fit.
    """
    fixed = dict(fixed or {})
    modules = dict(model.named_modules())
    quantized = set(table) | set(fixed)
    other = 0
    for key, tensor in model.state_dict().items():
        if key.rpartition(".")[0] not in quantized:
            other += tensor.numel() * tensor.element_size()

    def size(name: str, bits: int) -> int:
        return _layer_bytes(modules[name], bits, per_channel, symmetric, act_bits, scale_bytes)

    bits = {name: max(widths) for name, widths in table.items()}
    pinned = sum(size(name, b) for name, b in fixed.items())
    total = other + pinned + sum(size(n, b) for n, b in bits.items())
    floor = other + pinned + sum(size(n, min(w)) for n, w in table.items())
    if floor > budget_bytes:
        raise ConfigError(
            f"size budget {budget_bytes} B cannot be met: the narrowest widths give {floor} B "
            f"(unquantized tensors {other} B); raise the budget (size_budget_bytes / size_ratio) or add narrower bits"
        )
    steps: list[str] = []
    while total > budget_bytes:
        best = None
        for name, b in bits.items():
            narrower = [w for w in table[name] if w < b]
            if not narrower:
                continue
            nb = max(narrower)
            saved = size(name, b) - size(name, nb)
            if saved <= 0:
                continue
            cost = max(table[name][nb] - table[name][b], 0.0)
            # ties in accuracy (common: a small evaluation set resolves few points) go to the
            # layer whose weights lose the least signal per byte saved
            noise = weight_noise(modules[name], nb, per_channel, symmetric) - weight_noise(
                modules[name], b, per_channel, symmetric)
            key = (cost / saved, noise / saved, -saved)
            if best is None or key < best[0]:
                best = (key, name, nb, saved)
        if best is None:  # cannot happen when floor <= budget; kept as an internal invariant
            raise AssertionError("no layer can be narrowed although the floor fits the budget")
        _, name, nb, saved = best
        steps.append(f"{name}: {bits[name]} -> {nb} bits (-{saved} B, drop {table[name][nb]:+.2f}, "
                     f"weight noise {weight_noise(modules[name], nb, per_channel, symmetric):.2e})")
        bits[name] = nb
        total -= saved
    drop = sum(table[n][b] for n, b in bits.items())
    return BitPlan({**fixed, **bits}, int(total), int(budget_bytes), round(drop, 4), steps)


def fold_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with batch norm folded (what sensitivity is measured on)."""
    from slimkit.quantize.fold import fold_bn_

    folded = copy.deepcopy(model).eval()
    fold_bn_(folded)
    return folded
