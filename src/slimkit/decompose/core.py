"""``decompose_``: replace layers by low-rank chains, in place, and report what changed.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10))
>>> x = torch.randn(2, 8, 6, 6)
>>> before = model(x)
>>> report = decompose_(model, x, {"method": "tucker", "rank": 1.0, "only_if_smaller": False})
>>> [(row.name, row.ranks) for row in report.layers], sorted(report.skipped)
([('0', (8, 16))], ['3'])
>>> torch.allclose(model(x), before, atol=1e-5)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from slimkit.config import Config
from slimkit.decompose.methods import METHODS, Method
from slimkit.decompose.ranks import energy_rank, fraction_rank, vbmf_rank
from slimkit.exceptions import ConfigError
from slimkit.measure.inputs import as_args
from slimkit.reports import ModelSize, Report
from slimkit.selection import matches, replace_module

_GLOB = set("*?[")


class DecomposeConfig(Config):
    """How to decompose: method, how ranks are chosen, and which layers.

    Rank choice, exactly one of: ``rank`` (an int = that rank on every rank axis; a float
    in (0, 1] = that fraction of each axis' full rank; ``"vbmf"``; ``"full"``), ``energy``
    (keep the singular values holding this share of sum(s^2) per axis), or ``target``
    (whole-model reduction factor of ``target_metric``, met by choosing per-layer ranks from
    the layers' error-vs-cost curves). None of them means ``rank: vbmf``. ``min_rank``
    floors the ranks that ``vbmf`` and ``energy`` choose (a fraction of each axis' full
    rank): VBMF reads barely trained weights as noise and may keep rank 1.
    ``only_if_smaller``: leave a layer as it is when its decomposition would cost more
    MACs or parameters than the layer (reported as skipped).
    """

    method: str = "tucker"
    rank: int | float | Literal["vbmf", "full"] | None = None
    energy: float | None = Field(None, gt=0, le=1)
    target: float | None = Field(None, gt=1, description="whole-model reduction factor, e.g. 2.0")
    target_metric: Literal["macs", "params"] = "macs"
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    min_rank: float = Field(0.0, ge=0, le=1, description="floor on vbmf/energy ranks, a fraction of full rank")
    only_if_smaller: bool = True
    tucker_iters: int = Field(2, ge=0, le=50)
    cp_max_iter: int = Field(300, ge=1)
    cp_tol: float = Field(1e-7, gt=0)
    cp_solver: Literal["torch", "tensorly"] = "torch"

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        METHODS.get(value)  # UnknownNameError (a ConfigError) with close matches
        return value

    @field_validator("rank", mode="before")
    @classmethod
    def _valid_rank(cls, value: Any) -> Any:
        allowed = "allowed: an int >= 1, a float in (0, 1] (fraction of full rank), 'vbmf' or 'full'"
        if isinstance(value, bool) or (isinstance(value, str) and value not in ("vbmf", "full")):
            raise ValueError(f"rank {value!r} is not valid; {allowed}")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"rank {value} is not valid; {allowed}")
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(f"rank {value} is not valid; {allowed}")
        return value

    @model_validator(mode="after")
    def _one_rank_rule(self) -> DecomposeConfig:
        given = [k for k in ("rank", "energy", "target") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set only one of rank, energy, target (got {', '.join(given)})")
        return self

    @property
    def rank_rule(self) -> str:
        """Human-readable rank rule, for reports."""
        if self.energy is not None:
            return f"energy {self.energy}"
        if self.target is not None:
            return f"target {self.target}x {self.target_metric}"
        return f"rank {self.rank if self.rank is not None else 'vbmf'}"


@dataclass
class LayerReport:
    """One decomposed layer."""

    name: str
    method: str
    ranks: tuple[int, ...]
    full_ranks: tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    rel_error: float
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class DecomposeReport(Report):
    """What :func:`decompose_` did: decomposed layers (``layers``, names also in ``changed``),
    skipped layers (name -> why), and the conv/linear totals of :func:`chain_cost`."""

    verb: str = "decompose_"
    method: str
    rule: str
    layers: list[LayerReport] = field(default_factory=list)
    model_macs_before: int = 0
    model_macs_after: int = 0
    model_params_before: int = 0
    model_params_after: int = 0
    derived: ClassVar[tuple[str, ...]] = ("mac_reduction",)

    @property
    def mac_reduction(self) -> float:
        """Whole-model conv/linear MACs before / after."""
        return self.model_macs_before / max(1, self.model_macs_after)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (for ``StageOutput.details``); ``mac_reduction`` rounded to 4 places."""
        out = super().to_dict()
        out["mac_reduction"] = round(self.mac_reduction, 4)
        return out

    def table(self) -> str:
        """Plain-text per-layer table."""
        lines = [f"{'layer':<28} {'ranks':>12} {'params':>21} {'MACs':>25} {'rel.err':>8}"]
        for r in self.layers:
            lines.append(f"{r.name:<28} {'/'.join(map(str, r.ranks)):>12} {r.params_before:>10}->{r.params_after:<10}"
                         f" {r.macs_before:>12}->{r.macs_after:<12} {r.rel_error:8.4f}")
        lines += [f"{name:<28} skipped: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


@dataclass(kw_only=True)
class DecompositionPlan:
    """What :func:`plan_decomposition` chose, for :func:`apply_decomposition` to carry out.

    ``ranks``: layer -> ranks to factorize it at (one per rank axis of ``config.method``);
    ``skipped``: layer -> why it stays whole; ``input_shapes``: each conv/linear layer's input
    shape without the batch axis; ``costs``: each conv/linear layer's ``(params, MACs)`` as it is
    (:func:`chain_cost`); ``model_params`` / ``model_macs``: the whole model's before the change.
    """

    config: DecomposeConfig
    ranks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    costs: dict[str, tuple[int, int]] = field(default_factory=dict)
    model_params: int = 0
    model_macs: int = 0


# ---------------------------------------------------------------- costs


def chain_cost(chain: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """(params, MACs) of a layer or a chain of layers (a skeleton on the meta device included) for
    one input of shape ``in_shape`` (no batch axis: [C, H, W] for convs, [..., C] for Linear).

    Counted by :mod:`slimkit.measure` (``count_params``, ``count_macs_by_shape``: the MAC rules
    of ``count_macs`` applied to shapes), so a chain costs what the model's MAC figure says it does.
    """
    from slimkit.measure.macs import count_macs_by_shape
    from slimkit.measure.size import count_params

    return count_params(chain), count_macs_by_shape(chain, (1, *in_shape))


def _record(shapes: dict, name: str, _module: nn.Module, args: tuple) -> None:
    shapes.setdefault(name, tuple(args[0].shape[1:]))


def _input_shapes(model: nn.Module, example_inputs: tuple[torch.Tensor, ...],
                  names: set[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if name in names:
            handles.append(module.register_forward_pre_hook(partial(_record, shapes, name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


# ---------------------------------------------------------------- rank rules


def _axis_singular_values(method: Method, module: nn.Module) -> list[list[torch.Tensor]]:
    return [[torch.linalg.svdvals(m) for m in mats] for mats in method.rank_matrices(module)]


def _choose_ranks(name: str, method: Method, module: nn.Module, cfg: DecomposeConfig) -> tuple[int, ...]:
    full = method.full_ranks(module)
    rank = cfg.rank if cfg.rank is not None or cfg.energy is not None else "vbmf"
    floor = [fraction_rank(f, cfg.min_rank) if cfg.min_rank > 0 else 1 for f in full]
    if cfg.energy is not None:
        return tuple(min(f, max(lo, *(energy_rank(s, cfg.energy) for s in axis)))
                     for f, lo, axis in zip(full, floor, _axis_singular_values(method, module), strict=True))
    if rank == "vbmf":
        return tuple(min(f, max(lo, *(vbmf_rank(m) for m in mats)))
                     for f, lo, mats in zip(full, floor, method.rank_matrices(module), strict=True))
    if rank == "full":
        return full
    if isinstance(rank, float):
        return tuple(fraction_rank(f, rank) for f in full)
    for axis, f in zip(method.axes, full, strict=True):
        if rank > f:
            raise ConfigError(
                f"{name}: rank {rank} is above the full {axis} rank {f} of this layer for method "
                f"{method.name}; allowed 1..{f}: lower the rank, use a fraction such as 0.5, or ignore the layer"
            )
    return (rank,) * len(full)


def _tail_error(svals: list[torch.Tensor], r: int) -> float:
    """Share of energy dropped by keeping r singular values (worst matrix of an axis)."""
    worst = 0.0
    for s in svals:
        s2 = s.double().pow(2)
        total = float(s2.sum())
        worst = max(worst, float(s2[r:].sum()) / total if total > 0 else 0.0)
    return worst


def _target_ranks(candidates: dict[str, tuple[nn.Module, tuple]], method: Method, cfg: DecomposeConfig,
                  model_cost: int, metric: int) -> dict[str, tuple[int, ...] | None]:
    """Per-layer ranks meeting the whole-model target, greedily by error added per cost saved.

    Each layer's curve: ranks at fractions of full rank, the cost of the chain (exact), and
    the share of energy its rank axes drop (Eckart-Young tail; for tucker/cp a proxy from
    the mode unfoldings). Starting from every layer undecomposed, the move with the least
    added error per unit of cost saved is taken until the model cost meets the target.
    """
    budget = model_cost / cfg.target
    curves: dict[str, list[tuple[int, float, tuple[int, ...] | None]]] = {}
    for name, (module, in_shape) in candidates.items():
        full = method.full_ranks(module)
        svals = _axis_singular_values(method, module)
        base = chain_cost(module, in_shape)[metric]
        points = [(base, 0.0, None)]
        seen = set()
        for i in range(1, 49):
            frac = i / 48
            ranks = tuple(fraction_rank(f, frac) for f in full)
            if ranks in seen:
                continue
            seen.add(ranks)
            cost = chain_cost(method.skeleton(module, ranks, device="meta"), in_shape)[metric]
            if cost >= base:
                continue
            err = math.sqrt(sum(_tail_error(s, r) for s, r in zip(svals, ranks, strict=True)))
            points.append((cost, err, ranks))
        curves[name] = sorted(points, key=lambda p: -p[0])
    state = {name: 0 for name in curves}  # index into each curve (0 = undecomposed)
    total = model_cost
    while total > budget:
        best = None
        for name, pts in curves.items():
            cost0, err0, _ = pts[state[name]]
            for j in range(state[name] + 1, len(pts)):
                saved, added = cost0 - pts[j][0], pts[j][1] - err0
                if saved > 0 and (best is None or added / saved < best[0]):
                    best = (added / saved, name, j, saved)
        if best is None:
            floor = total
            raise ConfigError(
                f"target: {cfg.target}x fewer {cfg.target_metric} is not reachable with method {method.name}: "
                f"at the lowest ranks the model still costs {floor} of {model_cost}; lower target, widen layers "
                "or use another method"
            )
        _, name, j, saved = best
        state[name] = j
        total -= saved
    return {name: curves[name][state[name]][2] for name in curves}


# ---------------------------------------------------------------- plan, apply, the verb


def plan_decomposition(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
                       config: DecomposeConfig | dict | None = None) -> DecompositionPlan:
    """Choose which layers of ``model`` to factorize and at which ranks; ``model`` is not changed.

    ``example_inputs``: a tensor or a tuple of tensors the model accepts (one forward measures
    each layer's input size for the MAC counts). Layers matched by a glob that the method
    cannot handle are skipped with the reason; a layer named exactly in ``layers`` that the
    method cannot handle is a ConfigError, as is a rank of 0 or above a layer's full rank, a
    selection that matches nothing, and an unknown method.
    """
    cfg = DecomposeConfig.coerce(config, where="decompose")
    args = as_args(example_inputs)
    method = METHODS.get(cfg.method)
    plan = DecompositionPlan(config=cfg)
    explicit = {p for p in cfg.layers if not (_GLOB & set(p))}
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if not matches(name, cfg.layers) or matches(name, cfg.ignore):
            continue
        reason = method.reason(module)
        if reason is None and hasattr(module, "weight_mask"):
            reason = "has a pruning mask (weight_mask); decompose before unstructured pruning"
        if reason is None and "weight" in getattr(module, "parametrizations", {}):
            reason = "its weight is parametrized (fake-quant or mask); decompose before quantizing"
        if reason is not None:
            if name in explicit:
                raise ConfigError(f"decompose.layers: layer {name!r} cannot take method {cfg.method}: {reason}")
            plan.skipped[name] = reason
            continue
        chosen[name] = module
    if not chosen:
        raise ConfigError(
            f"decompose.layers: no layer of the model can take method {cfg.method} with layers={list(cfg.layers)} "
            f"minus ignore={list(cfg.ignore)} (skipped: {len(plan.skipped)}); widen the patterns or change method"
        )

    all_layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    shapes = _input_shapes(model, args, all_layers)
    modules = dict(model.named_modules())
    plan.input_shapes = shapes
    plan.costs = {n: chain_cost(modules[n], shapes[n]) for n in all_layers if n in shapes}
    plan.model_params = sum(p.numel() for p in model.parameters())
    plan.model_macs = sum(c[1] for c in plan.costs.values())
    for n in [n for n in chosen if n not in shapes]:
        plan.skipped[n] = "not called by the model's forward on the example inputs"
        chosen.pop(n)

    if cfg.target is not None:
        metric = 1 if cfg.target_metric == "macs" else 0
        model_cost = plan.model_macs if metric else plan.model_params
        planned = _target_ranks({n: (m, shapes[n]) for n, m in chosen.items()}, method, cfg, model_cost, metric)
    else:
        planned = {n: _choose_ranks(n, method, m, cfg) for n, m in chosen.items()}

    for name, module in chosen.items():
        ranks = planned[name]
        if ranks is None:
            plan.skipped[name] = f"kept whole: the {cfg.target}x target was met without it"
            continue
        params_before, macs_before = plan.costs[name]
        params_after, macs_after = chain_cost(method.skeleton(module, ranks, device="meta"), shapes[name])
        if cfg.only_if_smaller and (macs_after >= macs_before or params_after >= params_before):
            plan.skipped[name] = (
                f"ranks {list(ranks)} would not shrink it (MACs {macs_before}->{macs_after}, "
                f"params {params_before}->{params_after}); only_if_smaller is on")
            continue
        plan.ranks[name] = tuple(ranks)
    return plan


def apply_decomposition(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
                        plan: DecompositionPlan) -> DecomposeReport:
    """Factorize the layers of ``plan`` (from :func:`plan_decomposition` on this model) in place.

    Each planned layer becomes a plain ``nn.Sequential`` of Conv2d/Linear layers (saved and
    loaded by :mod:`slimkit.manifest`). ``example_inputs`` measure the model before and after
    (:class:`~slimkit.reports.ModelSize`). Returns a :class:`DecomposeReport`.
    """
    cfg = plan.config
    method = METHODS.get(cfg.method)
    modules = dict(model.named_modules())
    missing = [n for n in plan.ranks if n not in modules]
    if missing:
        raise ConfigError(f"decomposition plan names layers this model does not have ({missing[:3]}); "
                          "plan on the model you apply it to")
    report = DecomposeReport(method=cfg.method, rule=cfg.rank_rule, skipped=dict(plan.skipped),
                             before=ModelSize.of(model, example_inputs), model_params_before=plan.model_params,
                             model_macs_before=plan.model_macs)
    for name, ranks in plan.ranks.items():
        module = modules[name]
        params_before, macs_before = plan.costs[name]
        params_after, macs_after = chain_cost(method.skeleton(module, ranks, device="meta"), plan.input_shapes[name])
        fit = method.build(module, ranks, cfg, name)
        fit.module.train(module.training)
        replace_module(model, name, fit.module)
        report.changed.append(name)
        report.layers.append(LayerReport(name, cfg.method, tuple(ranks), method.full_ranks(module), params_before,
                                         params_after, macs_before, macs_after, round(fit.rel_error, 6), fit.notes))
    report.model_params_after = sum(p.numel() for p in model.parameters())
    report.model_macs_after = report.model_macs_before - sum(r.macs_before - r.macs_after for r in report.layers)
    report.after = ModelSize.of(model, example_inputs)
    return report


def decompose_(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
               config: DecomposeConfig | dict | None = None) -> DecomposeReport:
    """Replace the selected Conv2d/Linear layers of ``model`` by low-rank chains, in place.

    :func:`plan_decomposition` (which layers, which ranks) then :func:`apply_decomposition`.
    ``example_inputs``: a tensor or a tuple of tensors the model accepts. Returns a
    :class:`DecomposeReport`. Methods: see :mod:`slimkit.decompose.methods`.
    """
    return apply_decomposition(model, example_inputs, plan_decomposition(model, example_inputs, config))
