"""Kernel plans: time every candidate kernel for every Conv2d / Linear layer of a model, keep the fastest.

:func:`plan` runs the model once on ``example_inputs`` to capture each layer's input, then
times each candidate on that input (round-robin medians, :mod:`slimkit.kernels.timing`, on
a fixed thread count) and returns a :class:`KernelPlan`: the choice per layer and the
table of timings. ``torch`` (the layer as it is) is always a candidate, so a plan may keep
a layer unchanged; that is a valid choice, not a failure. :func:`apply_plan` swaps the
chosen kernels in.

Candidates: the algorithms of :func:`slimkit.kernels.conv2d` for convolutions, and
``sparse`` (the CSR kernel over b-bit indices + codebook, :mod:`slimkit.kernels.sparse`)
for Conv2d/Linear layers that are pruned and weight-shared (``weight_codebook`` /
``weight_index`` buffers, :mod:`slimkit.quantize.sharing`).

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
>>> p = plan(model, torch.randn(1, 3, 16, 16), candidates=("torch", "im2col"), repeats=2)
>>> sorted(p.choices), all(c in ("torch", "im2col") for c in p.choices.values())
(['0', '2'], True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.global_state import num_threads
from slimkit.kernels.case import ConvCase, pair
from slimkit.kernels.conv import ALGORITHMS, AUTO_CANDIDATES, conv2d, prepared_weight
from slimkit.kernels.timing import interleaved_ms

DEFAULT_CANDIDATES = (*AUTO_CANDIDATES, "sparse")


@dataclass
class KernelPlan:
    """Per layer: the chosen kernel, the median ms of every candidate timed, and why a candidate was left out."""

    threads: int
    choices: dict[str, str] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    shapes: dict[str, str] = field(default_factory=dict)

    def predicted_ms(self, which: str = "chosen") -> float:
        """Sum over layers of the chosen kernels' medians (``which="torch"``: of torch's own)."""
        return sum(t[self.choices[n] if which == "chosen" else "torch"] for n, t in self.timings.items())

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "choices": self.choices, "timings_ms": self.timings,
                "skipped": self.skipped, "shapes": self.shapes}

    def table(self) -> str:
        """A Markdown table: one row per layer, one column per candidate (median ms), the choice in bold."""
        names = [c for c in DEFAULT_CANDIDATES if any(c in t for t in self.timings.values())]
        lines = ["| layer | input | " + " | ".join(names) + " | choice |", "|---|---|" + "---:|" * len(names) + "---|"]
        for layer, times in self.timings.items():
            cells = []
            for c in names:
                if c not in times:
                    cells.append("-")
                else:
                    cells.append(f"**{times[c]:.3f}**" if c == self.choices[layer] else f"{times[c]:.3f}")
            lines.append(f"| {layer} | {self.shapes[layer]} | " + " | ".join(cells) + f" | {self.choices[layer]} |")
        return "\n".join(lines)


def _conv_case(module: nn.Conv2d, x: torch.Tensor) -> ConvCase | str:
    """The geometry of a Conv2d call, or why slimkit's kernels cannot run it."""
    if module.groups != 1:
        return f"groups={module.groups}"
    if tuple(module.dilation) != (1, 1):
        return f"dilation={tuple(module.dilation)}"
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        return f"padding={module.padding!r} ({module.padding_mode})"
    if x.dtype != torch.float32:
        return f"input dtype {x.dtype}"
    kh, kw = module.kernel_size
    return ConvCase(x.shape[0], x.shape[1], x.shape[2], x.shape[3], module.out_channels, kh, kw,
                    pair(tuple(module.stride), "stride"), pair(tuple(module.padding), "padding"))


def _is_shared(module: nn.Module) -> bool:
    return "weight_codebook" in module._buffers and "weight_index" in module._buffers


def _sparse_module(module: nn.Module) -> nn.Module:
    """The compressed-runtime module of a pruned + shared Linear/Conv2d (same function, indices + codebook)."""
    from slimkit.kernels.sparse import SharedSparseConv2d, SharedSparseLinear, SharedSparseMatrix

    index = module.weight_index.detach().reshape(module.weight_index.shape[0], -1).to(torch.int64).numpy()
    flat = index.ravel()
    positions = (flat >= 0).nonzero()[0]
    matrix = SharedSparseMatrix(index.shape, positions, flat[positions] + 1, module.weight_codebook.detach().numpy())
    new = SharedSparseLinear(matrix, module.bias is not None) if isinstance(module, nn.Linear) else \
        SharedSparseConv2d(matrix, module)
    if module.bias is not None:
        new.bias.copy_(module.bias.detach())
    return new


def _check_candidates(candidates) -> tuple[str, ...]:
    candidates = tuple(candidates)
    known = set(ALGORITHMS.names()) | {"sparse"}
    bad = [c for c in candidates if c not in known]
    if bad or not candidates:
        raise ConfigError(f"plan: unknown candidate kernels {bad}; allowed: {', '.join(sorted(known))}")
    return candidates if "torch" in candidates else ("torch", *candidates)


def plan(model: nn.Module, example_inputs: torch.Tensor, candidates=DEFAULT_CANDIDATES, repeats: int = 10,
         threads: int | None = None) -> KernelPlan:
    """Time ``candidates`` for every Conv2d/Linear of ``model`` on its input from ``example_inputs``; see module doc.

    ``threads``: torch's thread count during timing (default: the current one, restored after).
    ``repeats``: timed rounds per layer (median). The model is not changed.
    """
    candidates = _check_candidates(candidates)
    inputs: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):  # returns None: the call goes on unchanged
            inputs.setdefault(name, args[0].detach())

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with num_threads(None if threads is None else int(threads)):
        try:
            with torch.no_grad():
                model(example_inputs)
            for h in handles:
                h.remove()
            result = KernelPlan(threads=torch.get_num_threads())
            modules = dict(model.named_modules())
            with torch.no_grad():
                for name, x in inputs.items():
                    runs, skipped = _candidates_for(modules[name], x, candidates)
                    result.shapes[name] = "x".join(map(str, x.shape))
                    result.skipped[name] = skipped
                    times = interleaved_ms(runs, repeats=repeats, warmup=1)
                    result.timings[name] = times
                    result.choices[name] = min(times, key=times.get)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    return result


def _candidates_for(module: nn.Module, x: torch.Tensor, candidates: tuple[str, ...]):
    runs: dict[str, Any] = {"torch": lambda: module(x)}
    skipped: dict[str, str] = {}
    case = _conv_case(module, x) if isinstance(module, nn.Conv2d) else None
    for name in candidates:
        if name == "torch":
            continue
        if name == "sparse":
            if not _is_shared(module):
                skipped[name] = "layer is not pruned + weight-shared"
                continue
            sparse = _sparse_module(module)
            runs[name] = lambda sparse=sparse: sparse(x)
            continue
        if not isinstance(module, nn.Conv2d):
            skipped[name] = "not a convolution"
            continue
        if isinstance(case, str):
            skipped[name] = case
            continue
        reason = ALGORITHMS.get(name).unsupported(case)
        if reason is not None:
            skipped[name] = reason
            continue
        prepared_weight(module.weight, ALGORITHMS.get(name), case)  # transforms are made once, as deployed
        runs[name] = lambda name=name: conv2d(x, module.weight, module.bias, case.stride, case.padding,
                                              algorithm=name)
    return runs, skipped


class KernelConv2d(nn.Module):
    """A Conv2d computed by :func:`slimkit.kernels.conv2d` with a fixed algorithm (same parameters, shared)."""

    def __init__(self, conv: nn.Conv2d, algorithm: str) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding = tuple(conv.stride), tuple(conv.padding)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, algorithm=self.algorithm)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={self.stride}, padding={self.padding}, algorithm={self.algorithm}")


def apply_plan(model: nn.Module, kernel_plan: KernelPlan) -> dict[str, str]:
    """Swap in the planned kernels, in place (layers whose choice is ``torch`` stay as they are).

    Returns ``{layer: kernel}`` for every layer of the plan. Inference only: the swapped
    modules compute without autograd.
    """
    modules = dict(model.named_modules())
    missing = [n for n in kernel_plan.choices if n not in modules]
    if missing:
        raise ConfigError(f"apply_plan: the plan names layers this model lacks: {missing[:5]}; plan this model")
    for name, choice in kernel_plan.choices.items():
        if choice == "torch":
            continue
        module = modules[name]
        new = _sparse_module(module) if choice == "sparse" else KernelConv2d(module, choice)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return dict(kernel_plan.choices)
