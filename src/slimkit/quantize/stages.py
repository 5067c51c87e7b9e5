"""The quantization side of the ``int8``, ``qat`` and ``binarize`` recipe stages: the
automatic bit-width settings, the sensitivity-driven bit plan and the per-layer rows.

The stages themselves (:mod:`slimkit.deploy.stages`) end in deployment (engines, ONNX,
``.slim``), so they live with it: this package never imports :mod:`slimkit.deploy`,
:mod:`slimkit.export` or :mod:`slimkit.encode` (tested), which import it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Annotated, Literal

from pydantic import Field, model_validator
from torch import nn

from slimkit.measure import state_dict_bytes
from slimkit.quantize.uniform import QuantConfig, resolve_reduce_range


class AutoBitsConfig(QuantConfig):
    """QuantConfig plus automatic per-layer widths (the deployment settings are in
    :class:`slimkit.deploy.stages.Int8StageConfig`).

    ``bits: auto`` measures each layer's sensitivity (accuracy drop and output KL divergence when
    only its weights are quantized at each of ``auto_bits``, on ``sensitivity_samples`` training
    samples; 8 is measured at 7 where ``reduce_range`` applies) and picks widths greedily so that
    the stored model fits ``size_budget_bytes`` or the stage's input fp32 bytes / ``size_ratio``
    (exactly one of the two). Layers matched by ``overrides`` stay
    pinned. ``sensitivity: true`` adds the table without choosing widths.
    """

    bits: Annotated[int, Field(ge=2, le=8)] | Literal["auto"] = Field(8, description="weight bits, or auto")
    sensitivity: bool = False
    auto_bits: tuple[int, ...] = (8, 4, 2)
    size_budget_bytes: int | None = Field(None, gt=0)
    size_ratio: float | None = Field(None, gt=1)
    sensitivity_samples: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _check_auto(self):
        if any(not 2 <= b <= 8 for b in self.auto_bits) or not self.auto_bits:
            raise ValueError(f"auto_bits must be integers in [2, 8], got {list(self.auto_bits)}")
        budgets = (self.size_budget_bytes is not None) + (self.size_ratio is not None)
        if self.bits == "auto" and budgets != 1:
            raise ValueError("bits: auto needs exactly one of size_budget_bytes or size_ratio")
        if self.bits != "auto" and budgets:
            raise ValueError("size_budget_bytes / size_ratio only apply with bits: auto")
        return self

    def quant_config(self) -> QuantConfig:
        """The plain QuantConfig (``bits: auto`` becomes the widest of ``auto_bits``)."""
        fields = self.model_dump(include=set(QuantConfig.model_fields))
        if fields["bits"] == "auto":
            fields["bits"] = max(self.auto_bits)
        return QuantConfig(**fields)


def plan_bits(model: nn.Module, config: AutoBitsConfig, train) -> tuple[QuantConfig, dict]:
    """Sensitivity table (and, for ``bits: auto``, the chosen widths) on the first samples of the
    ``train`` dataset -> (QuantConfig to apply, details for the report). ``model`` is not changed."""
    from torch.utils.data import Subset

    from slimkit.quantize.sensitivity import choose_bits, fold_copy, layer_sensitivity
    from slimkit.selection import matches

    quant = config.quant_config()
    if config.bits != "auto" and not config.sensitivity:
        return quant, {}
    folded = fold_copy(model) if config.fold_bn else copy.deepcopy(model).eval()
    subset = Subset(train, range(min(config.sensitivity_samples, len(train))))
    candidates = config.auto_bits if config.bits == "auto" else tuple(sorted({8, 4, 2, config.bits}, reverse=True))
    if resolve_reduce_range(quant)[0] and quant.symmetric:  # 8-bit layers will deploy on the 7-bit grid
        candidates = tuple(sorted({7 if b == 8 else b for b in candidates}, reverse=True))
    ignore = tuple(config.ignore) + tuple(config.overrides)
    table = layer_sensitivity(folded, subset, candidates, config.layers, ignore, config.per_channel,
                              config.symmetric, config.weight_observer)
    details: dict = {"sensitivity": {n: {str(b): asdict(c) for b, c in row.items()} for n, row in table.items()},
                     "sensitivity_on": f"{len(subset)} training samples, one layer's weights quantized at a time; "
                                       "drop: accuracy points, kl: mean KL(float || quantized) of the softmax, nats"}
    if config.bits != "auto":
        return quant, details
    from slimkit.selection import select_modules

    pinned = select_modules(folded, (nn.Conv2d, nn.Linear), config.layers, config.ignore, what="int8.layers")
    fixed = {}
    for name in pinned:
        for glob, bits in config.overrides.items():
            if matches(name, (glob,)):
                fixed[name] = bits
                break
    float_bytes = state_dict_bytes(model)
    budget = config.size_budget_bytes or int(float_bytes / config.size_ratio)
    plan = choose_bits(folded, table, budget, config.act_bits, config.per_channel, config.symmetric, fixed,
                       scale_bytes=2 if config.scale_dtype == "float16" else 4)
    details.update(auto_bits={"budget_bytes": budget, "planned_bytes": plan.stored_bytes,
                              "float_bytes": float_bytes, "predicted_drop": plan.predicted_drop,
                              "predicted_kl": plan.predicted_kl, "steps": plan.steps})
    quant = quant.model_copy(update={"overrides": {**plan.overrides(), **config.overrides}})
    return quant, details


def layer_rows(details: dict) -> list[dict]:
    """details["layers"] as a list of rows (report.md renders a list of dicts as a table)."""
    sens = details.get("sensitivity", {})
    rows = []
    for name, info in details.get("layers", {}).items():
        row = {"layer": name, "type": info.get("type"), "bits": info.get("bits"), "act_bits": info.get("act_bits")}
        cells = sens.get(name, {})
        row.update({f"drop@{bits}b": cell["drop"] for bits, cell in cells.items()})
        row.update({f"kl@{bits}b": float(f"{cell['kl']:.3g}") for bits, cell in cells.items()})
        rows.append(row)
    return rows
