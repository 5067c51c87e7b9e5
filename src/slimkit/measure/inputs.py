"""Shared helpers: normalising ``example_inputs``, running a forward with a clear error, keeping modes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimkit.exceptions import ConfigError, SlimkitError


def as_args(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of positional arguments: a Tensor, or a tuple/list of Tensors."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        return tuple(example_inputs)
    raise ConfigError(
        f"example_inputs must be a Tensor or a tuple of Tensors (one batch, e.g. torch.zeros(1, 3, 32, 32)), "
        f"got {type(example_inputs).__name__}"
    )


def batch_size_of(args: tuple[torch.Tensor, ...]) -> int:
    """Leading dimension of the first input (1 for a 0-d tensor)."""
    first = args[0]
    return int(first.shape[0]) if first.dim() > 0 else 1


def shape_str(args: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(str(list(t.shape)) for t in args)


def expected_input(model: nn.Module) -> str | None:
    """What ``model`` expects, as text (``[N, 1, H, W]``): from its zoo arch, else its first Conv/Linear; or None."""
    arch = getattr(model, "slimkit_arch", None)  # set by slimkit.models.create_model
    if isinstance(arch, dict) and "in_channels" in arch:
        return f"[N, {arch['in_channels']}, H, W] (zoo model {arch.get('name')!r})"
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv1d):
            return f"[N, {module.in_channels}, L] (first layer {name!r})"
        if isinstance(module, nn.Conv2d):
            return f"[N, {module.in_channels}, H, W] (first layer {name!r})"
        if isinstance(module, nn.Conv3d):
            return f"[N, {module.in_channels}, D, H, W] (first layer {name!r})"
        if isinstance(module, nn.Linear):
            return f"[N, ..., {module.in_features}] after any flattening (first layer {name!r})"
    return None


def run_forward(model: nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
    """``model(*args)``; a shape/type failure becomes one-line ConfigError naming the expected input."""
    try:
        return model(*args)
    except SlimkitError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        expected = expected_input(model)
        hint = f"; the model expects {expected}" if expected else ""
        raise ConfigError(
            f"example_inputs of shape {shape_str(args)} do not fit {type(model).__name__} "
            f"({type(err).__name__}: {reason}){hint}; pass one batch shaped like the model's training data"
        ) from err


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and restore each module's own ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` torch intra-op threads (None: leave as is) and restore the count afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ConfigError(f"threads must be a positive integer or None, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
