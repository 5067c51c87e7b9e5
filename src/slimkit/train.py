"""Fit, evaluate and fine-tune, the same code on one process or under torchrun (DDP).

The loop is deliberately plain: SGD or Adam, a cosine or step schedule, label smoothing,
and four extension points gathered in :class:`TrainHooks` (a replacement task loss, extra
penalty terms, gradient hooks, and callbacks after each optimizer step) so that pruning,
weight sharing and distillation plug in without touching it.

A checkpoint is written atomically after every epoch; ``resume=True`` continues from the
last one and reaches the same weights as an uninterrupted run (the data order of each
epoch is a function of ``seed`` and the epoch, and RNG states are restored).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset

from slimkit import distributed as dist
from slimkit.config import Config
from slimkit.exceptions import ConfigError, CorruptFileError
from slimkit.manifest import atomic_save


class TrainConfig(Config):
    """Optimisation settings. YAML's ``1e-4`` (read as a string) is accepted as a float."""

    epochs: int = Field(10, ge=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    step_size: int = Field(30, ge=1, description="epochs between decays (schedule=step)")
    gamma: float = Field(0.1, gt=0, le=1, description="decay factor (schedule=step)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(64, ge=1, description="per process")
    seed: int = 0


@dataclass(frozen=True)
class StepInfo:
    """Where training is when a hook runs: optimizer step counts from 1."""

    step: int
    total_steps: int
    epoch: int
    epochs: int


@dataclass(frozen=True)
class TrainHooks:
    """Extension points of the loop; every field is optional.

    - ``loss(outputs, targets, inputs) -> Tensor`` replaces the cross-entropy task loss
      (distillation); the model being trained is the one passed to :func:`fit`.
    - ``penalties``: ``(model) -> Tensor`` terms added to the loss (L1 on BN gamma, ...).
    - ``grad_hooks``: ``(model) -> None`` after backward, before the optimizer step
      (centroid gradient sharing, zeroing masked gradients).
    - ``after_step``: ``(model, StepInfo) -> None`` after each optimizer step (re-apply
      masks, schedule sparsity).
    - ``modules``: extra modules trained alongside (hint regressors); checkpointed too.
    """

    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    penalties: Sequence[Callable[[nn.Module], torch.Tensor]] = ()
    grad_hooks: Sequence[Callable[[nn.Module], None]] = ()
    after_step: Sequence[Callable[[nn.Module, StepInfo], None]] = ()
    modules: Sequence[nn.Module] = field(default_factory=tuple)

    def merge(self, other: TrainHooks | None) -> TrainHooks:
        """Both sets of hooks, each hook once; ``other.loss`` wins when both replace the loss.

        A hook (the same function or object) present in both runs once, at its first
        place: masks kept by the runner and returned again by a stage (prune, then share)
        are applied once per step, and a penalty is not added twice.
        """
        if other is None:
            return self
        return TrainHooks(
            loss=other.loss or self.loss,
            penalties=_once(self.penalties, other.penalties),
            grad_hooks=_once(self.grad_hooks, other.grad_hooks),
            after_step=_once(self.after_step, other.after_step),
            modules=_once(self.modules, other.modules),
        )


def _once(first: Sequence, second: Sequence) -> tuple:
    """``first`` then ``second`` without repeats (by identity), in order of first appearance."""
    seen: set[int] = set()
    out = []
    for item in (*first, *second):
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return tuple(out)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Learning-rate multiplier for a (0-based) epoch."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
    if cfg.schedule == "step":
        return cfg.gamma ** (epoch // cfg.step_size)
    return 1.0


def _shard(dataset: Dataset) -> Dataset:
    """This rank's share of a dataset: every world_size-th sample, no padding."""
    if dist.world_size() == 1:
        return dataset
    return Subset(dataset, list(range(dist.rank(), len(dataset), dist.world_size())))


def _epoch_loader(dataset: Dataset, cfg: TrainConfig, epoch: int) -> DataLoader:
    """Shuffled loader whose order depends only on (seed, epoch), split over ranks."""
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    world, rank = dist.world_size(), dist.rank()
    per_rank = len(order) // world
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    return DataLoader(Subset(dataset, mine), batch_size=cfg.batch_size, shuffle=False)


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a device; None: :func:`slimkit.distributed.default_device`.

    ``cuda`` under torchrun is each rank's own GPU. ConfigError when the device is not there.
    """
    if spec is None:
        return dist.default_device()
    text = str(spec).strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise ConfigError(f"--device {spec!r}: must be cpu, cuda or cuda:N (e.g. cuda:0)")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {text}: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                          "use --device cpu")
    if text == "cuda":
        return dist.default_device() if dist.default_device().type == "cuda" else torch.device("cuda", 0)
    index = int(text.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {text}: there are {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


class LineProgress:
    """Progress for a log file or CI: one plain line at most every ``interval`` seconds, and one at the end.

    A terminal gets a live tqdm bar instead (:func:`_progress`); redrawing a bar into a file
    writes every step (one ``\\r`` frame per ``set_postfix``), which floods the log.
    """

    def __init__(self, total: int, desc: str, interval: float = 10.0, stream=None) -> None:
        import sys

        self.total, self.desc, self.interval = total, desc, interval
        self.stream = stream or sys.stderr
        self.n = 0
        self.postfix: dict[str, str] = {}
        self.started = self.last = time.monotonic()

    def update(self, steps: int = 1) -> None:
        self.n += steps
        if self.n < self.total and time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, refresh: bool = False, **values: str) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def _line(self) -> None:
        self.last = time.monotonic()
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: step {self.n}/{self.total}{extra}, {self.last - self.started:.0f} s",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.n > 0:
            self._line()


class _NoProgress:
    def update(self, steps: int = 1) -> None:
        pass

    def set_postfix(self, refresh: bool = False, **values: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    """A live bar on a terminal, :class:`LineProgress` elsewhere, nothing when disabled or not rank 0."""
    import sys

    if not (enabled and dist.is_main()):
        return _NoProgress()
    if not sys.stderr.isatty():
        return LineProgress(total, desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, mininterval=0.1)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def fit(
    model: nn.Module,
    train_data: Dataset,
    cfg: TrainConfig | dict | None = None,
    hooks: TrainHooks | None = None,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
    device: torch.device | None = None,
) -> nn.Module:
    """Train ``model`` on ``train_data`` for ``cfg.epochs`` epochs; returns the same model.

    ``checkpoint`` is a file path rewritten atomically after every epoch; with
    ``resume=True`` an existing checkpoint is loaded and training continues from the
    epoch after it. Under torchrun the model is wrapped in DDP for the duration of the
    call (gradients all-reduced) and only rank 0 writes the checkpoint.
    """
    cfg = TrainConfig.coerce(cfg)
    hooks = hooks or TrainHooks()
    device = device or dist.default_device()
    model.to(device)
    for extra in hooks.modules:
        extra.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for m in hooks.modules for p in m.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)
    start_epoch = 0
    seed_everything(cfg.seed)
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        start_epoch = _load_checkpoint(Path(checkpoint), model, optimizer, hooks)
    if cfg.epochs == 0 or start_epoch >= cfg.epochs:
        return model

    runner = model
    if dist.is_distributed():
        device_ids = [device.index] if device.type == "cuda" else None
        runner = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=True)

    steps_per_epoch = len(_epoch_loader(train_data, cfg, 0))
    total_steps = steps_per_epoch * cfg.epochs
    bar = _progress(total_steps, desc, progress)
    if start_epoch:
        bar.update(steps_per_epoch * start_epoch)
    task_loss = hooks.loss or (lambda out, y, x: F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing))
    try:
        for epoch in range(start_epoch, cfg.epochs):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg, epoch)
            runner.train()
            for extra in hooks.modules:
                extra.train()
            for batch_index, (inputs, targets) in enumerate(_epoch_loader(train_data, cfg, epoch)):
                inputs, targets = inputs.to(device), targets.to(device)
                outputs = runner(inputs)
                loss = task_loss(outputs, targets, inputs)
                for penalty in hooks.penalties:
                    loss = loss + penalty(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for grad_hook in hooks.grad_hooks:
                    grad_hook(model)
                optimizer.step()
                info = StepInfo(epoch * steps_per_epoch + batch_index + 1, total_steps, epoch, cfg.epochs)
                for callback in hooks.after_step:
                    callback(model, info)
                bar.update(1)
                bar.set_postfix(refresh=False, epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss.item():.3f}")
            if checkpoint is not None and dist.is_main():
                _save_checkpoint(Path(checkpoint), model, optimizer, hooks, epoch)
            dist.barrier()
    finally:
        bar.close()
    model.eval()
    return model


def _save_checkpoint(path: Path, model: nn.Module, optimizer, hooks: TrainHooks, epoch: int) -> None:
    atomic_save(
        {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "hook_modules": [m.state_dict() for m in hooks.modules],
            "rng": _rng_state(),
        },
        path,
    )


def _load_checkpoint(path: Path, model: nn.Module, optimizer, hooks: TrainHooks) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for module, module_state in zip(hooks.modules, state["hook_modules"]):
            module.load_state_dict(module_state)
        _set_rng_state(state["rng"])
    except (KeyError, RuntimeError, EOFError, OSError) as err:
        raise CorruptFileError(
            f"checkpoint {path} cannot be resumed ({type(err).__name__}); delete it to start this phase over"
        ) from None
    return int(state["epoch"]) + 1


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: torch.device | None = None):
    """(logits [N, classes], labels [N]) of this rank's shard, in order."""
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for inputs, targets in DataLoader(_shard(dataset), batch_size=batch_size, shuffle=False):
        logits.append(model(inputs.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets))
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent over the whole dataset (reduced over ranks under DDP)."""
    logits, labels = predict(model, dataset, batch_size)
    correct, total = dist.all_reduce_sum([float((logits.argmax(1) == labels).sum()), float(len(labels))])
    return 100.0 * correct / max(total, 1.0)
