"""One call that measures everything about a model: :func:`profile`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from slimkit.measure.inputs import as_args, batch_size_of, num_threads
from slimkit.measure.latency import measure_latency
from slimkit.measure.macs import LayerProfile, layer_profiles
from slimkit.measure.memory import peak_activation_bytes
from slimkit.measure.size import count_nonzeros, count_params
from slimkit.measure.storage import state_dict_bytes


@dataclass(frozen=True)
class Profile:
    """Measurements of one model on one example batch.

    - ``params``: parameter entries; ``nonzeros``: those non-zero after any ``*_mask``;
    - ``macs``: multiply-accumulates of one forward of the whole example batch
      (:mod:`slimkit.measure.macs` says what counts); ``flops`` = 2 * ``macs``;
    - ``bytes``: the fp32 state dict (:func:`slimkit.measure.storage.state_dict_bytes`);
    - ``peak_activation_bytes``: bytes of activations alive at once in one forward of the batch,
      input included, at the tensors' dtypes, and ``peak_activation_at`` the node or layer
      running then (:func:`slimkit.measure.memory.peak_activation_bytes`);
    - ``latency_ms`` (median), ``latency_p99_ms``: one forward of the batch, milliseconds;
      ``throughput``: samples per second at the median; all three None when not timed;
    - ``batch_size``, ``threads`` (torch intra-op threads during the measurement),
      ``input_shapes`` (of the example inputs), ``layers`` (per-layer :class:`LayerProfile`);
    - ``energy``: the 45 nm estimate of one forward of the batch
      (:class:`~slimkit.measure.energy.EnergyEstimate`, :mod:`slimkit.measure.energy`).
    """

    params: int
    nonzeros: int
    macs: int
    bytes: int
    peak_activation_bytes: int
    peak_activation_at: str
    latency_ms: float | None
    latency_p99_ms: float | None
    throughput: float | None
    batch_size: int
    threads: int
    input_shapes: tuple[tuple[int, ...], ...]
    layers: tuple[LayerProfile, ...]
    energy: Any = None

    @property
    def flops(self) -> int:
        """Floating-point operations, counted as 2 per MAC."""
        return 2 * self.macs

    @property
    def density(self) -> float:
        """Fraction of parameter entries that are non-zero (1.0 for a dense model)."""
        return self.nonzeros / self.params if self.params else 1.0

    @property
    def macs_per_sample(self) -> float:
        """MACs of one sample: ``macs / batch_size``."""
        return self.macs / self.batch_size

    def to_dict(self, layers: bool = False) -> dict[str, Any]:
        """Plain-JSON figures (for ``report.json``), with ``flops``; per-layer rows only when ``layers``."""
        data = asdict(self)
        data["flops"] = self.flops
        data["input_shapes"] = [list(s) for s in self.input_shapes]
        data["energy"] = self.energy.to_dict() if self.energy is not None else None
        if layers:
            data["layers"] = [
                {**asdict(layer), "output_shape": list(layer.output_shape) if layer.output_shape else None}
                for layer in self.layers
            ]
        else:
            del data["layers"]
        return data


def profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    latency: bool = True,
    warmup: int = 5,
    runs: int = 30,
    threads: int | None = None,
    sram_bytes: int | None = None,
) -> Profile:
    """Measure ``model`` on ``example_inputs`` (a Tensor or a tuple of Tensors: one batch).

    Counts params, non-zeros, MACs (one forward, whole batch, eval mode, no grad), fp32
    state-dict bytes, peak activation bytes (one more forward) and, when ``latency``, the
    median and p99 of ``runs`` timed forwards after ``warmup`` (see
    :func:`slimkit.measure.latency.measure_latency`) with ``threads`` torch threads (None:
    the current setting), and the energy estimate with ``sram_bytes`` of on-chip SRAM (None:
    :data:`~slimkit.measure.energy.DEFAULT_SRAM_BYTES`). The model's weights, train/eval modes and the thread count are
    left as they were. Raises ConfigError when ``example_inputs`` do not fit the model.

    >>> import torch
    >>> from slimkit.models import create_model
    >>> p = profile(create_model("lenet5", in_channels=1), torch.zeros(1, 1, 28, 28), latency=False)
    >>> p.params, p.macs, p.bytes, p.peak_activation_bytes, p.latency_ms
    (431080, 2293000, 1724320, 57600, None)
    """
    args = as_args(example_inputs)
    with num_threads(threads) as used:
        layers = layer_profiles(model, args)
        memory = peak_activation_bytes(model, args)
        stats = measure_latency(model, args, warmup=warmup, runs=runs) if latency else None
    batch = batch_size_of(args)
    result = Profile(
        params=count_params(model),
        nonzeros=count_nonzeros(model),
        macs=sum(layer.macs for layer in layers),
        bytes=state_dict_bytes(model),
        peak_activation_bytes=memory.peak_bytes,
        peak_activation_at=memory.peak_at,
        latency_ms=stats.median_ms if stats else None,
        latency_p99_ms=stats.p99_ms if stats else None,
        throughput=batch / (stats.median_ms / 1e3) if stats and stats.median_ms > 0 else None,
        batch_size=batch,
        threads=used,
        input_shapes=tuple(tuple(t.shape) for t in args),
        layers=layers,
    )
    from slimkit.measure.energy import DEFAULT_SRAM_BYTES, estimate_energy

    sram = DEFAULT_SRAM_BYTES if sram_bytes is None else sram_bytes
    return replace(result, energy=estimate_energy(model, result, sram_bytes=sram))

