"""The one report every verb returns.

Every transform in slimkit is spelled ``verb_(model, example_inputs, config, **data) -> Report``:
it changes ``model`` in place, and its report says which layers it changed, which it skipped
and why, and the model's size before and after (:class:`ModelSize`: parameter entries,
non-zeros after masking, multiply-accumulates of one forward of ``example_inputs``, stored
bytes). A verb's own figures (per-layer tables, chosen ranks, bit widths) are fields of a
subclass; :meth:`Report.to_dict` gives all of it as JSON-friendly data.

>>> import torch
>>> from torch import nn
>>> size = ModelSize.of(nn.Linear(4, 3), torch.zeros(1, 4))
>>> size.params, size.macs, size.bytes
(15, 12, 60)
>>> Report(verb="noop_", before=size, after=size).to_dict()["after"]["params"]
15
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSize:
    """A model's size: ``params`` (entries), ``nonzeros`` (after masking), ``macs`` (one forward),
    ``bytes`` (stored, :func:`slimkit.measure.storage.stored_bytes`)."""

    params: int
    nonzeros: int
    macs: int
    bytes: int

    @classmethod
    def of(cls, model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> ModelSize:
        """Measure ``model`` on ``example_inputs`` (a tensor or a tuple of tensors; batch 1 gives per-image MACs)."""
        from slimkit.measure.macs import count_macs
        from slimkit.measure.size import count_params_nonzeros
        from slimkit.measure.storage import stored_bytes

        params, nonzeros = count_params_nonzeros(model)
        return cls(params=params, nonzeros=nonzeros, macs=count_macs(model, example_inputs), bytes=stored_bytes(model))


def _plain(value: Any) -> Any:
    """``value`` as JSON-friendly data: dataclasses as dicts, tuples as lists, tensors as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        out.update({name: _plain(getattr(value, name)) for name in getattr(value, "derived", ())})
        return out
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


@dataclass(kw_only=True)
class Report:
    """What a verb did to a model.

    ``verb``: the verb's name (``"quantize_"``). ``changed``: qualified names of the layers it
    changed. ``skipped``: layer name -> why it was left alone. ``before`` / ``after``: the
    model's :class:`ModelSize` around the call. Subclasses add the verb's own figures.
    """

    verb: str
    changed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    before: ModelSize | None = None
    after: ModelSize | None = None
    #: names of properties :meth:`to_dict` includes besides the fields
    derived: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """Every field (and the ``derived`` properties) as JSON-friendly data."""
        return _plain(self)
