"""The data of a channel graph: units, groups, the graph itself, and the union-find of slots.

See :mod:`slimkit.prune.graph` for what a slot, a unit and a group are.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

#: Roles of a member axis: ``out`` (conv/linear/BN/... output channels and per-channel
#: parameters), ``in`` (conv/linear input channels), ``param:<name>:<axis>`` (a parameter
#: used directly in forward, e.g. ConvNeXt's ``layer_scale``), ``heads`` (an attention module's
#: heads, see :mod:`~slimkit.prune.graph.heads`), or a role a registered rule names (its surgery
#: handler reads it).
Axis = tuple[str, str]


@dataclass
class Unit:
    """One prunable position: for every member axis, the indices it occupies there."""

    id: int
    members: dict[Axis, np.ndarray]
    producers: tuple[str, ...]


class UnitTable(Mapping[int, Unit]):
    """The units of a graph in columnar form, read as a mapping ``unit id -> Unit``.

    A unit's members are *runs*: run ``r`` belongs to unit ``ids[run_unit[r]]``, lies on axis
    ``axes[run_axis[r]]`` and holds the positions ``positions[run_start[r]:run_stop[r]]``; the
    runs of a unit are consecutive and in its members' order. ``producers[i]``: the producer
    layers of unit ``ids[i]``. Consumers that visit every unit (criteria, surgery) read the
    arrays; a :class:`Unit` is made on first access (graphs with thousands of channels do not
    pay for objects nobody reads). The arrays are read-only; :meth:`fresh` shares them.
    """

    def __init__(self, ids: np.ndarray, producers: list[tuple[str, ...]], axes: list[Axis], run_unit: np.ndarray,
                 run_axis: np.ndarray, run_start: np.ndarray, run_stop: np.ndarray, positions: np.ndarray,
                 producer_codes: tuple[np.ndarray, list[frozenset[str]]] | None = None) -> None:
        self.ids, self.producers, self.axes = ids, producers, axes
        self.run_unit, self.run_axis, self.run_start, self.run_stop = run_unit, run_axis, run_start, run_stop
        self.positions = positions
        for a in (ids, run_unit, run_axis, run_start, run_stop, positions):
            a.setflags(write=False)
        self._lookup: dict[int, int] | None = None
        self._made: dict[int, Unit] = {}
        self._first_run: np.ndarray | None = None
        #: what :meth:`producer_codes` returns, when the caller has it (assembly does)
        self._producer_codes = producer_codes

    @property
    def _index(self) -> dict[int, int]:
        """Unit id -> row, made on first use (a graph's consumers mostly read the arrays)."""
        if self._lookup is None:
            self._lookup = dict(zip(self.ids.tolist(), range(len(self.ids))))
        return self._lookup

    @classmethod
    def from_units(cls, units: Mapping[int, Unit]) -> UnitTable:
        """The table of any mapping of units (a table itself is returned as it is)."""
        if isinstance(units, UnitTable):
            return units
        axes: dict[Axis, int] = {}
        run_unit, run_axis, arrays = [], [], []
        for i, unit in enumerate(units.values()):
            for axis, idx in unit.members.items():
                run_unit.append(i)
                run_axis.append(axes.setdefault(axis, len(axes)))
                arrays.append(np.asarray(idx, dtype=np.int64).reshape(-1))
        stop = np.cumsum([len(a) for a in arrays], dtype=np.int64)
        positions = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(np.array(list(units), dtype=np.int64), [u.producers for u in units.values()], list(axes),
                   np.array(run_unit, dtype=np.int64), np.array(run_axis, dtype=np.int64),
                   stop - np.array([len(a) for a in arrays], dtype=np.int64), stop, positions)

    def fresh(self) -> UnitTable:
        """A table sharing the arrays (and the read-only lookups), with its own (not yet made) Unit objects."""
        table = UnitTable(self.ids, self.producers, self.axes, self.run_unit, self.run_axis, self.run_start,
                          self.run_stop, self.positions, self._producer_codes)
        table._lookup, table._first_run = self._lookup, self._first_run
        return table

    def index_of(self, unit_ids: Iterator[int] | list[int]) -> np.ndarray:
        """Row of every unit id in ``ids`` (KeyError for an unknown id)."""
        return np.array([self._index[u] for u in unit_ids], dtype=np.int64)

    def producer_codes(self) -> tuple[np.ndarray, list[frozenset[str]]]:
        """``(codes, sets)``: unit ``ids[i]``'s producer layers are ``sets[codes[i]]``."""
        if self._producer_codes is None:
            seen: dict[tuple[str, ...], int] = {}
            codes = np.array([seen.setdefault(p, len(seen)) for p in self.producers], dtype=np.int64)
            self._producer_codes = codes, [frozenset(p) for p in seen]
        return self._producer_codes

    def first_runs(self) -> np.ndarray:
        """``[len(ids) + 1]``: unit ``i``'s runs are ``first_runs()[i]:first_runs()[i + 1]``."""
        if self._first_run is None:
            self._first_run = np.searchsorted(self.run_unit, np.arange(len(self.ids) + 1))
        return self._first_run

    def __getitem__(self, uid: int) -> Unit:
        unit = self._made.get(uid)
        if unit is None:
            i = self._index[uid]
            first = self.first_runs()
            runs = range(first[i], first[i + 1])
            unit = Unit(uid, {self.axes[self.run_axis[r]]: self.positions[self.run_start[r]:self.run_stop[r]]
                              for r in runs}, self.producers[i])
            self._made[uid] = unit
        return unit

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids.tolist())  # the lookup's order, without making it

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, uid: object) -> bool:
        return uid in self._index

    def __repr__(self) -> str:
        return f"UnitTable({len(self)} units)"


@dataclass
class Group:
    """Units produced by the same layers (one residual stream, one conv's filters).

    ``partitions``: set where the units reach a grouped conv (or a GroupNorm, or an even
    ``chunk``): ``g`` lists of ``len(units) / g`` unit ids (the blocks, in channel order);
    every list must lose as many units.
    """

    name: str
    producers: tuple[str, ...]
    units: list[int]
    partitions: list[list[int]] | None = None


@dataclass
class ChannelGraph:
    """Result of :func:`slimkit.prune.graph.build_graph`. Its index arrays are read-only."""

    axes: dict[Axis, np.ndarray]
    #: unit id -> Unit; a :class:`UnitTable` from build_graph (any mapping of units is accepted)
    units: Mapping[int, Unit]
    groups: list[Group]
    fixed_reasons: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    #: the fx GraphModule of a fresh build (it shares the model's modules), None from the cache
    traced: Any = field(default=None, repr=False, compare=False)
    #: the same GraphModule, also on graphs from the cache: its nodes and the shapes they recorded, read by
    #: the MAC count (:mod:`slimkit.prune.graph.macs`); never run it (from the cache its modules are another model's)
    recorded: Any = field(default=None, repr=False, compare=False)

    def modules_of(self, model: nn.Module) -> dict[str, nn.Module]:
        """``dict(model.named_modules())``: the table build_graph made when it is ``model``'s (surgery edits
        modules in place, so it stays valid), a fresh walk for another model (a deep copy)."""
        return self.modules if self.modules.get("") is model else dict(model.named_modules())


@dataclass
class Ann:
    """Channel annotation of one tensor: the dims that hold channels and their slot ids.

    ``slots`` has shape ``[shape[d] for d in dims]``.
    """

    dims: tuple[int, ...]
    slots: np.ndarray


@dataclass(frozen=True)
class ParamRef:
    """A tensor computed from parameters or buffers only (no activations).

    ``target``: qualified name of the first parameter it was computed from; ``shape``: that
    parameter's shape; ``others``: (name, shape) of the other parameters that went into it
    (NFNet's gain in a scaled weight standardization). A value equal in shape to ``target``
    *is* that parameter for the op rules (a standardized conv weight is the conv's weight).
    """

    target: str
    shape: tuple[int, ...]
    others: tuple[tuple[str, tuple[int, ...]], ...] = ()
    #: reshaped to a shape written as constants (``view(self.shape)``): it cannot lose channels
    frozen: bool = False

    @property
    def owner(self) -> str:
        return self.target.rpartition(".")[0]

    @property
    def pname(self) -> str:
        return self.target.rpartition(".")[2]


def distinct(a: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``a`` (flattened): ``np.unique(a)`` by one sort. numpy 2's
    ``unique`` hashes first and then sorts, 4x slower on the int arrays here, and imports
    ``numpy.ma`` on its first call (13 ms of a first prune)."""
    s = np.sort(a, axis=None)
    return s[np.r_[True, s[1:] != s[:-1]]] if len(s) else s


class UnionFind:
    """Slots and their classes; slots may be *fixed* (kept) with a reason."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: dict[int, str] = {}
        #: (first slot, count, producer axis) for every block of slots created with a producer
        self.produced: list[tuple[int, int, Axis]] = []

    def new(self, count: int, producer: Axis | None = None, fixed: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        if producer is not None:
            self.produced.append((start, count, producer))
        if fixed is not None:
            self.fixed.update(dict.fromkeys(range(start, start + count), fixed))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unite ``a[i]`` with ``b[i]`` for every position (arrays of the same shape)."""
        a, b = a.reshape(-1), b.reshape(-1)
        differ = a != b
        if not differ.any():
            return
        a, b = a[differ], b[differ]
        span = int(b.max()) + 1
        pairs = distinct(a * span + b)  # the distinct (a, b) pairs in lexicographic order
        parent = self.parent
        for s, t in zip((pairs // span).tolist(), (pairs % span).tolist(), strict=True):
            # self.union(s, t), inlined (a few thousand pairs per residual add): the same roots
            rs = s
            while parent[rs] != rs:
                rs = parent[rs]
            while parent[s] != rs:
                parent[s], s = rs, parent[s]
            rt = t
            while parent[rt] != rt:
                rt = parent[rt]
            while parent[t] != rt:
                parent[t], t = rt, parent[t]
            if rs != rt:
                parent[rt] = rs

    def fix(self, slots: np.ndarray, reason: str) -> None:
        for s in distinct(slots).tolist():
            self.fixed.setdefault(s, reason)

    def roots(self) -> np.ndarray:
        """Root of every slot (the value :meth:`find` returns), as one int64 array."""
        parent = np.asarray(self.parent, dtype=np.int64)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent = grand


@contextlib.contextmanager
def evaluating(model: nn.Module, modules: Mapping[str, nn.Module] | None = None) -> Iterator[None]:
    """``model.eval()`` inside the block, ``model.train(was_training)`` after.

    Both are skipped when no module is training (they would change nothing, and each walks every
    module through ``nn.Module.__setattr__``: ~10 ms on a 300-module model). ``modules``: the
    model's ``named_modules`` as a dict, when the caller has it.
    """
    if not any(m.training for m in (model.modules() if modules is None else modules.values())):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block.

    Tracing and the unit tables allocate many short-lived containers; with the collector on,
    they survive its young collections while in use and trigger full collections (about
    0.2 s each in a process that imported torch). Paused, the garbage is reclaimed by a
    cheap young collection afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
