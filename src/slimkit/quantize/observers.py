"""Observers: from the values a tensor takes to a quantization grid (scale, zero point).

Four ways of choosing the clipping range ``[lo, hi]`` (Krishnamoorthi 2018, section 3;
Jacob et al. 2018): ``minmax`` (the extremes seen), ``ema`` (moving-average of each batch's
extremes, as in QAT), ``percentile`` (the p-th percentile of magnitudes, robust to
outliers) and ``mse`` (the clipping that minimises the squared quantization error,
searched on a grid). Each can be per tensor or per channel (``axis``).

The grid: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``, ``x ~ (q - zero_point) * scale``.
Symmetric grids are signed and narrow (``[-(2^(b-1) - 1), 2^(b-1) - 1]``, zero point 0);
asymmetric grids are unsigned (``[0, 2^b - 1]``) with an integer zero point so that 0.0
is exactly representable.

>>> import torch
>>> obs = make_observer("minmax")
>>> obs.update(torch.tensor([-1.0, 0.5, 2.0]))
>>> scale, zp = obs.qparams(bits=8, symmetric=False)
>>> round(float(scale), 6), int(zp)
(0.011765, 85)
"""

from __future__ import annotations

import torch

from slimkit.exceptions import ConfigError

OBSERVERS = ("minmax", "ema", "percentile", "mse")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a grid: signed narrow when symmetric, unsigned otherwise."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """(scale float32, zero_point int32) of the grid covering ``[lo, hi]`` (broadcast per channel)."""
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32), min=0.0)
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 1e-8)).clamp(min=1e-8)
    return scale.float(), zero


FP16_MAX = 65504.0


def round_up_fp16(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= each ``scale`` (as float32); unchanged where above fp16's range.

    Grids store their scales as float16 (2 bytes per channel instead of 4); rounding *up*
    keeps every value inside the grid's range (no new clipping) and a positive scale positive.
    """
    scale = torch.as_tensor(scale, dtype=torch.float32)
    half = scale.clamp(max=FP16_MAX).half()
    half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return torch.where(scale > FP16_MAX, scale, half.float())


def is_fp16_exact(scale: torch.Tensor) -> bool:
    """True when every value of ``scale`` is a finite float16 (it can be stored in 2 bytes exactly)."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    half = scale.half()
    return bool(torch.isfinite(half).all() and torch.equal(half.float(), scale))


def quantize_values(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as a float tensor) of ``x`` on the grid; ``scale``/``zero`` broadcast."""
    return torch.clamp(torch.round(x / scale) + zero, qmin, qmax)


def _per_channel(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """[channels, values] view (a single row when per tensor)."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, axis).reshape(x.shape[axis], -1)


class Observer:
    """Accumulates statistics over ``update`` calls; ``qparams`` turns them into a grid."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = _per_channel(x, self.axis)
        lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
        self._merge(lo, hi)

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise ConfigError("observer saw no data: calibrate with at least one batch before quantizing")
        return self.lo, self.hi

    def qparams(self, bits: int, symmetric: bool):
        lo, hi = self.range(bits, symmetric)
        scale, zero = qparams_from_range(lo, hi, bits, symmetric)
        if self.axis is None:
            return scale.reshape(()), zero.reshape(())
        return scale, zero


class MinMaxObserver(Observer):
    """The extremes seen over all batches."""


class EMAObserver(Observer):
    """Moving average of each batch's extremes (``momentum`` weight on the new batch)."""

    def __init__(self, axis: int | None = None, momentum: float = 0.1) -> None:
        super().__init__(axis)
        self.momentum = momentum

    def _merge(self, lo, hi):
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo, self.hi = (1 - m) * self.lo + m * lo, (1 - m) * self.hi + m * hi


class PercentileObserver(Observer):
    """Average over batches of the ``percentile``-th percentile of values below 0 and above 0."""

    def __init__(self, axis: int | None = None, percentile: float = 99.99, max_samples: int = 1 << 16) -> None:
        super().__init__(axis)
        self.percentile, self.max_samples, self.batches = percentile, max_samples, 0

    def update(self, x):
        rows = _per_channel(x, self.axis)
        if rows.shape[1] > self.max_samples:
            idx = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(self.batches))
            rows = rows[:, idx[: self.max_samples]]
        q = self.percentile / 100.0
        lo = torch.quantile(rows, 1 - q, dim=1)
        hi = torch.quantile(rows, q, dim=1)
        self.batches += 1
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            n = self.batches
            self.lo, self.hi = self.lo + (lo - self.lo) / n, self.hi + (hi - self.hi) / n


class MSEObserver(Observer):
    """Clipping range that minimises the mean squared quantization error (grid search on a
    fraction of the min-max range, per channel), over a bounded sample of the values seen."""

    def __init__(self, axis: int | None = None, max_samples: int = 1 << 15, steps: int = 40) -> None:
        super().__init__(axis)
        self.max_samples, self.steps = max_samples, steps
        self.samples: list[torch.Tensor] = []

    def update(self, x):
        super().update(x)
        rows = _per_channel(x, self.axis)
        if rows.shape[1] > self.max_samples:
            idx = torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(len(self.samples)))
            rows = rows[:, idx[: self.max_samples]]
        self.samples.append(rows)

    def range(self, bits, symmetric):
        lo, hi = super().range(bits, symmetric)
        rows = torch.cat(self.samples, dim=1)
        qmin, qmax = qrange(bits, symmetric)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for frac in torch.linspace(1.0, 0.2, self.steps):
            c_lo, c_hi = lo * frac, hi * frac
            scale, zero = qparams_from_range(c_lo, c_hi, bits, symmetric)
            q = quantize_values(rows, scale[:, None], zero[:, None], qmin, qmax)
            err = ((q - zero[:, None]) * scale[:, None] - rows).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
        return best_lo, best_hi


def make_observer(name: str, axis: int | None = None, **options) -> Observer:
    """An observer by name (``minmax``, ``ema``, ``percentile``, ``mse``); ``axis`` for per channel."""
    classes = {"minmax": MinMaxObserver, "ema": EMAObserver, "percentile": PercentileObserver, "mse": MSEObserver}
    if name not in classes:
        raise ConfigError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")
    return classes[name](axis=axis, **options)
