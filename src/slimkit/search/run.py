"""``slimkit search``: per-layer settings across techniques that meet a budget with the least accuracy lost.

Steps, all in the search's run directory:

1. the baseline (trained, or loaded from ``baseline``), saved as ``baseline.pt``, and its
   accuracy and budget metric measured end to end; a relative budget (``0.5x``) resolved
   against that measurement;
2. the search space (:mod:`~slimkit.search.space`), the sensitivity table
   (:mod:`~slimkit.search.sensitivity`, ``sensitivity.json`` / ``.png``) and, for a latency
   budget, the per-layer latency table on the engine (:mod:`~slimkit.search.latency`);
3. the NetAdapt-style greedy loop and the evolutionary search
   (:mod:`~slimkit.search.algorithms`); their candidates are fine-tuned briefly as trials
   (:mod:`~slimkit.search.trials`: Ray Tune when installed) and measured;
4. the winner (best validation accuracy among the trials whose measured metric is within the
   target; the back-off's relaxed model is one more trial, kept only if it wins) written as
   ``recipe.yaml`` and run by the ordinary pipeline (``final/``) with the full fine-tune,
   which is what ``slimkit compress --recipe recipe.yaml`` does again; its accuracy and
   metric are measured end to end;
5. ``search.json`` (budget, baseline, chosen, pareto, trials, predictor error),
   ``pareto.png``, ``search.md`` and ``report.html``.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field

from slimkit.atomic import atomic_write_bytes
from slimkit.config import Config
from slimkit.exceptions import ConfigError
from slimkit.search.space import Choice, Knob, apply_stages, build_space, choice_stages, uniform_choice

METRICS = ("latency_p99_ms", "size_bytes", "macs", "energy_mj")
_BUDGET = re.compile(r"^\s*([a-z0-9_]+)\s*=\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(x?)\s*$")


def parse_budget(text: str) -> tuple[str, float, bool]:
    """``"latency_p99_ms=0.5x"`` -> ``("latency_p99_ms", 0.5, True)`` (relative to the baseline's measured value)."""
    match = _BUDGET.match(str(text).lower())
    if not match:
        raise ConfigError(f"--budget {text!r}: write METRIC=VALUE or METRIC=FACTORx, e.g. latency_p99_ms=0.5x or "
                          f"size_bytes=20000; metrics: {', '.join(METRICS)}")
    metric, value, rel = match.group(1), float(match.group(2)), bool(match.group(3))
    if metric not in METRICS:
        import difflib

        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"--budget: unknown metric {metric!r}{hint} (known: {', '.join(METRICS)})")
    if value <= 0 or (rel and value >= 1):
        raise ConfigError(f"--budget {text!r}: the value must be > 0, and a relative budget a factor in (0, 1)")
    return metric, value, rel


class SearchConfig(Config):
    """Settings of a budget search (the ``slimkit search`` flags)."""

    model: str = "lenet5"
    data: str = "digits"
    data_dir: str = "data"
    image_size: int | None = None
    baseline: str | None = Field(None, description="saved model to start from (else one is trained)")
    epochs: int = Field(4, ge=0, description="baseline training epochs when no baseline is given")
    budget: str = "size_bytes=0.5x"
    engine: Literal["eager", "onnxruntime", "onnxruntime-int8"] = "onnxruntime"
    techniques: tuple[str, ...] | None = Field(None, description="default: channels, rank (+ bits for size/energy)")
    strategy: Literal["both", "greedy", "evolution"] = "both"
    seed: int = 0
    lr: float = Field(0.01, gt=0, description="fine-tune learning rate (trials and final)")
    baseline_lr: float = Field(0.05, gt=0)
    batch_size: int = Field(64, ge=1)
    trial_epochs: int = Field(1, ge=0)
    final_epochs: int = Field(3, ge=0)
    step_share: float = Field(0.15, gt=0, lt=1, description="NetAdapt step: share of the baseline metric per step")
    max_steps: int = Field(10, ge=1)
    greedy_candidates: int = Field(2, ge=1)
    population: int = Field(16, ge=4)
    generations: int = Field(8, ge=1)
    evolution_trials: int = Field(2, ge=0)
    uniform_seeds: bool = Field(True, description="measure every channel knob at one ratio first (predictor "
                                                  "calibration); every one that fits becomes a trial")
    finalists: int = Field(3, ge=1, description="trials within the target fine-tuned again before the choice "
                                                "(the best by validation accuracy, and the best uniform one)")
    finalist_seeds: int = Field(3, ge=1, description="fine-tunes of each finalist (its own seed and validation "
                                                     "draw each); the highest mean validation accuracy wins")
    backoff_measurements: int = Field(12, ge=0, description="end-to-end measurements the winner's back-off may spend")
    margin: float = Field(0.1, ge=0, lt=0.5, description="aim this share below a latency budget: one batch-1 p99 "
                                                         "repeats within about 8 % on an idle machine")
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    trial_samples: int | None = Field(None, ge=16, description="train each trial on only this many samples")
    sensitivity_samples: int = Field(256, ge=16)
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    ranks: tuple[float, ...] = (0.5, 0.25, 0.125, 0.0625)
    bits: tuple[int, ...] = (8, 4, 2)
    threads: int = Field(1, ge=1, description="threads of the engine when timing")
    round_to: int | None = Field(None, ge=1, description="channel knobs keep multiples of this many channels "
                                                         "(default: 8 on onnxruntime engines, 1 on eager)")
    latency_feature: Literal["auto", "table", "macs"] = Field(
        "auto", description="what predicts a candidate's p99: the per-layer table's sum, its MACs, or whichever "
                            "has predicted the measured candidates better so far")
    timing_blocks: int = Field(5, ge=1, description="blocks of 200 runs of each candidate's p99 (block median; "
                                                    "paired: alternating with the baseline)")
    baseline_blocks: int = Field(15, ge=1, description="blocks of 200 runs whose median p99 is the baseline's "
                                                       "(resolves a relative latency budget)")
    verdict_blocks: int = Field(15, ge=1, description="alternating blocks of the final paired p99 ratio against "
                                                      "the baseline (the verdict of a relative latency budget)")
    paired_timing: bool = Field(False, description="time every candidate in blocks alternating with the baseline "
                                                   "and report its p99 as the ratio times the baseline's first p99 "
                                                   "(a shared machine's load then hits both)")
    runner: Literal["auto", "ray", "sequential"] = "auto"
    ray_address: str | None = None
    sram_bytes: int | None = Field(None, ge=0)


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


class _Metric:
    """The budget metric of a model: measured end to end, and predicted for a choice (cached)."""

    def __init__(self, name: str, cfg: SearchConfig, example: torch.Tensor, calibration: torch.Tensor) -> None:
        self.name, self.cfg, self.example, self.calibration = name, cfg, example, calibration
        self.predictor = None
        self.reference: tuple[torch.nn.Module, float] | None = None  # (baseline, its p99) for paired timing

    def measure(self, model: torch.nn.Module) -> float:
        from slimkit.measure import count_macs, profile
        from slimkit.measure.energy import model_weight_bytes

        if self.name == "size_bytes":
            return float(model_weight_bytes(model))
        if self.name == "macs":
            return float(count_macs(model, self.example))
        if self.name == "energy_mj":
            return float(profile(model, self.example, latency=False, sram_bytes=self.cfg.sram_bytes).energy.total_mj)
        from slimkit.search.latency import end_to_end, paired_p99_ratio

        if self.cfg.paired_timing and self.reference is not None:
            reference, reference_p99 = self.reference
            return reference_p99 * paired_p99_ratio(model, reference, self.example, self.cfg.engine, self.cfg.threads,
                                                    blocks=self.cfg.timing_blocks)
        return float(end_to_end(model, self.example, self.cfg.engine, self.cfg.threads,
                                blocks=self.cfg.timing_blocks)["p99_ms"])

    def raw(self, model: torch.nn.Module) -> float:
        """What the prediction is a function of: the latency table's per-layer sum, else the exact metric."""
        if self.name == "latency_p99_ms":
            return self.predictor.features(model)
        return self.measure(model)

    def from_raw(self, raw: Any) -> float:
        return float(self.predictor.from_features(raw)) if self.name == "latency_p99_ms" else raw


def _fmt(metric: str, value: float) -> str:
    if metric == "size_bytes":
        return f"{value:,.0f} B"
    if metric == "macs":
        return f"{value:,.0f} MACs"
    if metric == "energy_mj":
        return f"{value * 1e3:,.3f} uJ"
    return f"{value:.4f} ms"


def pareto_front(points: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Points not dominated in (higher accuracy, lower metric), sorted by the metric."""
    front = []
    for p in sorted(points, key=lambda q: (q[metric], -q["accuracy"])):
        if not front or p["accuracy"] > front[-1]["accuracy"]:
            front.append(p)
    return front


def search(cfg: SearchConfig | dict, out_dir: str | Path, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run the budget search of ``cfg`` into ``out_dir``; returns what ``search.json`` holds."""
    from slimkit.data import load_data
    from slimkit.manifest import load_model, save_model
    from slimkit.models import create_model
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import parse_recipe
    from slimkit.search.algorithms import back_off, evolve, greedy_moves, pick_finalists, score, select_trial
    from slimkit.search.sensitivity import measure_sensitivity, plot_sensitivity, sensitivity_rows
    from slimkit.search.trials import load_split, ray_available, run_trials
    from slimkit.train import TrainConfig, evaluate, fit, seed_everything

    cfg = SearchConfig.coerce(cfg, where="search")
    metric, value, relative = parse_budget(cfg.budget)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runner = cfg.runner
    if runner == "auto":
        runner = "ray" if ray_available() else "sequential"
    elif runner == "ray" and not ray_available():
        raise ConfigError("search: runner ray needs Ray Tune; pip install 'slimkit[search]' or use --runner sequential")

    # 1. baseline ---------------------------------------------------------------------------
    seed_everything(cfg.seed)
    data = load_data(cfg.data, data_dir=cfg.data_dir, seed=cfg.seed, image_size=cfg.image_size)
    example = torch.zeros(1, *data.input_shape)
    train_cfg = TrainConfig(epochs=cfg.epochs, lr=cfg.baseline_lr, batch_size=cfg.batch_size, seed=cfg.seed)
    baseline_path = out / "baseline.pt"
    if cfg.baseline:
        baseline = load_model(cfg.baseline)
    elif baseline_path.is_file():
        baseline = load_model(baseline_path)
        _say(log, f"baseline: loaded {baseline_path}")
    else:
        baseline = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
        _say(log, f"baseline: training {cfg.model} on {cfg.data} for {cfg.epochs} epochs")
        fit(baseline, data.train, train_cfg, progress=False, desc="baseline")
    baseline.eval()
    save_model(baseline, baseline_path)
    calibration = torch.stack([data.train[i][0] for i in range(min(8, len(data.train)))])
    meter = _Metric(metric, cfg, example, calibration)
    base_accuracy = evaluate(baseline, data.test)
    base_timing: dict[str, float] | None = None
    if metric == "latency_p99_ms":
        from slimkit.search.latency import end_to_end

        # one measurement resolves the budget and calibrates the predictor: two separate ones would
        # disagree by the machine's noise, and the search would aim at a target the baseline never had. It is
        # the median of many blocks' p99s: MobileNetV2's p99 of one 5-block reading ranged 1.27 to 2.24 ms
        base_timing = end_to_end(baseline, example, cfg.engine, cfg.threads, blocks=cfg.baseline_blocks)
        base_metric = float(base_timing["p99_ms"])
        meter.reference = (baseline, base_metric)
    else:
        base_metric = meter.measure(baseline)
    budget = value * base_metric if relative else value
    _say(log, f"baseline: {base_accuracy:.2f}% test, {metric} {_fmt(metric, base_metric)}; budget "
              f"{_fmt(metric, budget)}{f' ({value:g}x)' if relative else ''}")

    # 2. space, sensitivity, latency table ----------------------------------------------------
    techniques = cfg.techniques or (("channels", "rank", "bits") if metric in ("size_bytes", "energy_mj")
                                    else ("channels", "rank"))
    skipped: dict[str, str] = {}
    round_to = cfg.round_to or (8 if cfg.engine.startswith("onnxruntime") else 1)
    knobs = build_space(baseline, example, techniques, cfg.ratios, cfg.ranks, cfg.bits, skipped, round_to=round_to)
    for technique, why in skipped.items():
        _say(log, f"space: no {technique} knobs: {why}")
    quantize_all = cfg.engine == "onnxruntime-int8"
    engines = ["onnxruntime"] if cfg.engine.startswith("onnxruntime") else ["onnxruntime", "torch"]
    header = {"name": "search", "model": cfg.model, "data": cfg.data, "data_dir": cfg.data_dir,
              "image_size": cfg.image_size,
              "train": {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed}}
    from torch.utils.data import Subset

    _, train_part, val_part = load_split({"data": {"name": cfg.data, "data_dir": cfg.data_dir, "seed": cfg.seed,
                                                   "image_size": cfg.image_size},
                                          "val_fraction": cfg.val_fraction, "seed": cfg.seed})
    samples = Subset(data.train, list(train_part.indices[: cfg.sensitivity_samples]))
    _say(log, f"space: {len(knobs)} knobs ({', '.join(techniques)}); measuring sensitivity on {len(samples)} samples")
    table = measure_sensitivity(baseline, knobs, samples, header, example, data, out)
    plot_sensitivity(knobs, table, out / "sensitivity.png", f"{cfg.model}: per-layer sensitivity")

    predictor_info: dict[str, Any] = {}
    if metric == "latency_p99_ms":
        from slimkit.search.latency import LatencyPredictor, LatencyTable

        lat_table = LatencyTable(out / "latency_table.json", cfg.engine, cfg.threads)
        measured = base_timing
        if quantize_all:  # the identity choice is the int8 baseline, not the float one that was measured
            structural = _structural(baseline, knobs, tuple(0 for _ in knobs), header, example, data, out, True)
            measured = end_to_end(structural, example, cfg.engine, cfg.threads)
            meter.reference = (structural, float(measured["p99_ms"]))
        meter.predictor = LatencyPredictor(lat_table, baseline, example, measured, cfg.latency_feature)
        predictor_info = {"engine": cfg.engine, "threads": cfg.threads, "residual_ms": meter.predictor.residual,
                          "tail_ratio": meter.predictor.tail,
                          "baseline_predicted_p99_ms": meter.predictor.p99_ms(baseline)}

    identity: Choice = tuple(0 for _ in knobs)
    latency = metric == "latency_p99_ms"
    raw: dict[Choice, Any] = {}  # what the prediction reads: (layer sum, MACs) for latency, else the metric

    def predict(choice: Choice) -> float:
        """The budget metric of ``choice`` as predicted now (calibrated on every model measured so far)."""
        if choice not in raw:
            model = _structural(baseline, knobs, choice, header, example, data, out, quantize_all and not latency)
            raw[choice] = meter.raw(model)
        return meter.from_raw(raw[choice])

    measured: dict[Choice, dict[str, float]] = {}
    if not quantize_all:  # the baseline is the identity choice, measured above
        measured[identity] = {"measured": base_metric, "predicted": base_metric, "predicted_additive": base_metric}

    def measure(choice: Choice) -> float:
        """The budget metric of ``choice``'s model measured end to end (cached); a latency measurement also
        recalibrates the predictor, after the prediction made without it was recorded (held out)."""
        if choice not in measured:
            before = predict(choice)
            additive = meter.predictor.additive_ms(raw[choice][0]) if latency else before
            value = meter.measure(_structural(baseline, knobs, choice, header, example, data, out, quantize_all))
            measured[choice] = {"measured": value, "predicted": before, "predicted_additive": additive}
            if latency:
                meter.predictor.add_features_point(raw[choice], value)
        return measured[choice]["measured"]

    target = budget * (1 - cfg.margin) if latency else budget
    bn_batches = [torch.stack([train_part[i][0] for i in range(j, min(j + 64, len(train_part), 256))])
                  for j in range(0, min(len(train_part), 256), 64)]

    def proxy_accuracy(choice: Choice) -> float:
        """Validation accuracy of ``choice``'s model, not fine-tuned, with its batch norms re-estimated."""
        from slimkit.search.sensitivity import adapt_batchnorm

        model = _structural(baseline, knobs, choice, header, example, data, out, quantize_all)
        return evaluate(adapt_batchnorm(model, bn_batches), val_part)
    payload = {"baseline": baseline, "example": example, "header": header, "seed": cfg.seed,
               "val_fraction": cfg.val_fraction, "trial_samples": cfg.trial_samples,
               "train": {"lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "epochs": cfg.trial_epochs},
               "data": {"name": cfg.data, "data_dir": cfg.data_dir, "seed": cfg.seed, "image_size": cfg.image_size}}
    trials: list[dict[str, Any]] = []

    def run_batch(choices: list[Choice], source: str) -> list[dict[str, Any]]:
        jobs = []
        for c in choices:
            jobs.append({"id": f"t{len(trials) + len(jobs):03d}",
                         "stages": choice_stages(knobs, c, finetune_epochs=cfg.trial_epochs, quantize_all=quantize_all,
                                                 engines=engines)})
        results = run_trials(jobs, payload, runner, out / "ray", f"{source}-{len(trials):03d}", cfg.ray_address)
        rows = []
        for c, res in zip(choices, results, strict=True):
            value = measure(c)
            row = {**res, "source": source, "choice": list(c), "settings": _describe(knobs, c),
                   "predicted": measured[c]["predicted"], "predicted_additive": measured[c]["predicted_additive"],
                   "measured": value, "score_kl": score(knobs, table, c)[0]}
            rows.append(row)
            _say(log, f"  trial {row['id']} ({source}): val {row['val_accuracy']:.2f}%, {metric} measured "
                      f"{_fmt(metric, row['measured'])} (predicted {_fmt(metric, row['predicted'])})")
        trials.extend(rows)
        return rows

    # 3. uniform seeds, greedy (NetAdapt) and evolution ---------------------------------------------
    uniform: list[Choice] = []
    if cfg.uniform_seeds:
        for ratio in sorted(cfg.ratios):
            u = uniform_choice(knobs, ratio)
            if any(u) and u not in uniform:
                uniform.append(u)
                _say(log, f"uniform {ratio:g}: {metric} measured {_fmt(metric, measure(u))} (predicted "
                          f"{_fmt(metric, measured[u]['predicted'])})")
        # every uniform choice that fits is a trial: the result must never be one of them beaten
        fitting = [u for u in uniform if measure(u) <= target]
        if fitting:
            run_batch(fitting, "uniform")
    choice: Choice = identity
    if cfg.strategy in ("both", "greedy"):
        step = cfg.step_share * base_metric
        level = base_metric
        for step_index in range(cfg.max_steps):
            now = measure(choice)
            if now <= target:
                break
            # the goal falls every step: a proposal that measured slower than the step before (MobileNetV2's
            # batch-1 p99 repeats only to about 30 %) must not raise the next goal above the last one
            level = min(level, now)
            goal = max(level - step, target)
            moves = greedy_moves(knobs, table, choice, predict, goal, cfg.greedy_candidates)
            if not moves:
                _say(log, "greedy: no knob lowers the metric further")
                break
            _say(log, f"greedy step {step_index + 1}: {_fmt(metric, now)} -> goal {_fmt(metric, goal)}, "
                      f"{len(moves)} proposal(s)")
            # the best proposal by accuracy, whatever its measurement: one burst of foreign load must not end the
            # loop (the next step starts from its measured value, the back-off undoes what it took too much)
            rows = run_batch(moves, "greedy")
            choice = tuple(max(rows, key=lambda r: (r["val_accuracy"], -r["measured"]))["choice"])
    if cfg.strategy in ("both", "evolution") and cfg.evolution_trials:
        seeds = [c for c in (choice, *uniform) if any(c)]
        found = evolve(knobs, table, predict, target, cfg.seed, cfg.population, cfg.generations, seeds,
                       keep=3 * cfg.evolution_trials + len(trials))
        done = {tuple(t["choice"]) for t in trials}
        # three candidates per trial, measured (the budget is on measurement); those that fit ranked by their
        # accuracy with re-estimated batch norms (EagleEye), the best fine-tuned
        candidates = [c for c in found if c not in done][: 3 * cfg.evolution_trials]
        fitting = [c for c in candidates if measure(c) <= target]
        proxy = {c: proxy_accuracy(c) for c in fitting}
        fresh = sorted(fitting, key=lambda c: -proxy[c])[: cfg.evolution_trials]
        for c in fitting:
            _say(log, f"  candidate: {metric} measured {_fmt(metric, measure(c))}, adaptive-BN val "
                      f"{proxy[c]:.2f}%{' -> trial' if c in fresh else ''}")
        _say(log, f"evolution: {len(raw)} choices predicted, {len(fresh)} new candidate(s) to fine-tune")
        run_batch(fresh, "evolution")
    if not trials:
        raise ConfigError(f"search: no candidate could be built for budget {cfg.budget}; widen the techniques "
                          "or the settings (--techniques channels,rank,bits)")

    winner = first = select_trial(trials, target)
    _say(log, f"winner {winner['id']}: {winner['settings']}")
    backoff: list[dict[str, Any]] = []
    if winner["measured"] <= target and cfg.backoff_measurements:
        relaxed, backoff = back_off(knobs, table, tuple(winner["choice"]), measure, target, predict,
                                    cfg.backoff_measurements)
        for b in backoff:
            _say(log, f"  back-off {b['knob']}: {metric} measured {_fmt(metric, b['measured'])} "
                      f"({'kept' if b['accepted'] else 'over the target'})")
        if relaxed != tuple(winner["choice"]) and relaxed not in {tuple(t["choice"]) for t in trials}:
            # fewer notches is not more accuracy after a fine-tune (on ResNet-20 a back-off from uniform 0.5 ended
            # 1.5 points under it over three seeds): the relaxed model is a trial and must beat the winner's
            _say(log, f"backed off to: {_describe(knobs, relaxed)}")
            run_batch([relaxed], "backoff")
            winner = select_trial(trials, target)
            _say(log, f"after the back-off's trial: {winner['id']} ({winner['source']})")
    finals: list[dict[str, Any]] = []
    pool = pick_finalists(trials, target, cfg.finalists) if winner["measured"] <= target else []
    if len(pool) > 1 and (cfg.finalist_seeds > 1 or cfg.final_epochs != cfg.trial_epochs):
        # one short fine-tune on 287 validation images ranks candidates a point apart at random (ResNet-20: the
        # winner by 0.7 points ended 0.9 under uniform 0.5 over three seeds): the finalists are fine-tuned as the
        # final model will be, with several seeds and validation draws, and ranked by the mean
        seeds = [cfg.seed + k for k in range(cfg.finalist_seeds)]
        _say(log, f"finalists: {', '.join(t['id'] for t in pool)}, each fine-tuned {cfg.final_epochs} epochs with "
                  f"seeds {seeds}")
        reuse = cfg.final_epochs == cfg.trial_epochs  # the trial itself is the run with the search's seed
        jobs = [{"id": f"{t['id']}-s{s}", "seed": s,
                 "stages": choice_stages(knobs, tuple(t["choice"]), finetune_epochs=cfg.final_epochs,
                                         quantize_all=quantize_all, engines=engines)}
                for t in pool for s in seeds if not (reuse and s == cfg.seed)]
        results = {r["id"]: r for r in run_trials(jobs, payload, runner, out / "ray", f"finalists-{len(trials):03d}",
                                                    cfg.ray_address)}
        for t in pool:
            runs = [t if reuse and s == cfg.seed else results[f"{t['id']}-s{s}"] for s in seeds]
            finals.append({"trial": t["id"], "source": t["source"], "measured": t["measured"],
                           "val_accuracies": [r["val_accuracy"] for r in runs],
                           "val_accuracy": round(sum(r["val_accuracy"] for r in runs) / len(runs), 4),
                           "test_accuracy_mean": round(sum(r["test_accuracy"] for r in runs) / len(runs), 4)})
            _say(log, f"  finalist {t['id']} ({t['source']}): mean val {finals[-1]['val_accuracy']:.2f}% "
                      f"({', '.join(f'{v:.2f}' for v in finals[-1]['val_accuracies'])})")
        best = max(range(len(pool)), key=lambda i: (finals[i]["val_accuracy"], -finals[i]["measured"], -i))
        winner = pool[best]
        _say(log, f"finalists: {winner['id']} ({winner['source']}) wins")
    best_choice = tuple(winner["choice"])

    # 4. the recipe, run by the pipeline ----------------------------------------------------------
    recipe_data = {**header, "name": f"search-{cfg.model}",
                   "description": f"found by slimkit search for {metric} <= {_fmt(metric, budget)} "
                                  f"on {cfg.engine}",
                   "baseline": str(baseline_path), "threads": cfg.threads,
                   "stages": choice_stages(knobs, best_choice, finetune_epochs=cfg.final_epochs,
                                           quantize_all=quantize_all, engines=engines)}
    recipe_data = {k: v for k, v in recipe_data.items() if v is not None}
    atomic_write_bytes(out / "recipe.yaml", yaml.safe_dump(recipe_data, sort_keys=False).encode())
    recipe = parse_recipe(recipe_data, str(out / "recipe.yaml"))
    _say(log, f"final: running recipe.yaml ({len(recipe.stages)} stage(s), {cfg.final_epochs} fine-tune epochs)")
    import inspect

    fresh = {"overwrite": True} if "overwrite" in inspect.signature(run_recipe).parameters else {}
    report = run_recipe(recipe, out / "final", progress=False, log=lambda _m: None, **fresh)
    final_model = load_model(out / "final" / "model.pt")
    last = report["stages"][-1]
    chosen_metric = {"size_bytes": float(last["bytes"]), "macs": float(last["macs"]),
                     "energy_mj": float(last.get("energy_uj", 0.0)) * 1e-3}.get(metric)
    verdict: dict[str, Any] = {}
    if chosen_metric is None:
        chosen_metric = meter.measure(final_model)
        verdict = latency_verdict(final_model, meter.reference[0], example, cfg, chosen_metric, budget,
                                  value if relative else None, base_metric)
    chosen = {"accuracy": float(last["accuracy"]), metric: chosen_metric, "engine_accuracy_from": last["engine"],
              "settings": _describe(knobs, best_choice), "trial": winner["id"],
              "meets_budget": verdict.get("meets", chosen_metric <= budget), **verdict.get("fields", {}),
              "winner_settings": first["settings"], "backoff": backoff,
              "backoff_trial": next((t["id"] for t in trials if t["source"] == "backoff"), None),
              "val_accuracy": winner["val_accuracy"], "trial_test_accuracy": winner["test_accuracy"],
              "finalists": finals,
              "measured_before_final": measure(best_choice)}
    if "verdict" in chosen:
        _say(log, f"chosen: {chosen['accuracy']:.2f}% test, {metric} {_fmt(metric, chosen_metric)} "
                  f"({chosen['verdict']}; the absolute reading is "
                  f"{'under' if chosen['meets_budget_absolute'] else 'over'} {_fmt(metric, budget)})")
    else:
        _say(log, f"chosen: {chosen['accuracy']:.2f}% test, {metric} {_fmt(metric, chosen_metric)} "
                  f"({'meets' if chosen['meets_budget'] else 'MISSES'} {_fmt(metric, budget)})")

    # 5. outputs ---------------------------------------------------------------------------------
    points = [{"accuracy": t["test_accuracy"], metric: t["measured"], "id": t["id"], "source": t["source"]}
              for t in trials]
    points += [{"accuracy": base_accuracy, metric: base_metric, "id": "baseline", "source": "baseline"},
               {"accuracy": chosen["accuracy"], metric: chosen_metric, "id": "chosen", "source": "final"}]
    result: dict[str, Any] = {
        "budget": {"metric": metric, "value": budget, "given": cfg.budget, "relative_to_baseline": relative},
        "baseline": {"accuracy": base_accuracy, metric: base_metric},
        "chosen": chosen,
        "pareto": pareto_front(points, metric),
        "points": points,
        "trials": trials,
        "knobs": [{"id": k.id, "settings": list(k.settings), "method": k.method} for k in knobs],
        "skipped_techniques": skipped,
        "sensitivity": sensitivity_rows(knobs, table),
        "engine": cfg.engine, "runner": runner, "seed": cfg.seed, "round_to": round_to,
        "config": cfg.to_dict(),
        "recipe": str(out / "recipe.yaml"),
        "final_report": str(out / "final" / "report.json"),
        "predictions": len(raw), "measurements": len(measured),
    }
    if metric == "latency_p99_ms":
        from slimkit.search.latency import predictor_error

        # every candidate measured end to end, with what was predicted for it before its measurement
        held_out = [{"predicted": m["predicted"], "measured": m["measured"], "settings": _describe(knobs, c)}
                    for c, m in measured.items() if c != identity]
        additive = [{**p, "predicted": m["predicted_additive"]} for p, (c, m) in
                    zip(held_out, ((c, m) for c, m in measured.items() if c != identity), strict=True)]
        result["latency_predictor"] = {**predictor_info, **predictor_error(held_out),
                                       "additive": {k: v for k, v in predictor_error(additive).items() if k != "pairs"},
                                       "slope": meter.predictor.slope, "offset_ms": meter.predictor.offset,
                                       "table_entries": len(meter.predictor.table.entries),
                                       **meter.predictor.feature_errors()}
        result["latency_table"] = meter.predictor.table.rows()
    result["realtime"] = _realtime(baseline, final_model, example, cfg, budget if metric == "latency_p99_ms" else None)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    atomic_write_bytes(out / "search.json", json.dumps(result, indent=1, default=str).encode())
    plot_pareto(result, out / "pareto.png", f"{cfg.model} on {cfg.data}")
    atomic_write_bytes(out / "search.md", render_search_markdown(result).encode())
    from slimkit.report.html import write_search_html

    write_search_html(out, result)
    return result


def meets_latency_budget(p99_ms: float, budget_ms: float, paired_ratio: float | None = None,
                         factor: float | None = None) -> bool:
    """Whether a measured p99 meets a latency budget: for a relative budget (``factor`` of the baseline's p99) by
    the paired ratio against the baseline, timed in alternation (``paired_ratio <= factor``), else ``p99_ms <=
    budget_ms``.

    The absolute reading decides only an absolute budget: on this machine a batch-1 p99 of
    MobileNetV2 repeated to about 30 % between minutes, so a model and a baseline timed
    minutes apart can land either side of ``0.5x`` whatever the models are; timed block
    against block they see the same load.
    """
    if factor is not None and paired_ratio is not None:
        return paired_ratio <= factor
    return p99_ms <= budget_ms


def latency_verdict(final: torch.nn.Module, reference: torch.nn.Module, example: torch.Tensor, cfg: SearchConfig,
                    p99_ms: float, budget_ms: float, factor: float | None, base_p99_ms: float) -> dict[str, Any]:
    """The chosen model's latency verdict: ``{"meets": bool, "fields": ...}`` for ``search.json``'s ``chosen``.

    ``fields``: ``p99_over_baseline_paired`` (:func:`slimkit.search.latency.paired_p99_ratio`
    over ``cfg.verdict_blocks`` alternating blocks against ``reference``, the baseline as
    measured), ``latency_p99_ms_paired`` (that ratio times the baseline's p99),
    ``meets_budget_absolute`` (``p99_ms <= budget_ms``) and ``verdict`` (how it was judged).
    """
    from slimkit.search.latency import paired_p99_ratio

    ratio = paired_p99_ratio(final, reference, example, cfg.engine, cfg.threads, blocks=cfg.verdict_blocks)
    meets = meets_latency_budget(p99_ms, budget_ms, ratio, factor)
    how = (f"paired p99 ratio {ratio:.3f} against the baseline <= {factor:g}" if factor is not None
           else f"p99 {p99_ms:.4f} ms <= {budget_ms:.4f} ms")
    return {"meets": meets, "fields": {"p99_over_baseline_paired": ratio, "latency_p99_ms_paired": ratio * base_p99_ms,
                                       "meets_budget_absolute": p99_ms <= budget_ms,
                                       "verdict": ("meets: " if meets else "misses: ") + how}}


def _realtime(baseline: torch.nn.Module, final: torch.nn.Module, example: torch.Tensor, cfg: SearchConfig,
              deadline: float | None) -> dict[str, Any]:
    """The real-time view of the baseline and the chosen model on the search's engine (batch 1)."""
    from slimkit.measure.realtime import realtime_profile
    from slimkit.quantize.fake import quant_layers

    views = {}
    for name, model in (("baseline", baseline), ("chosen", final)):
        engine = cfg.engine
        if engine == "onnxruntime-int8" and not quant_layers(model):
            engine = "onnxruntime"  # the float baseline runs in the same engine's fp32 path
        elif engine == "onnxruntime" and quant_layers(model):
            engine = "onnxruntime-int8"
        try:
            views[name] = realtime_profile(model, example, engine, runs=300, deadline_ms=deadline,
                                           threads=cfg.threads).to_dict()
        except Exception as err:  # a model ONNX cannot export: say so, the rest of the report stands
            views[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return views


def _structural(baseline: torch.nn.Module, knobs: list[Knob], choice: Choice, header: dict, example: torch.Tensor,
                data: Any, out: Path, quantize_all: bool) -> torch.nn.Module:
    """The candidate's model without fine-tuning (its shapes, sizes and costs are the trained one's)."""
    from slimkit.recipe import parse_recipe

    stages = choice_stages(knobs, choice, quantize_all=quantize_all)
    recipe = parse_recipe({**header, "stages": stages}, "search candidate")
    from types import SimpleNamespace

    view = SimpleNamespace(train=[(torch.stack(data_calibration(data)),)], test=data.test)
    return apply_stages(copy.deepcopy(baseline), recipe, example, view, out / "tmp")


def data_calibration(data: Any, count: int = 8) -> list[torch.Tensor]:
    """The first ``count`` training images (calibration of candidates' activation grids)."""
    return [data.train[i][0] for i in range(min(count, len(data.train)))]


def _describe(knobs: list[Knob], choice: Choice) -> dict[str, str]:
    return {k.id: k.label(i) for k, i in zip(knobs, choice, strict=True) if i}


def plot_pareto(result: dict[str, Any], path: Path, title: str) -> None:
    """Accuracy against the budget metric: every trial, the Pareto front, the baseline, the chosen model, the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimkit.atomic import atomic_open

    metric = result["budget"]["metric"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    pts = [p for p in result["points"] if p["source"] in ("uniform", "greedy", "evolution", "backoff")]
    ax.scatter([p[metric] for p in pts], [p["accuracy"] for p in pts], s=18, color="tab:gray", label="trials")
    front = [p for p in result["pareto"] if p["source"] != "final"]
    ax.plot([p[metric] for p in front], [p["accuracy"] for p in front], "-", color="tab:blue", label="Pareto front")
    base, chosen = result["baseline"], result["chosen"]
    ax.scatter([base[metric]], [base["accuracy"]], marker="s", color="black", label="baseline", zorder=3)
    ax.scatter([chosen[metric]], [chosen["accuracy"]], marker="*", s=120, color="tab:red", label="chosen (final)",
               zorder=3)
    ax.axvline(result["budget"]["value"], color="tab:red", ls="--", lw=1, label="budget")
    if metric == "size_bytes":
        ax.set_xscale("log")
    ax.set_xlabel(metric)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}: accuracy vs {metric}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path) as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def render_search_markdown(result: dict[str, Any]) -> str:
    """search.md: budget, baseline vs chosen, the Pareto table, the trials and the predictor error."""
    metric = result["budget"]["metric"]
    base, chosen = result["baseline"], result["chosen"]
    lines = [f"# slimkit search: {metric} <= {_fmt(metric, result['budget']['value'])}", "",
             f"Engine `{result['engine']}`, trials via `{result['runner']}`, seed {result['seed']}.", "",
             f"| model | accuracy % | {metric} |", "|---|---:|---:|",
             f"| baseline | {base['accuracy']:.2f} | {_fmt(metric, base[metric])} |",
             f"| chosen | {chosen['accuracy']:.2f} | {_fmt(metric, chosen[metric])} |", "",
             f"Chosen settings: {', '.join(f'{k} {v}' for k, v in chosen['settings'].items()) or 'none'} "
             f"({'meets' if chosen['meets_budget'] else 'misses'} the budget"
             + (f"; {chosen['verdict']}, absolute {_fmt(metric, chosen[metric])}" if "verdict" in chosen else "")
             + ").", "",
             "## Pareto front", "", f"| point | source | accuracy % | {metric} |", "|---|---|---:|---:|"]
    lines += [f"| {p['id']} | {p['source']} | {p['accuracy']:.2f} | {_fmt(metric, p[metric])} |"
              for p in result["pareto"]]
    if chosen.get("finalists"):
        lines += ["", "## Finalists", "", "Fine-tuned as the final model is, once per seed (each its own validation "
                  "draw); the highest mean validation accuracy is chosen.", "",
                  f"| trial | source | {metric} | mean val % | val % per seed |", "|---|---|---:|---:|---|"]
        lines += [f"| {f['trial']} | {f['source']} | {_fmt(metric, f['measured'])} | {f['val_accuracy']:.2f} | "
                  f"{', '.join(f'{v:.2f}' for v in f['val_accuracies'])} |" for f in chosen["finalists"]]
    lines += ["", "![pareto](pareto.png)", "", "## Trials", "",
              "| trial | source | val % | test % | measured | predicted | settings |",
              "|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {t['id']} | {t['source']} | {t['val_accuracy']:.2f} | {t['test_accuracy']:.2f} | "
              f"{_fmt(metric, t['measured'])} | {_fmt(metric, t['predicted'])} | "
              f"{', '.join(f'{k} {v}' for k, v in t['settings'].items())} |" for t in result["trials"]]
    if "latency_predictor" in result:
        lp = result["latency_predictor"]
        lines += ["", f"Latency predictor ({lp['table_entries']} table entries): mean error "
                      f"{lp.get('mean_abs_error_pct', math.nan)} %, max {lp.get('max_abs_error_pct', math.nan)} % "
                      f"over {lp['points']} trial models measured end to end."]
    lines += ["", "## Per-layer sensitivity", "", "![sensitivity](sensitivity.png)", "",
              "| knob | setting | drop (points) | KL (nats) |", "|---|---|---:|---:|"]
    lines += [f"| {r['knob']} | {r['setting']} | {r['drop']:.2f} | {r['kl']:.3g} |" for r in result["sensitivity"]]
    return "\n".join(lines) + "\n"
