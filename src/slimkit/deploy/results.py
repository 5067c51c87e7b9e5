"""Typed results of deployment: engine runs, the engine choice, the dense comparison, exports.

Each result is a frozen dataclass; ``to_dict()`` gives the JSON form that ``report.json``
stores (``None`` fields left out) and ``from_dict`` reads it back, so the report renders
from the same types the stages produce.

>>> r = EngineResult("onnxruntime-int8", integer=True, accuracy=97.5, latency_ms=0.1)
>>> r.to_dict()
{'integer': True, 'accuracy': 97.5, 'latency_ms': 0.1}
>>> EngineResult.from_dict("onnxruntime-int8", r.to_dict()) == r
True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple


def _compact(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in asdict(obj).items() if v is not None and k not in skip}


@dataclass(frozen=True)
class EngineResult:
    """One engine's run of one model: accuracy as executed (%), batch-1 latency (ms, median, one
    thread), file size (bytes) where the engine runs a file, and the fraction (0..1) of test
    samples whose top-1 agrees with the fake-quant simulation. ``error``: why it could not run."""

    engine: str
    integer: bool = False
    accuracy: float | None = None
    latency_ms: float | None = None
    file_bytes: int | None = None
    agreement_with_fakequant: float | None = None
    path: str | None = None
    grids: str | None = None
    error: str | None = None

    @property
    def ran(self) -> bool:
        return self.error is None and self.accuracy is not None

    def to_dict(self) -> dict[str, Any]:
        return _compact(self, skip=("engine",))

    @classmethod
    def from_dict(cls, engine: str, data: Mapping[str, Any]) -> EngineResult:
        known = {f.name for f in fields(cls)} - {"engine"}
        return cls(engine, **{k: v for k, v in data.items() if k in known})


class EngineChoice(NamedTuple):
    """The chosen engine (None when none met the target) and why, in one sentence."""

    engine: str | None
    reason: str


@dataclass(frozen=True)
class EngineComparison:
    """Every engine's result for one model, in the order they ran (a read-only mapping by name)."""

    results: dict[str, EngineResult] = field(default_factory=dict)

    def __getitem__(self, name: str) -> EngineResult:
        return self.results[name]

    def __contains__(self, name: object) -> bool:
        return name in self.results

    def __iter__(self) -> Iterator[str]:
        return iter(self.results)

    def get(self, name: str) -> EngineResult | None:
        return self.results.get(name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: r.to_dict() for name, r in self.results.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> EngineComparison:
        return cls({name: EngineResult.from_dict(name, r) for name, r in data.items()})


@dataclass(frozen=True)
class DenseComparison:
    """The deployed model against the dense fp32 baseline run by the same engine's fp32 path
    (batch 1, one thread): latencies in ms, sizes in bytes, ``speedup`` and ``size_ratio`` as
    dense / deployed. ``skipped`` says why there is no comparison."""

    dense_engine: str | None = None
    dense_fp32_ms: float | None = None
    deployed_engine: str | None = None
    deployed_ms: float | None = None
    speedup: float | None = None
    dense_fp32_bytes: int | None = None
    deployed_bytes: int | None = None
    size_ratio: float | None = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _compact(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DenseComparison:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class SlimFile:
    """A written ``.slim`` container: its path and its size in bytes."""

    path: str
    bytes: int


@dataclass(frozen=True)
class Exported:
    """A deployable file ``slimkit export`` (or a run) wrote: format, path, size in bytes, the
    engine that runs it, and how it was made (e.g. ``calibrated int8 PTQ, 8 batches``)."""

    format: str
    path: str
    bytes: int
    engine: str
    how: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CheckResult:
    """A written file run in its engine on the test split of the recorded data.

    ``accuracy`` (%) as the engine executes the file, ``reference_accuracy`` (%) of the
    PyTorch model it came from, ``agreement`` the fraction (0..1) of samples with the same
    top-1 in both, ``max_abs_diff`` the largest logit difference, ``latency_ms`` the engine's
    batch-1 median on one thread.
    """

    engine: str
    dataset: str
    samples: int
    accuracy: float
    reference_accuracy: float
    agreement: float
    max_abs_diff: float
    latency_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for the terminal."""
        return (f"check: {self.engine} {self.accuracy:.2f}% on {self.dataset} test ({self.samples} images); "
                f"PyTorch {self.reference_accuracy:.2f}%; top-1 agreement {100 * self.agreement:.2f}%; "
                f"max |logit diff| {self.max_abs_diff:.3g}; {self.latency_ms:.3f} ms batch-1")
