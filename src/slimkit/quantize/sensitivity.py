"""Per-layer quantization sensitivity and automatic bit widths under a size budget.

:func:`layer_sensitivity` measures, for every quantizable layer and every candidate
weight width ``b``, what quantizing *only that layer's weights* at ``b`` bits (everything
else float, activations float) does to the model's outputs on a fixed set of samples:
the accuracy drop in points (what users read) and the mean KL divergence
``KL(p_float || p_quant)`` of the softmax outputs in nats (what ranks: it is continuous,
so it still orders layers when accuracy saturates and every drop is 0). HAWQ and HAQ
rank layers the same way, with Hessian traces or RL instead of a direct measurement
(Dong 2019, Wang 2019).

:func:`choose_bits` then assigns widths greedily: every layer starts at the widest
candidate; while the stored size exceeds the budget, the layer whose next narrower width
adds the least KL per byte saved is lowered (ties: accuracy drop per byte, then relative
weight noise per byte). Sizes are the real stored bytes
(:func:`slimkit.quantize.fake.layer_stored_bytes`: packed codes + scales + biases), so a
3-bit choice is never offered (it packs into 4 bits and would cost the same).

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
>>> x = torch.randn(32, 1, 8, 8)
>>> table = layer_sensitivity(m, x, candidates=(8, 4, 2))
>>> sorted(table), sorted(table["3"])
(['0', '3'], [2, 4, 8])
>>> table["3"][2].kl > table["3"][8].kl > 0.0
True
>>> plan = choose_bits(m, table, budget_bytes=400, act_bits=8)
>>> plan.bits["3"] < 8, plan.stored_bytes <= 400
(True, True)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from slimkit.exceptions import ConfigError
from slimkit.quantize.packing import packed_nbytes
from slimkit.selection import replace_module, select_modules


@dataclass(frozen=True)
class Sensitivity:
    """One cell of the sensitivity table: one layer's weights quantized at one width, the rest float."""

    drop: float  # accuracy lost, in points (float accuracy minus trial accuracy, same samples)
    kl: float  # mean over samples of KL(p_float || p_trial) of the softmax outputs, in nats


def _samples(data: torch.Tensor | Dataset, batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(input batches, labels or None) read once; random augmentation, if any, drawn with a fixed seed."""
    if isinstance(data, torch.Tensor):
        if len(data) == 0:
            raise ConfigError("sensitivity needs at least one sample, got an empty tensor")
        return list(data.split(batch_size)), None
    if not isinstance(data, Dataset):
        raise ConfigError(f"sensitivity data must be an input tensor or a dataset of (input, label), "
                          f"got {type(data).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        batches = list(DataLoader(data, batch_size=batch_size, shuffle=False))
    if not batches:
        raise ConfigError("sensitivity needs at least one sample, got an empty dataset")
    return [inputs for inputs, _ in batches], torch.cat([torch.as_tensor(labels) for _, labels in batches])


def _logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.cat([model(inputs.to(device)).double().cpu() for inputs in batches])


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).double().mean())


def mean_kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of ``KL(softmax(reference) || softmax(logits))``, in nats (float64, >= 0)."""
    ref, other = F.log_softmax(reference.double(), dim=1), F.log_softmax(logits.double(), dim=1)
    return max(float(F.kl_div(other, ref, log_target=True, reduction="batchmean")), 0.0)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, data: torch.Tensor | Dataset, candidates: Sequence[int] = (8, 4, 2),
                      layers: Sequence[str] = ("*",), ignore: Sequence[str] = (), per_channel: bool = True,
                      symmetric: bool = True, weight_observer: str = "minmax",
                      batch_size: int = 256) -> dict[str, dict[int, Sensitivity]]:
    """``{layer: {bits: Sensitivity(drop points, kl nats)}}`` quantizing one layer's weights at a time.

    ``data``: a tensor of inputs (accuracy is then agreement with the float model's top-1,
    so ``drop`` is the percentage of predictions that change) or a dataset of (input,
    label). The samples are read once and the float logits computed once; every trial
    runs on the same samples. ``model`` is not modified (each trial swaps one layer for a
    weight-only fake-quantized copy and swaps it back). Fold batch norm first (as
    :func:`~slimkit.quantize.uniform.quantize_` will) so that the grids are the deployed ones.
    """
    from slimkit.quantize.fake import QuantConv2d, QuantLinear

    bad = [b for b in candidates if not isinstance(b, int) or not 2 <= b <= 8]
    if bad or not candidates:
        raise ConfigError(f"sensitivity candidates must be integers in [2, 8], got {list(candidates)}")
    chosen = select_modules(model, (nn.Conv2d, nn.Linear), layers, ignore, what="sensitivity.layers")
    batches, labels = _samples(data, batch_size)
    was_training = model.training
    model.eval()
    table: dict[str, dict[int, Sensitivity]] = {}
    try:
        reference = _logits(model, batches)
        labels = reference.argmax(1) if labels is None else labels
        float_acc = _accuracy(reference, labels)
        for name, module in chosen.items():
            cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
            table[name] = {}
            for bits in sorted(set(candidates), reverse=True):
                trial = cls.from_float(module, bits=bits, act_bits=None, per_channel=per_channel, symmetric=symmetric)
                trial.to(module.weight.device).set_weight_qparams(weight_observer)
                replace_module(model, name, trial.eval())
                try:
                    logits = _logits(model, batches)
                finally:
                    replace_module(model, name, module)
                table[name][bits] = Sensitivity(round(float_acc - _accuracy(logits, labels), 4),
                                                mean_kl(reference, logits))
    finally:
        model.train(was_training)
    return table


@dataclass
class BitPlan:
    """The outcome of :func:`choose_bits`: per-layer widths, the size they give, and the path taken.

    ``predicted_drop`` (points) and ``predicted_kl`` (nats) are sums of the single-layer
    figures of the chosen widths: estimates, not measurements of the mixed model.
    """

    bits: dict[str, int]
    stored_bytes: int
    budget_bytes: int
    predicted_drop: float
    predicted_kl: float
    steps: list[str] = field(default_factory=list)

    def overrides(self) -> dict[str, int]:
        """``QuantConfig.overrides`` that realise this plan (exact layer names as globs)."""
        return dict(self.bits)


def _layer_bytes(module: nn.Module, bits: int, per_channel: bool, symmetric: bool, act_bits: int | None,
                 scale_bytes: int = 2) -> int:
    """Stored bytes of one layer at ``bits`` (same formula as ``fake.layer_stored_bytes``)."""
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
    q.to(module.weight.device).set_weight_qparams("minmax")
    w = module.weight.detach().float()
    return float(((q.dequantized_weight() - w) ** 2).sum() / (w**2).sum().clamp(min=1e-12))


def choose_bits(model: nn.Module, table: dict[str, dict[int, Sensitivity]], budget_bytes: int,
                act_bits: int | None = 8, per_channel: bool = True, symmetric: bool = True,
                fixed: dict[str, int] | None = None, scale_bytes: int = 2) -> BitPlan:
    """Greedy widths for the layers of ``table`` so that the stored model fits ``budget_bytes``.

    ``table`` is :func:`layer_sensitivity`'s; each step lowers the layer whose next narrower
    width adds the least KL per byte saved (then accuracy drop per byte, then relative
    weight noise per byte). ``model`` is the float model (BN folded) the table was measured
    on; layers not in the table count at their fp32 size (and, in ``fixed``, at the given
    width: pinned layers). ``scale_bytes``: 2 for float16 weight scales (``scale_dtype:
    float16``), 4 for float32. Raises ConfigError when even the narrowest widths do not fit.
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

    noises: dict[tuple[str, int], float] = {}

    def noise(name: str, bits: int) -> float:
        if (name, bits) not in noises:
            noises[name, bits] = weight_noise(modules[name], bits, per_channel, symmetric)
        return noises[name, bits]

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
            now, then = table[name][b], table[name][nb]
            key = (max(then.kl - now.kl, 0.0) / saved, max(then.drop - now.drop, 0.0) / saved,
                   (noise(name, nb) - noise(name, b)) / saved, -saved)
            if best is None or key < best[0]:
                best = (key, name, nb, saved)
        if best is None:  # cannot happen when floor <= budget; kept as an internal invariant
            raise AssertionError("no layer can be narrowed although the floor fits the budget")
        _, name, nb, saved = best
        cell = table[name][nb]
        steps.append(f"{name}: {bits[name]} -> {nb} bits (-{saved} B, drop {cell.drop:+.2f}, kl {cell.kl:.2e}, "
                     f"weight noise {noise(name, nb):.2e})")
        bits[name] = nb
        total -= saved
    drop = sum(table[n][b].drop for n, b in bits.items())
    kl = sum(table[n][b].kl for n, b in bits.items())
    return BitPlan({**fixed, **bits}, int(total), int(budget_bytes), round(drop, 4), kl, steps)


def fold_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with batch norm folded (what sensitivity is measured on)."""
    from slimkit.quantize.fold import fold_bn_

    folded = copy.deepcopy(model).eval()
    fold_bn_(folded)
    return folded
