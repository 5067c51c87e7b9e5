"""Candidate evaluations (trials): a short fine-tune of one choice and its accuracy, run as Ray Tune
trials when Ray is installed, in-process and sequentially otherwise, with the same results.

A trial builds the candidate from the baseline (:func:`slimkit.search.space.apply_stages`),
fine-tunes it for the epochs its stages say on the search's training part with one torch thread and
a fixed seed (the job's ``seed`` when it has one: it also draws the validation part, so the finalists'
repeats see other validation images), quantizes it where the choice says so, and returns its accuracy on the
held-out validation part (what the search selects on) and on the test split. Every trial
is a pure function of its job and the shared payload, so Ray Tune's parallel trials and the
sequential loop return the same numbers (tested). Metrics (size, MACs, energy, latency)
are measured by the driver, not in the trials: timing inside parallel trials would measure
the contention between them.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch


def _split(train, val_fraction: float, seed: int):
    from torch.utils.data import Subset

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(round(len(train) * (1 - val_fraction)))
    return Subset(train, order[:cut]), Subset(train, order[cut:])


def load_split(payload: dict[str, Any], seed: int | None = None):
    """(data bundle, train part, validation part) of the payload's data spec; ``seed`` draws the validation part
    (default: the payload's seed). The data's own train/test split is always the spec's."""
    from slimkit.data import load_data

    spec = payload["data"]
    data = load_data(spec["name"], data_dir=spec["data_dir"], seed=spec["seed"], image_size=spec.get("image_size"))
    train, val = _split(data.train, payload["val_fraction"], payload["seed"] if seed is None else seed)
    if payload.get("trial_samples"):
        from torch.utils.data import Subset

        train = Subset(train.dataset, train.indices[: payload["trial_samples"]])
    return data, train, val


def evaluate_trial(job: dict[str, Any], payload: dict[str, Any], split=None) -> dict[str, Any]:
    """Accuracy of one candidate after its short fine-tune: ``{"id", "val_accuracy", "test_accuracy"}``."""
    from types import SimpleNamespace

    from slimkit.global_state import num_threads
    from slimkit.recipe import parse_recipe
    from slimkit.search.space import apply_stages
    from slimkit.train import TrainConfig, evaluate, fit, seed_everything

    seed = int(job.get("seed", payload["seed"]))
    with num_threads(1):
        data, train, val = split or load_split(payload, seed)
        recipe = parse_recipe({**payload["header"], "stages": job["stages"]}, "search trial")
        seed_everything(seed)
        train_cfg = TrainConfig.coerce({**payload["train"], "seed": seed})

        def finetune(model, epochs):
            fit(model, train, train_cfg.model_copy(update={"epochs": epochs}), progress=False, desc="trial")

        view = SimpleNamespace(train=train, test=data.test)
        with tempfile.TemporaryDirectory() as tmp:
            model = apply_stages(copy.deepcopy(payload["baseline"]), recipe, payload["example"], view, Path(tmp),
                                 finetune=finetune)
        return {"id": job["id"], "val_accuracy": round(evaluate(model, val), 4),
                "test_accuracy": round(evaluate(model, data.test), 4)}


def _tune_trial(config: dict[str, Any], payload: dict[str, Any]) -> None:
    from ray import tune

    tune.report(evaluate_trial(config["job"], payload))


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError:
        return False
    return True


def run_trials(jobs: list[dict[str, Any]], payload: dict[str, Any], runner: str, storage: Path, name: str,
               ray_address: str | None = None) -> list[dict[str, Any]]:
    """Results of ``jobs`` in job order, through Ray Tune (``runner="ray"``) or in this process."""
    if not jobs:
        return []
    if runner == "sequential":
        splits: dict[int, Any] = {}
        results = []
        for job in jobs:
            seed = int(job.get("seed", payload["seed"]))
            if seed not in splits:
                splits[seed] = load_split(payload, seed)
            results.append(evaluate_trial(job, payload, splits[seed]))
        return results
    import ray
    from ray import tune

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
                 **({} if ray_address else {"num_cpus": max(1, min(2, len(jobs)))}))
    trainable = tune.with_resources(tune.with_parameters(_tune_trial, payload=payload), {"cpu": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={"job": tune.grid_search(jobs)},
        run_config=tune.RunConfig(storage_path=str(Path(storage).resolve()), name=name, verbose=0),
    )
    grid = tuner.fit()
    by_id: dict[str, dict[str, Any]] = {}
    for result in grid:
        if result.error is not None:
            from slimkit.exceptions import SlimkitError

            raise SlimkitError(f"search trial failed under Ray Tune: {result.error}")
        by_id[result.metrics["id"]] = {k: result.metrics[k] for k in ("id", "val_accuracy", "test_accuracy")}
    return [by_id[job["id"]] for job in jobs]
