"""Feature maps taken by module name with forward hooks.

A feature pair names a module on each model (``{student: features.block2, teacher:
conv2}``); :class:`FeatureTap` registers a forward hook on each named module and keeps
its latest output, so the normal trainer's forward pass of the student yields its
features for free (DDP-wrapped or not: the hooks sit on the inner modules). A name that
does not exist fails with one line listing the close names.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3))
>>> with FeatureTap(net, ["0", "2"]) as tap:
...     _ = net(torch.zeros(1, 1, 8, 8))
...     [tuple(f.shape) for f in tap.take()]
[(1, 4, 6, 6), (1, 8, 4, 4)]
>>> FeatureTap(net, ["3"], role="student")
Traceback (most recent call last):
...
slimkit.exceptions.UnknownNameError: student has no module '3' (modules: '0', '1', '2')
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.exceptions import ConfigError, UnknownNameError


def resolve_module(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """The submodule called ``name`` (as in ``named_modules``), or one-line UnknownNameError with close names."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    if name in modules:
        return modules[name]
    known = list(modules)
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.4)
    hint = f"; close names: {', '.join(repr(c) for c in close)}" if close else ""
    shown = ", ".join(repr(k) for k in known[:12]) + (f", ... ({len(known)} in all)" if len(known) > 12 else "")
    raise UnknownNameError(f"{role} has no module {name!r}{hint} (modules: {shown})")


def parse_pairs(pairs: Any, where: str = "options.pairs") -> list[tuple[str, str]]:
    """Feature pairs from a recipe: a list of ``{student: name, teacher: name}`` (or ``[s, t]``)."""
    if not isinstance(pairs, Sequence) or isinstance(pairs, str) or not pairs:
        raise ConfigError(
            f"{where}: expected a non-empty list of {{student: <module>, teacher: <module>}}, got {pairs!r}"
        )
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, Mapping) and set(pair) == {"student", "teacher"}:
            out.append((str(pair["student"]), str(pair["teacher"])))
        elif isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2:
            out.append((str(pair[0]), str(pair[1])))
        else:
            raise ConfigError(f"{where}[{i}]: expected {{student: <module>, teacher: <module>}}, got {pair!r}")
    return out


class FeatureTap:
    """Forward hooks that keep the latest output of named modules of one model.

    ``take()`` returns the outputs in the order of ``names`` (tensors with their graph,
    so a loss on them trains the model) and forgets them; ``remove()`` detaches the hooks.
    Usable as a context manager.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], role: str = "model") -> None:
        self.names = list(names)
        self.role = role
        self._modules = [resolve_module(model, name, role) for name in self.names]
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.attach()

    def attach(self) -> FeatureTap:
        """(Re-)register the hooks; idempotent."""
        if not self._handles:
            for name, module in zip(self.names, self._modules):
                self._handles.append(module.register_forward_hook(self._keeper(name)))
        return self

    def _keeper(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            self._outputs[name] = output

        return hook

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def take(self) -> list[torch.Tensor]:
        """The latest output of every named module (in ``names`` order), then forget them."""
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise ConfigError(
                f"{self.role} module(s) {missing} produced no output in the last forward pass; "
                "name modules that the model's forward actually calls"
            )
        out = [self._outputs[n] for n in self.names]
        self._outputs.clear()
        return out

    def clear(self) -> None:
        self._outputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def __enter__(self) -> FeatureTap:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()
