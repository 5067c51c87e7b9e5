"""Per-layer sensitivity across techniques: what each knob setting alone does to the outputs.

For every knob of the space (:mod:`slimkit.search.space`) and every setting but the
identity, the setting is applied *alone* to a copy of the baseline (no fine-tune; a channel
or rank setting's batch norms re-estimated on the samples, :func:`adapt_batchnorm`) and the
copy is run on a fixed set of samples: ``drop`` is the accuracy lost in points, ``kl`` the
mean ``KL(p_baseline || p_trial)`` of the softmax outputs in nats (the int8 sensitivity
table's measure, :func:`slimkit.quantize.sensitivity.mean_kl`: continuous, so it still
ranks layers when every drop is 0). One table covers channel ratios, rank fractions and
bit widths, so one search can trade them against each other (pruning-only tables are
Li et al. 2017's Figure 2; quantization-only ones HAQ's and HAWQ's inputs).

The table is cached in the run directory (``sensitivity.json``) under a key of the
baseline's weights, the knobs and the samples: a second search on the same baseline
reuses it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.atomic import atomic_open, atomic_write_bytes
from slimkit.search.space import Knob, apply_stages, choice_stages


def model_key(model: nn.Module) -> str:
    """A SHA-1 of ``model``'s state dict (names, shapes, values)."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x).double() for x in batches])


def adapt_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """Re-estimate every batch norm's running mean and variance on ``batches`` (no gradient step; in place).

    Pruning channels or replacing a layer by a low-rank chain shifts the statistics the next
    batch norm normalizes by; evaluated with the baseline's statistics, most candidates read
    near chance and their accuracy says little about what they reach once fine-tuned.
    Recomputing the statistics first is EagleEye's adaptive batch norm (Li et al. 2020,
    "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network Pruning"), which they show
    makes a candidate's accuracy correlate with its fine-tuned accuracy. Returns ``model`` in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all the batches
    model.train()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return model


def measure_sensitivity(baseline: nn.Module, knobs: Sequence[Knob], samples: torch.utils.data.Dataset,
                        header: dict[str, Any], example_inputs: torch.Tensor, data: Any, run_dir: str | Path,
                        batch_size: int = 256) -> dict[str, dict[str, dict[str, float]]]:
    """``{knob id: {setting: {"drop": points, "kl": nats}}}`` (settings as strings), cached; see the module doc."""
    from slimkit.quantize.sensitivity import mean_kl
    from slimkit.recipe import parse_recipe

    run_dir = Path(run_dir)
    cache = run_dir / "sensitivity.json"
    # a knob's round_to joins the key only when it rounds (tables cached before it existed stay valid)
    spec = [(k.id, k.settings, k.method) + ((k.round_to,) if k.round_to > 1 else ()) for k in knobs]
    key = hashlib.sha1(json.dumps([model_key(baseline), spec, len(samples),
                                   "adaptive-bn vs adapted baseline"]).encode()).hexdigest()
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                return stored["table"]
        except (json.JSONDecodeError, KeyError):
            pass
    loader = torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=False)
    batches, labels = [], []
    for x, y in loader:
        batches.append(x)
        labels.append(torch.as_tensor(y))
    target = torch.cat(labels)
    baseline = baseline.eval()
    reference = _logits(baseline, batches)
    base_acc = 100.0 * float((reference.argmax(1) == target).double().mean())
    # structural settings are compared with the baseline's batch norms re-estimated the same way, so that
    # re-estimation alone (which moves the outputs of an unchanged model too) costs nothing
    adapted = _logits(adapt_batchnorm(copy.deepcopy(baseline), batches), batches)
    adapted_acc = 100.0 * float((adapted.argmax(1) == target).double().mean())
    from types import SimpleNamespace

    view = SimpleNamespace(train=samples, test=getattr(data, "test", None))  # int8 calibration: the same samples
    table: dict[str, dict[str, dict[str, float]]] = {}
    for i, knob in enumerate(knobs):
        table[knob.id] = {}
        for index in range(1, len(knob.settings)):
            choice = tuple(index if j == i else 0 for j in range(len(knobs)))
            recipe = parse_recipe({**header, "stages": choice_stages(knobs, choice)}, "search sensitivity")
            trial = apply_stages(copy.deepcopy(baseline), recipe, example_inputs, view, run_dir / "tmp")
            ref, ref_acc = reference, base_acc
            if knob.technique != "bits":  # structural: the batch norms see new statistics (quantized: calibrated)
                adapt_batchnorm(trial, batches)
                ref, ref_acc = adapted, adapted_acc
            logits = _logits(trial, batches)
            acc = 100.0 * float((logits.argmax(1) == target).double().mean())
            table[knob.id][str(knob.settings[index])] = {"drop": round(ref_acc - acc, 4),
                                                         "kl": float(mean_kl(ref, logits))}
    atomic_write_bytes(cache, json.dumps({"key": key, "samples": len(samples), "baseline_accuracy": base_acc,
                                          "table": table}, indent=1).encode())
    return table


def plot_sensitivity(knobs: Sequence[Knob], table: dict[str, dict[str, dict[str, float]]], path: Path,
                     title: str = "") -> None:
    """Heat map: one row per knob, one column per setting (strongest last), colour = accuracy drop (points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    width = max(len(k.settings) - 1 for k in knobs)
    grid = np.full((len(knobs), width), np.nan)
    for r, knob in enumerate(knobs):
        for c, setting in enumerate(knob.settings[1:]):
            cell = table.get(knob.id, {}).get(str(setting))
            if cell is not None:
                grid[r, c] = cell["drop"]
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * width, 1.0 + 0.28 * len(knobs)), dpi=110)
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=0, vmax=max(1.0, float(np.nanmax(grid))))
    for r, knob in enumerate(knobs):
        for c in range(len(knob.settings) - 1):
            if not np.isnan(grid[r, c]):
                ax.text(c, r, f"{knob.label(c + 1)}\n{grid[r, c]:.1f}", ha="center", va="center", fontsize=6,
                        color="white" if grid[r, c] > 0.6 * np.nanmax(grid) else "black")
    ax.set_yticks(range(len(knobs)), [k.id for k in knobs], fontsize=6)
    ax.set_xticks(range(width), [f"setting {c + 1}" for c in range(width)], fontsize=7)
    fig.colorbar(image, ax=ax, label="accuracy drop (points)")
    ax.set_title(title or "per-layer sensitivity (one knob at a time, no fine-tune)", fontsize=9)
    fig.tight_layout()
    with atomic_open(path) as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def sensitivity_rows(knobs: Sequence[Knob], table: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """The table as rows for reports: knob, technique, layer, setting, drop, kl."""
    rows = []
    for knob in knobs:
        for setting in knob.settings[1:]:
            cell = table[knob.id][str(setting)]
            rows.append({"knob": knob.id, "technique": knob.technique, "layer": knob.target,
                         "setting": knob.label(knob.settings.index(setting)), "drop": cell["drop"],
                         "kl": float(f"{cell['kl']:.3g}")})
    return rows
