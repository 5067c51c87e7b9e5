"""The search space: per-layer knobs of three techniques, and a choice of settings as recipe stages.

A **knob** is one place a technique can act, with its settings (the first one leaves the
model as it is):

- ``channels:<producer>``: structured pruning of one channel group (the group whose
  producer layer is named; a residual stream is one group) at a channel ratio
  (:func:`slimkit.prune.structured_`, L1 filter norm, Li et al. 2017), the kept count
  rounded up to a multiple of the knob's ``round_to`` (8 for ONNX Runtime: see
  :func:`build_space`);
- ``rank:<layer>``: low-rank replacement of one layer at a fraction of its full rank
  (Tucker-2 for k x k convolutions, Kim et al. 2016; SVD for Linear and 1 x 1 convolutions,
  Denton et al. 2014);
- ``bits:<layer>``: uniform weight quantization of one layer at 8, 4 or 2 bits with 8-bit
  activations (32: left in float).

A **choice** gives every knob a setting index. :func:`choice_stages` spells it as recipe
stages (structured pruning first, grouped by ratio; then decomposition, grouped by method
and rank; then one ``int8`` stage with per-layer ``overrides``), so the recipe YAML the
search writes and the models its trials build are the same transforms
(:func:`apply_stages` runs the registered stage functions on the parsed recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

Choice = tuple[int, ...]


@dataclass(frozen=True)
class Knob:
    """One per-layer decision: ``technique`` in ``channels``/``rank``/``bits`` on ``target`` (a layer name)."""

    technique: str
    target: str
    settings: tuple[float, ...]
    method: str | None = None  # decomposition method of a rank knob
    round_to: int = 1  # a channel knob's kept counts: multiples of this (StructuredConfig.round_to)

    @property
    def id(self) -> str:
        return f"{self.technique}:{self.target}"

    def label(self, index: int) -> str:
        value = self.settings[index]
        return {"channels": f"-{value:.0%} ch", "rank": f"rank {value:g}", "bits": f"{int(value)} bit"}[self.technique]


def _rank_method(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "svd" if min(module.in_features, module.out_features) >= 8 else None
    if isinstance(module, nn.Conv2d) and module.groups == 1 and min(module.in_channels, module.out_channels) >= 8:
        return "svd" if module.kernel_size == (1, 1) else "tucker"
    return None


def kept_count(n: int, ratio: float, round_to: int = 1, partitions: int = 0, max_layer_ratio: float = 0.9) -> int:
    """Channel units a group of ``n`` keeps after local structured pruning at ``ratio`` (all partitions together).

    The rule of :func:`slimkit.prune.structured_` with ``scope: local``
    (:func:`slimkit.prune.structured.local_keep`); a group of ``partitions`` partitions of ``n``
    units each (it reaches a grouped convolution) keeps that many in each. A test builds every
    knob setting and checks the real counts.
    """
    from slimkit.prune.structured import StructuredConfig, local_keep

    cfg = StructuredConfig(ratio=ratio, round_to=round_to, max_layer_ratio=max_layer_ratio)
    keep = local_keep(n, ratio, cfg, partitions)
    return keep * partitions if partitions else keep


def build_space(model: nn.Module, example_inputs: torch.Tensor, techniques: Sequence[str],
                ratios: Sequence[float] = (0.25, 0.5, 0.75), ranks: Sequence[float] = (0.5, 0.25, 0.125, 0.0625),
                bits: Sequence[int] = (8, 4, 2), skipped: dict[str, str] | None = None,
                round_to: int = 1) -> list[Knob]:
    """The knobs of ``model`` for ``techniques`` (a subset of channels, rank, bits), in model order.

    Channel groups come from the dependency graph (:func:`slimkit.prune.graph.build_graph`),
    the classifier's output excluded. With ``round_to`` > 1 every kept channel count is a
    multiple of it (:func:`kept_count`): ONNX Runtime's x86 convolutions run in a blocked
    channel layout (8 channels a block with AVX2, 16 with AVX-512) and fall back to a plain
    kernel, with layout reorders around it, for a count that does not fill its blocks; on
    this machine (AVX2) MobileNetV2 pruned uniformly at 40 % ran at 1.27x the baseline's
    median with the exact counts and at 0.36x with counts rounded to 8. A ratio whose
    rounded count is the group's whole width, or the count of a smaller ratio, is not a
    setting of that group. Rank knobs exist for layers whose decomposition at a
    setting is smaller than the layer (others would be skipped by ``only_if_smaller``).
    A technique the model cannot take (channels of a model torch.fx cannot trace) is left out
    and the reason put in ``skipped`` (technique -> why).
    """
    from slimkit.decompose import METHODS, chain_cost
    from slimkit.decompose.ranks import fraction_rank
    from slimkit.exceptions import ConfigError
    from slimkit.selection import classifier_name

    unknown = set(techniques) - {"channels", "rank", "bits"}
    if unknown or not techniques:
        raise ConfigError(f"search techniques must be among channels, rank, bits; got {sorted(techniques)}")
    knobs: list[Knob] = []
    classifier = classifier_name(model)
    modules = dict(model.named_modules())
    if "channels" in techniques:
        from slimkit.exceptions import UnsupportedModelError
        from slimkit.prune.graph import build_graph

        try:
            groups = build_graph(model, example_inputs, on_unsupported="skip").groups
        except UnsupportedModelError as err:
            groups = []
            if skipped is not None:
                skipped["channels"] = str(err)
        for group in groups:
            if classifier in group.producers or len(group.units) < 2:
                continue
            n = len(group.partitions[0]) if group.partitions else len(group.units)
            parts = len(group.partitions or ())
            width = n * max(parts, 1)
            counts = {width}
            usable = []
            for r in sorted(ratios):  # ascending: a setting's index is its strength
                kept = kept_count(n, r, round_to, parts)
                if 1 <= int(r * n + 1e-9) < n and kept not in counts:
                    counts.add(kept)
                    usable.append(r)
            if usable:
                knobs.append(Knob("channels", group.producers[0], (0.0, *usable), round_to=round_to))
    if "rank" in techniques:
        shapes = _input_shapes(model, example_inputs)
        for name, module in modules.items():
            method = _rank_method(module) if name and name != classifier and name in shapes else None
            if method is None:
                continue
            spec = METHODS.get(method)
            if spec.reason(module) is not None:
                continue
            full = spec.full_ranks(module)
            base = chain_cost(module, shapes[name])
            usable = []
            for fraction in ranks:
                skeleton = spec.skeleton(module, tuple(fraction_rank(f, fraction) for f in full), device="meta")
                cost = chain_cost(skeleton, shapes[name])
                if cost[0] < base[0] and cost[1] < base[1]:
                    usable.append(fraction)
            if usable:
                knobs.append(Knob("rank", name, (1.0, *usable), method))
    if "bits" in techniques:
        for name, module in modules.items():
            if name and isinstance(module, (nn.Conv2d, nn.Linear)):
                knobs.append(Knob("bits", name, (32, *bits)))
    if not knobs:
        raise ConfigError(f"search: the model offers no knob for techniques {list(techniques)}; "
                          "add a technique (--techniques channels,rank,bits)")
    return knobs


def _input_shapes(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_module, args) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example_inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def uniform_choice(knobs: Sequence[Knob], ratio: float) -> Choice:
    """Every channel knob at ``ratio``, every other knob left alone: uniform pruning as a choice.

    A knob without ``ratio`` among its settings takes its largest setting under it (0: left
    alone): with rounded counts that is the setting keeping as many channels as ``ratio``
    would (:func:`build_space` drops a ratio whose count a smaller one already gives), so the
    choice is ``structured_`` at ``ratio`` with the same ``round_to``.
    """
    def index(knob: Knob) -> int:
        if knob.technique != "channels":
            return 0
        if ratio in knob.settings:
            return knob.settings.index(ratio)
        under = [i for i, s in enumerate(knob.settings) if s <= ratio]
        return max(under, key=lambda i: knob.settings[i]) if under else 0

    return tuple(index(k) for k in knobs)


def choice_stages(knobs: Sequence[Knob], choice: Choice, *, finetune_epochs: int = 0, quantize_all: bool = False,
                  engines: Sequence[str] = ("onnxruntime", "torch")) -> list[dict[str, Any]]:
    """Recipe stage entries realising ``choice`` (see the module docstring).

    ``finetune_epochs`` goes on the last stage before quantization (none when 0);
    ``quantize_all``: every Conv2d/Linear at 8 bits unless a bits knob says otherwise (the
    ``onnxruntime-int8`` engine).
    """
    stages: list[dict[str, Any]] = []
    by_ratio: dict[tuple[float, int], list[str]] = {}
    by_rank: dict[tuple[str, float], list[str]] = {}
    bits: dict[str, int] = {}
    for knob, index in zip(knobs, choice, strict=True):
        value = knob.settings[index]
        if knob.technique == "channels" and index:
            by_ratio.setdefault((float(value), knob.round_to), []).append(knob.target)
        elif knob.technique == "rank" and index:
            by_rank.setdefault((knob.method, float(value)), []).append(knob.target)
        elif knob.technique == "bits" and (index or quantize_all):
            bits[knob.target] = 8 if not index else int(value)
    for ratio, round_to in sorted(by_ratio):
        structured = {"ratio": ratio, "criterion": "l1", "layers": by_ratio[(ratio, round_to)]}
        if round_to > 1:
            structured["round_to"] = round_to
        stages.append({"name": f"prune-{ratio:g}", "structured": structured})
    for (method, rank) in sorted(by_rank):
        stages.append({"name": f"{method}-{rank:g}", "decompose": {"method": method, "rank": rank,
                                                                    "layers": by_rank[(method, rank)]}})
    if finetune_epochs and stages:
        stages[-1]["finetune"] = {"epochs": int(finetune_epochs)}
    if bits or quantize_all:
        entry: dict[str, Any] = {"bits": 8, "engines": list(engines)}
        if bits:
            entry["layers"] = [p for name in bits for p in (name, f"{name}.*")]
            low = {p: b for name, b in bits.items() if b != 8 for p in (name, f"{name}.*")}
            if low:
                entry["overrides"] = low
        stages.append({"name": "int8", "int8": entry})
    return stages


def apply_stages(model: nn.Module, recipe: Any, example_inputs: torch.Tensor, data: Any,
                 run_dir: str | Path, finetune=None) -> nn.Module:
    """Apply the stages of a parsed ``recipe`` to ``model`` as the pipeline would, without its reports.

    Structured pruning and decomposition run their registered stage functions;
    ``finetune(model, epochs)`` (or nothing) runs where a stage has a fine-tune; the ``int8``
    stage quantizes (calibrated on the training split, as the stage does) but does not export
    or compare engines. Returns the transformed model (``model`` itself, changed in place).
    """
    from slimkit.quantize.uniform import calibration_batches, quantize_
    from slimkit.stages import STAGES, StageContext, no_evaluation, no_training

    for index, stage in enumerate(recipe.stages, start=1):
        if stage.kind == "int8":
            quant = stage.config.quant_config()
            quantize_(model, example_inputs, quant, calibration=list(calibration_batches(data.train, quant)))
            continue
        # structural only: no training between a stage's rounds, no accuracy
        ctx = StageContext(example_inputs=example_inputs, data=data, train_config=recipe.train,
                           run_dir=Path(run_dir), baseline=model, stage_index=index, finetune=no_training,
                           evaluate=no_evaluation)
        model = STAGES.get(stage.kind).apply(model, stage.config, ctx).model
        if stage.finetune is not None and finetune is not None and stage.finetune.epochs:
            finetune(model, stage.finetune.epochs)
    return model.eval()
