"""Runners: one model executed by one engine, behind one small interface.

A runner maps a float input batch ``[N, C, H, W]`` to logits ``[N, classes]`` (CPU tensors),
predicts over a dataset and times batch-1 runs on a fixed thread count. Engines
(:mod:`slimkit.deploy.engines`) build runners from models; ``slimkit export --check``
opens one on a written file.

>>> import torch
>>> from torch import nn
>>> runner = TorchRunner(nn.Linear(4, 3))
>>> runner(torch.zeros(2, 4)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimkit.measure.latency import measure_latency, time_callable


class Runner:
    """Base class: subclasses implement ``__call__(x) -> logits``; ``path`` is the file run (or None).

    ``batch_size`` is the largest batch one call takes (1 for engines with static shapes).
    """

    path: Path | None = None
    batch_size: int = 256
    threads: int = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, classes], labels [N]) over a dataset of (input, label) pairs, in order."""
        from torch.utils.data import DataLoader

        logits, labels = [], []
        for inputs, targets in DataLoader(dataset, batch_size=self.batch_size, shuffle=False):
            logits.append(self(inputs))
            labels.append(torch.as_tensor(targets))
        return torch.cat(logits), torch.cat(labels)

    def evaluate(self, dataset) -> float:
        """Top-1 accuracy in percent."""
        logits, labels = self.predict(dataset)
        return 100.0 * float((logits.argmax(1) == labels).float().mean())

    def latency_ms(self, x: torch.Tensor, warmup: int = 5, repeats: int = 30) -> float:
        """Median wall time of one run on ``x`` (batch 1), in milliseconds, on ``threads`` torch threads
        (:func:`slimkit.measure.latency.time_callable`; engines set their own intra-op threads too)."""
        return time_callable(lambda: self(x), warmup=warmup, runs=repeats, threads=self.threads).median_ms


class TorchRunner(Runner):
    """A PyTorch module in eager mode (or an FX graph module), timed on ``threads`` torch threads."""

    def __init__(self, model: nn.Module, threads: int = 1) -> None:
        self.model = model.eval()
        self.threads = threads

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float().cpu()

    def latency_ms(self, x: torch.Tensor, warmup: int = 5, repeats: int = 30) -> float:
        """Median of :func:`slimkit.measure.latency.measure_latency` (eval mode, inference mode, ``threads``)."""
        return measure_latency(self.model, x, warmup=warmup, runs=repeats, threads=self.threads).median_ms


class OnnxRunner(Runner):
    """An ONNX Runtime session on the CPU with a fixed intra-op thread count (default 1)."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy().astype(np.float32)})[0]
        return torch.from_numpy(out)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction (0..1) of rows where two logit tensors ``[N, classes]`` have the same argmax."""
    return float((a.argmax(1) == b.argmax(1)).float().mean())
