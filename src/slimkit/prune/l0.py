"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma 2018, "Learning Sparse
Neural Networks through L0 Regularization"), for single weights and for whole channels.

Every gated quantity ``theta_j`` (a weight, or a channel's output) is multiplied by a gate
``z_j`` in ``[0, 1]`` drawn from the hard-concrete distribution with a learned ``log_alpha_j``:

    u ~ U(0, 1),   s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = min(1, max(0, s * (zeta - gamma) + gamma))

(``beta = 2/3``, ``gamma = -0.1``, ``zeta = 1.1``). The stretch beyond ``[0, 1]`` and the clamp
put real probability mass on ``z = 0`` *exactly*, and the expected L0 norm has the closed form

    E[||theta||_0] = sum_j P(z_j != 0) = sum_j sigmoid(log_alpha_j - beta * log(-gamma / zeta)),

which is the differentiable penalty: the loss is ``CE + lam * sum_j P(z_j != 0)`` (``lam``
per gate; the paper's ``lambda / N``). At test time the gate is deterministic,
``z = min(1, max(0, sigmoid(log_alpha) * (zeta - gamma) + gamma))``, exactly 0 for
``log_alpha <= log(-gamma / zeta)``.

- ``target: weights``: one gate per weight of each selected Conv/Linear layer (a
  ``torch.nn.utils.parametrize`` parametrisation ``w -> w * z``); :func:`fold_l0_` writes
  ``w * z`` into the weight and sets ``weight_mask`` where ``z = 0`` (simulated sparsity);
- ``target: channels``: one gate per channel unit of every selected single-producer group
  of the channel graph, multiplying the output of the group's last per-channel layer (the
  BatchNorm, or the depthwise conv's BatchNorm in an inverted residual), so that ``z = 0``
  makes the channel exactly zero; :func:`fold_l0_` folds ``z`` into that layer and removes the
  zero channels physically (:func:`slimkit.prune.surgery.prune_units_`).

>>> import torch
>>> gate = HardConcrete((1000,), init_drop=0.3)  # log_alpha = log(0.7 / 0.3)
>>> round(float(gate.expected_l0().detach()) / 1000, 2)  # sigmoid(0.85 - (2/3) log(0.1 / 1.1))
0.92
>>> bool((HardConcrete((3,), init_drop=0.999).deterministic() == 0).all())
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from slimkit.config import Config
from slimkit.exceptions import ConfigError
from slimkit.prune.common import size_of, trace_input
from slimkit.prune.masks import PRUNABLE, set_mask
from slimkit.reports import Report
from slimkit.selection import classifier_name, matches, select_modules

#: attribute holding the channel gate on the gated module, and its forward-hook handle
_GATE = "l0_gate"
_HANDLE = "_slimkit_l0_handle"


class L0Config(Config):
    """Settings of the ``l0`` stage (the stage's fine-tune is the L0-regularised training)."""

    target: Literal["weights", "channels"] = "weights"
    lam: float = Field(0.05, ge=0, description="penalty per gate on P(z != 0)")
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] | None = Field(None, description="default: none for weights, the classifier for channels")
    init_drop: float = Field(0.1, gt=0, lt=1, description="log_alpha starts at log((1 - p) / p) (the paper code)")
    gate_lr: float = Field(100.0, gt=0, description="SGD steps move log_alpha this many times as far as the weights")
    beta: float = Field(2 / 3, gt=0)
    gamma: float = Field(-0.1, lt=0)
    zeta: float = Field(1.1, gt=1)


@dataclass(kw_only=True)
class L0GateReport(Report):
    """What :func:`add_l0_gates_` did: ``gated`` maps each gated layer to its number of gates."""

    target: str
    gated: dict[str, int] = field(default_factory=dict)


@dataclass(kw_only=True)
class L0FoldReport(Report):
    """What :func:`fold_l0_` did.

    ``layers``: per gated layer ``{"gates", "zero", "expected_l0"}``. For channel gates also
    ``channels_removed``, the surgery rows ``cuts`` and ``max_abs_change`` (the largest output
    change the cut caused on ``example_inputs``).
    """

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    channels_removed: int = 0
    cuts: list[dict[str, Any]] = field(default_factory=list)
    max_abs_change: float = 0.0


class HardConcrete(nn.Module):
    """Hard-concrete gates of ``shape``; ``forward()`` samples in training, is deterministic in eval."""

    def __init__(self, shape: tuple[int, ...], init_drop: float = 0.1, beta: float = 2 / 3, gamma: float = -0.1,
                 zeta: float = 1.1, gate_lr: float = 1.0) -> None:
        super().__init__()
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        # log_alpha = k * raw with k = sqrt(gate_lr): an SGD step on raw moves log_alpha gate_lr times
        # as far as the same gradient would move a weight (one optimizer, a faster rate for the gates)
        self.scale = math.sqrt(gate_lr)
        init = math.log(1 - init_drop) - math.log(init_drop)
        self.raw = nn.Parameter((torch.full(shape, init) + 0.01 * torch.randn(shape)) / self.scale)

    @property
    def log_alpha(self) -> torch.Tensor:
        """``log_alpha`` of every gate (``scale * raw``)."""
        return self.raw * self.scale

    def set_log_alpha_(self, value: torch.Tensor) -> None:
        """Set ``log_alpha`` (in place, no gradient)."""
        with torch.no_grad():
            self.raw.copy_(torch.as_tensor(value, dtype=self.raw.dtype).expand_as(self.raw) / self.scale)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of ``z`` (differentiable in ``log_alpha``)."""
        u = torch.rand(self.log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(self.log_alpha)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def deterministic(self) -> torch.Tensor:
        """Test-time gate ``min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``."""
        return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)

    def prob_nonzero(self) -> torch.Tensor:
        """``P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))`` per gate."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def expected_l0(self) -> torch.Tensor:
        """Closed-form expected number of non-zero gates."""
        return self.prob_nonzero().sum()

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic()


class _WeightGate(nn.Module):
    """Parametrisation ``w -> w * z`` (``z`` from the gate, shaped like ``w``)."""

    def __init__(self, gate: HardConcrete) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate()


def gates(model: nn.Module) -> dict[str, HardConcrete]:
    """Every L0 gate of ``model`` by the qualified name of the layer it gates."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, _WeightGate):
                    out[name] = p.gate
        elif isinstance(getattr(m, _GATE, None), HardConcrete):
            out[name] = getattr(m, _GATE)
    return out


class L0Penalty:
    """``lam * sum_j P(z_j != 0)`` over every gate of the model: a ``TrainHooks.penalties`` entry."""

    def __init__(self, lam: float) -> None:
        self.lam = float(lam)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        terms = [g.expected_l0() for g in gates(model).values()]
        return self.lam * torch.stack(terms).sum() if terms else torch.zeros(())


def _channel_hook(module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
    z = getattr(module, _GATE)()
    return out * z.view(1, -1, *([1] * (out.dim() - 2)))


def _channel_sites(model: nn.Module, example_inputs: Any, cfg: L0Config) -> tuple[list[str], dict]:
    """Layers whose output channels get gates (one per single-producer group), and skipped groups."""
    from slimkit.prune.graph import build_graph

    graph = build_graph(model, example_inputs)
    modules = dict(model.named_modules())
    ignore = cfg.ignore if cfg.ignore is not None else (classifier_name(model),)
    sites, skipped = [], {}
    per_channel = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear)
    for group in graph.groups:
        if not any(matches(p, cfg.layers) for p in group.producers) or any(matches(p, ignore) for p in group.producers):
            continue
        if len(group.producers) > 1 or group.partitions:
            skipped[group.name] = "coupled channels (several producers or a grouped conv) are not gated"
            continue
        unit = graph.units[group.units[0]]
        outs = [n for (n, role) in unit.members if role == "out" and isinstance(modules[n], per_channel)
                and getattr(modules[n], "weight", None) is not None]
        if not outs:
            skipped[group.name] = "no layer with per-channel weights to gate"
            continue
        site = outs[-1]
        if site not in sites:
            sites.append(site)
    return sites, skipped


def add_l0_gates_(model: nn.Module, example_inputs: Any, config: L0Config | dict[str, Any]) -> L0GateReport:
    """Attach hard-concrete gates to ``model`` in place (weights: parametrisations; channels: hooks).

    ``example_inputs``: one batch (a tensor or a tuple of tensors): it traces the channel
    graph for ``target: channels`` and the sizes are measured on it. The report's ``gated``
    maps each gated layer to its number of gates.
    """
    cfg = L0Config.coerce(config, where="l0")
    x = trace_input(model, example_inputs)
    before = size_of(model, x)
    kw = {"init_drop": cfg.init_drop, "beta": cfg.beta, "gamma": cfg.gamma, "zeta": cfg.zeta, "gate_lr": cfg.gate_lr}
    gated, skipped = {}, {}
    if cfg.target == "weights":
        for name, m in select_modules(model, PRUNABLE, cfg.layers, cfg.ignore or (), what="l0.layers").items():
            gate = HardConcrete(tuple(m.weight.shape), **kw).to(m.weight.device).train(m.training)
            parametrize.register_parametrization(m, "weight", _WeightGate(gate))
            gated[name] = m.weight.numel()
    else:
        sites, skipped = _channel_sites(model, x, cfg)
        if not sites:
            raise ConfigError(f"l0: no single-producer channel group among layers={list(cfg.layers)}; "
                              f"skipped: {dict(list(skipped.items())[:4])}")
        modules = dict(model.named_modules())
        for name in sites:
            m = modules[name]
            channels = m.weight.shape[0]
            m.add_module(_GATE, HardConcrete((channels,), **kw).to(m.weight.device).train(m.training))
            setattr(m, _HANDLE, m.register_forward_hook(_channel_hook))
            gated[name] = channels
    return L0GateReport(verb="add_l0_gates_", changed=list(gated), skipped=skipped, before=before,
                        after=size_of(model, x), target=cfg.target, gated=gated)


@torch.no_grad()
def _fold_channel(m: nn.Module, z: torch.Tensor) -> None:
    shape = (-1,) + (1,) * (m.weight.dim() - 1)
    m.weight.mul_(z.view(shape))
    if m.bias is not None:
        m.bias.mul_(z)


def fold_l0_(model: nn.Module, example_inputs: Any) -> L0FoldReport:
    """Replace every gate by its deterministic value and remove the gates; returns an :class:`L0FoldReport`.

    Weights: ``w <- w * z`` with ``weight_mask`` where ``z = 0``. Channels: ``z`` folded into the
    gated layer (a BatchNorm's scale and shift, or a conv's filters and bias), then the channels
    with ``z = 0`` are cut out of the model. ``example_inputs`` (a tensor or a tuple of tensors)
    traces the model and the sizes are measured on it; ``max_abs_change``: the largest output
    change the cut caused on it (0 up to rounding when the activation after the gate maps 0 to 0).
    """
    was_training = model.training
    model.eval()
    x = trace_input(model, example_inputs)
    before = size_of(model, x)
    found = gates(model)
    layers: dict[str, dict[str, Any]] = {}
    zero_channels: dict[str, torch.Tensor] = {}
    for name, gate in found.items():
        m = dict(model.named_modules())[name]
        z = gate.deterministic().detach()
        layers[name] = {"gates": z.numel(), "zero": int((z == 0).sum()),
                        "expected_l0": round(float(gate.expected_l0().detach()), 3)}
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)  # eval: w * z
            set_mask(m, (z != 0).to(m.weight.dtype))
        else:
            getattr(m, _HANDLE).remove()
            delattr(m, _HANDLE)
            delattr(m, _GATE)
            _fold_channel(m, z)
            zero_channels[name] = z == 0
    cut: dict[str, Any] = _cut_zero_channels(model, x, zero_channels) if zero_channels else {}
    model.train(was_training)
    return L0FoldReport(verb="fold_l0_", changed=list(found), before=before, after=size_of(model, x),
                        layers=layers, **cut)


def _cut_zero_channels(model: nn.Module, x: Any, zero: dict[str, torch.Tensor]) -> dict[str, Any]:
    from slimkit.prune.graph import build_graph
    from slimkit.prune.surgery import prune_units_

    graph = build_graph(model, x)
    args = x if isinstance(x, tuple) else (x,)
    units = []
    for uid, unit in graph.units.items():
        for (name, role), idx in unit.members.items():
            if role == "out" and name in zero and bool(zero[name][torch.as_tensor(idx.tolist())].all()):
                units.append(uid)
                break
    with torch.no_grad():
        before = model(*args)
    # every channel of a layer can go to zero; keep its strongest one so the layer survives
    changes = prune_units_(model, graph, _keep_one_per_group(graph, units))
    with torch.no_grad():
        change = float((model(*args) - before).abs().max())
    return {"channels_removed": len(units), "cuts": changes, "max_abs_change": change}


def _keep_one_per_group(graph: Any, units: list[int]) -> list[int]:
    chosen = set(units)
    out = []
    for group in graph.groups:
        dead = [u for u in group.units if u in chosen]
        if len(dead) == len(group.units):
            dead = dead[1:]
        out += dead
    return out
