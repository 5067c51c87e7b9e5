"""What every pruning verb shares: the ``scope`` spelling, the ``batches`` argument, the size measurement.

Every pruning verb is spelled ``verb_(model, example_inputs, config, **data) -> Report``
(:mod:`slimkit.reports`): ``example_inputs`` is a tensor or a tuple of tensors (one batch, used
to trace or to measure the model), data comes as keywords after the config:

- ``batches``: an iterable of batches, each a tensor of model inputs or an ``(inputs, targets)``
  pair. Verbs that need targets (``taylor``/``fisher`` criteria, OBD) read the pair; verbs that
  only need inputs (L-OBS, reconstruction) take the first element;
- ``finetune`` / ``train``: a callable that trains the model *in place* between steps.

``scope`` is ``local`` (one target per layer or group) or ``global`` (one threshold over all
selected layers) in every pruning config; the old spelling ``layer`` is refused with one line
saying to write ``local``.

>>> from slimkit.config import Config
>>> class C(Config):
...     scope: Scope = "local"
>>> C.coerce({"scope": "layer"}, where="obd")
Traceback (most recent call last):
...
slimkit.exceptions.ConfigError: obd.scope: scope 'layer' is now spelled 'local' ...; write scope: local (got 'layer')
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.measure.inputs import as_args
from slimkit.reports import ModelSize


def _check_scope(value: Any) -> Any:
    if value == "layer":
        raise ValueError("scope 'layer' is now spelled 'local' (one target per layer); write scope: local")
    return value


#: ``local`` (per layer / per group) or ``global`` (one threshold over every selected layer)
Scope = Annotated[Literal["local", "global"], BeforeValidator(_check_scope)]

#: one batch of a ``batches`` argument: model inputs, or an (inputs, targets) pair
Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def model_args(model: nn.Module, example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of tensors on ``model``'s device (ConfigError when it is neither)."""
    args = as_args(example_inputs)
    param = next(model.parameters(), None)
    return args if param is None else tuple(a.to(param.device) for a in args)


def trace_input(model: nn.Module, example_inputs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """What the channel graph traces: :func:`model_args`, the tensor itself when there is one input."""
    args = model_args(model, example_inputs)
    return args[0] if len(args) == 1 else args


def size_of(model: nn.Module, example_inputs: Any) -> ModelSize:
    """:meth:`slimkit.reports.ModelSize.of` with ``example_inputs`` moved to the model's device."""
    return ModelSize.of(model, model_args(model, example_inputs))


def inputs_of(batches: Iterable[Batch] | None, verb: str) -> list[torch.Tensor]:
    """The model inputs of ``batches`` (a tensor each, or the first element of a pair); ConfigError when empty."""
    out = [b if isinstance(b, torch.Tensor) else b[0] for b in (batches or ())]
    if not out:
        raise ConfigError(f"{verb}: no input batches; pass batches=[inputs, ...] or [(inputs, targets), ...]")
    return out


def trained_in_place(model: nn.Module, result: Any, what: str) -> None:
    """ConfigError unless the training callable ``what`` trained ``model`` itself (returned it or None)."""
    if result is not None and result is not model:
        raise ConfigError(f"{what} returned another module; it must train the model it is given in place "
                          "(return that model or None)")
