"""Run a recipe: train (or load) the baseline, apply each stage, fine-tune, measure.

Everything a run produces goes under its run directory (``runs/<name>/``):

- ``report.json`` / ``report.md`` / ``accuracy_vs_size.png``: rewritten after every stage;
- ``models/NN-<stage>.pt``: each stage's model (:func:`slimkit.manifest.save_model`);
- ``model.pt``: the final model; beside it the final deployables as the recipe produces them
  (``model.onnx``, ``model.int8.onnx``, ``model.slim``) and, in ``report.json``
  ``deployables.ship``, the one to ship (:mod:`slimkit.deploy.run`); stage artifacts stay
  in ``stages/NN/``;
- ``checkpoints/``: per-epoch training checkpoints;
- ``recipe.yaml``: the recipe as run (after flags and ``--set``), ``run.log``: what the run said.

With ``resume=True`` finished stages are loaded from ``models/`` and an interrupted
training phase continues from its last checkpoint, so the run ends where an
uninterrupted one would. Only rank 0 writes; every rank computes.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit import distributed as dist
from slimkit.finetune import distill_hooks, trainer
from slimkit.manifest import check_data_fits, data_spec, load_model, save_model, set_data_spec
from slimkit.prune.masks import mask_hooks
from slimkit.recipe import Recipe, Stage
from slimkit.stages import STAGES, Phase, StageContext, StageOutput
from slimkit.train import TrainConfig, TrainHooks, evaluate, fit, seed_everything

Log = Callable[[str], None]


@dataclass
class RunPaths:
    """Where a run keeps its files under ``root`` (see the module docstring)."""

    root: Path

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    def stage_model(self, index: int, name: str) -> Path:
        return self.root / "models" / f"{index:02d}-{name}.pt"

    def checkpoint(self, label: str) -> Path:
        return self.root / "checkpoints" / f"{label}.pt"


def _measure(model: nn.Module, example_inputs: torch.Tensor, runs: int, threads: int) -> Any:
    from slimkit.measure import profile

    model.cpu()  # measured where it deploys: a model trained on a GPU comes back to the CPU
    return profile(model, example_inputs, latency=True, runs=runs, threads=threads)


def _row(name: str, kind: str, accuracy: float, prof: Any, output: StageOutput | None, baseline_bytes: int) -> dict:
    stored = output.stored_bytes if output and output.stored_bytes is not None else prof.bytes
    latency = output.latency_ms if output and output.latency_ms is not None else prof.latency_ms
    return {
        "name": name,
        "kind": kind,
        "accuracy": round(float(accuracy), 4),
        "params": int(prof.params),
        "nonzeros": int(prof.nonzeros),
        "macs": int(prof.macs),
        "bytes": int(stored),
        "peak_activation_bytes": int(prof.peak_activation_bytes),
        "bytes_counted": _bytes_counted(output),
        "latency_ms": round(float(latency), 4),
        "latency_p99_ms": round(float(prof.latency_p99_ms), 4),
        **_energy_cells(prof, int(stored)),
        "engine": (output.engine if output and output.engine else "pytorch-eager"),
        "phase": output.phase if output else "materialized",
        "ratio": round(baseline_bytes / max(int(stored), 1), 3),
        "details": output.details if output else {},
        "artifacts": output.artifacts if output else {},
    }


def _energy_cells(prof: Any, stored: int) -> dict:
    """``energy_uj`` (45 nm estimate of one batch-1 forward, the stored bytes as weight traffic) and its breakdown."""
    if getattr(prof, "energy", None) is None:
        return {}
    from slimkit.measure.energy import with_weight_bytes

    energy = with_weight_bytes(prof.energy, stored)
    return {"energy_uj": round(energy.total_uj, 4), "energy": energy.to_dict()}


def _bytes_counted(output: StageOutput | None) -> str:
    if output is None or output.stored_bytes is None:
        return "fp32 state dict (masks excluded)"
    return str(output.details.get("bytes_counted", "stored artifact"))


def run_recipe(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
               progress: bool = True, log: Log = print, device: str | torch.device | None = None) -> dict[str, Any]:
    """Run every stage of ``recipe`` into ``out_dir``; returns the report (also written there).

    A new run refuses a non-empty ``out_dir`` unless ``overwrite`` (which clears the old
    run); ``resume`` refuses a recipe that differs from the recorded one
    (:mod:`slimkit.rundir`). ``device`` (``cpu``, ``cuda``, ``cuda:N``; None: the GPU when
    there is one) is where training runs; every measurement runs on the CPU with
    ``recipe.latency_threads`` threads. What the run says also goes to ``run.log``.
    ``recipe.threads`` (when set) is torch's thread count during the run; the caller's
    count is restored when it returns or raises.
    """
    from slimkit.global_state import num_threads

    with num_threads(recipe.threads):
        return _run_recipe(recipe, out_dir, resume=resume, overwrite=overwrite, progress=progress, log=log,
                           device=device)


def _run_recipe(recipe: Recipe, out_dir: str | Path, *, resume: bool, overwrite: bool, progress: bool, log: Log,
                device: str | torch.device | None) -> dict[str, Any]:
    from slimkit import rundir
    from slimkit.data import load_data
    from slimkit.models import arch_of, create_model
    from slimkit.models.weights import load_weights
    from slimkit.report import write_report
    from slimkit.train import resolve_device

    paths = RunPaths(Path(out_dir))
    device = resolve_device(device)
    rundir.check(paths.root, recipe.to_dict(), resume=resume, overwrite=overwrite)
    seed_everything(recipe.train.seed)
    data = load_data(recipe.data, data_dir=recipe.data_dir, download=recipe.download, seed=recipe.train.seed,
                     image_size=recipe.image_size, augment=recipe.augment)
    example_inputs = torch.zeros(1, *data.input_shape)
    dist.barrier()  # every rank has looked (and found its data) before rank 0 writes
    if dist.is_main():
        rundir.prepare(paths.root, recipe.to_dict(), recipe.overrides, overwrite=overwrite)
        run_log = rundir.RunLog(paths.root)
        run_log(f"slimkit {'resume' if resume else 'run'}: recipe {recipe.name} ({recipe.source or 'python'}), "
                f"training on {device}, timing on {recipe.latency_threads} thread(s)")

        def say(message: str) -> None:
            log(message)
            run_log(message)
    else:
        def say(message: str) -> None:
            pass
    dist.barrier()
    report: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "source": recipe.source,
        "model": recipe.model,
        "data": recipe.data,
        "example_input_shape": list(example_inputs.shape),
        "threads": torch.get_num_threads(),
        "latency_threads": recipe.latency_threads,
        "device": str(device),
        "overrides": recipe.overrides,
        "world_size": dist.world_size(),
        "stages": [],
    }
    previous = _previous_rows(paths) if resume else []

    started = time.perf_counter()
    baseline_path = paths.stage_model(0, "baseline")
    if resume and baseline_path.is_file() and previous:
        model = load_model(baseline_path)
        say(f"[0] baseline: loaded from {baseline_path}")
    elif recipe.baseline:
        model = load_model(recipe.baseline)
        check_data_fits(model, data, f"baseline {recipe.baseline}")
        say(f"[0] baseline: {(arch_of(model) or {}).get('name', type(model).__name__)} loaded from {recipe.baseline}")
    else:
        model = create_model(recipe.model, num_classes=data.num_classes, in_channels=data.in_channels,
                             **recipe.model_args)
        check_data_fits(model, data, f"model {recipe.model}")
        if recipe.weights:
            load_weights(model, recipe.weights, recipe.model)
            say(f"[0] baseline: {recipe.model} with the weights of {recipe.weights} (not trained)")
        else:
            say(f"[0] baseline: training {recipe.model} on {recipe.data} for {recipe.train.epochs} epochs")
            fit(model, data.train, recipe.train, checkpoint=paths.checkpoint("baseline"), resume=resume,
                progress=progress, desc="baseline", device=device)
            model.cpu()
    # every model the run saves records its source (the loaded file's wins over recipe.model) and its data
    report["model"] = (arch_of(model) or {}).get("name", recipe.model)
    spec = data_spec(data, recipe.data_dir, recipe.image_size)
    set_data_spec(model, spec)
    model.eval()
    baseline = copy.deepcopy(model)
    if dist.is_main():
        save_model(model, baseline_path)
    baseline_prof = _measure(model, example_inputs, recipe.latency_runs, recipe.latency_threads)
    baseline_row = _row("baseline", "train", evaluate(model, data.test), baseline_prof, None, baseline_prof.bytes)
    report["baseline_bytes"] = baseline_prof.bytes
    report["stages"].append(baseline_row)
    _publish(paths, report, write_report)

    # The runner owns the hooks every fine-tune uses: masks always, plus what earlier stages
    # asked to keep (``persistent_hooks``: e.g. centroid sharing stays in force in a later
    # distillation). TrainHooks.merge keeps each hook once, so a stage returning the masks
    # again (prune, then share) does not make them run twice per step.
    kept = mask_hooks()
    phase: Phase = "materialized"  # of the model the next stage receives
    for index, stage in enumerate(recipe.stages, start=1):
        stage_path = paths.stage_model(index, stage.name)
        if resume and stage_path.is_file() and len(previous) > index:
            model = load_model(stage_path)
            report["stages"].append(previous[index])
            phase = previous[index].get("phase", phase)
            restore = STAGES.get(stage.kind).resume_hooks
            restored = restore(model) if restore is not None else None
            kept = kept.merge(restored)
            say(f"[{index}] {stage.name}: done in an earlier run, loaded")
            continue
        say(f"[{index}] {stage.name}: {stage.kind}")
        ctx = stage_context(recipe, data, example_inputs, paths, baseline, index, stage, progress=progress,
                            resume=resume, kept=kept, device=device, phase=phase)
        output = STAGES.get(stage.kind).apply(model, stage.config, ctx)
        model = output.model
        if output.persistent_hooks:
            kept = kept.merge(output.hooks)
        if stage.finetune is not None and (stage.finetune.epochs or recipe.train.epochs):
            hooks = kept.merge(output.hooks).merge(distill_hooks(stage.finetune, model, ctx))
            fit(model, data.train, stage.finetune.train_config(recipe.train), hooks,
                checkpoint=paths.checkpoint(f"stage-{index:02d}"), resume=resume, progress=progress,
                desc=f"{stage.name} fine-tune", device=device)
            model.cpu()
        if output.finalize is not None:
            output = output.finalize(model)
            model = output.model
        set_data_spec(model, spec)  # a stage's new model (a distilled student) is trained on the same data
        model.eval()
        accuracy = output.accuracy if output.accuracy is not None else evaluate(model, data.test)
        prof = _measure(model, example_inputs, recipe.latency_runs, recipe.latency_threads)
        report["stages"].append(_row(stage.name, stage.kind, accuracy, prof, output, baseline_prof.bytes))
        phase = output.phase
        if dist.is_main():
            save_model(model, stage_path)
        _publish(paths, report, write_report)

    if dist.is_main():
        from slimkit.deploy.run import publish_deployables

        save_model(model, paths.root / "model.pt")
        # model.onnx / model.int8.onnx / model.slim beside model.pt, and the one file to ship
        report["deployables"] = publish_deployables(paths.root, model, report["stages"][-1], example_inputs,
                                                    report.get("baseline_bytes")).to_dict()
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    report["final_model"] = str(paths.root / "model.pt")
    _publish(paths, report, write_report, figures=True)
    return report


def stage_context(recipe: Recipe, data: Any, example_inputs: torch.Tensor, paths: RunPaths, baseline: nn.Module,
                  index: int, stage: Stage, *, progress: bool, resume: bool, kept: TrainHooks,
                  device: torch.device | None = None, phase: Phase = "materialized") -> StageContext:
    """The context of stage ``index`` in a run: its training config, a real fine-tune and evaluation.

    ``ctx.finetune`` trains on ``data.train`` with the stage's config (``finetune:`` over
    the recipe's ``train``), ``kept`` hooks in force, checkpointing each call under
    ``checkpoints/stage-NN-round-MM.pt``; ``ctx.evaluate`` is top-1 on ``data.test``.
    ``phase`` is the phase of the model the stage receives.
    """
    base_cfg: TrainConfig = stage.finetune.train_config(recipe.train) if stage.finetune else recipe.train
    stem = paths.checkpoint(f"stage-{index:02d}").with_suffix("")  # call n: stage-NN-round-0n.pt
    finetune = trainer(data.train, base_cfg, kept, checkpoint_stem=stem, resume=resume, progress=progress,
                       desc=stage.name, device=device)
    return StageContext(
        example_inputs=example_inputs, data=data, train_config=base_cfg, run_dir=paths.root, baseline=baseline,
        stage_index=index, finetune=finetune, evaluate=lambda m: evaluate(m, data.test), phase=phase,
    )


def _previous_rows(paths: RunPaths) -> list[dict[str, Any]]:
    if not paths.report_json.is_file():
        return []
    try:
        return list(json.loads(paths.report_json.read_text()).get("stages", []))
    except (json.JSONDecodeError, OSError):
        return []


def _publish(paths: RunPaths, report: dict[str, Any], write_report: Callable[..., None], *,
             figures: bool = False) -> None:
    if dist.is_main():
        write_report(paths.root, report, figures=figures)
