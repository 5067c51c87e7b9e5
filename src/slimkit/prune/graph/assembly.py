"""Assembly: the union-find classes of slots become units, units with the same producers groups.

Grouped-conv (and GroupNorm, even ``chunk``) constraints become the groups' ``partitions``;
a constraint that cannot hold fixes its slots. Modules with parameters that forward never
used are reported as warnings.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from slimkit.prune.graph.core import Axis, ChannelGraph, Group, UnionFind, UnitTable, distinct


def _runs(axes: dict[Axis, np.ndarray], roots: np.ndarray) -> tuple[list[Axis], np.ndarray, np.ndarray, np.ndarray,
                                                                 np.ndarray, np.ndarray, np.ndarray]:
    """The positions every root's slots occupy on every axis, as runs (see :class:`UnitTable`).

    Returns ``(names, order, run_root, run_axis, run_start, run_stop, positions)``: ``order``,
    the roots in the order their first slot appears when the axes are walked in insertion
    order; run ``r`` is root ``order[run_root[r]]`` on axis ``names[run_axis[r]]`` at
    ``positions[run_start[r]:run_stop[r]]``. Inside a root, axes keep that order and
    positions ascend.
    """
    names = [a for a, slots in axes.items() if len(slots)]
    empty = np.zeros(0, dtype=np.int64)
    if not names:
        return [], empty, empty, empty, empty, empty, empty
    sizes = [len(axes[a]) for a in names]
    slot_roots = roots[np.concatenate([axes[a] for a in names])]
    axis_ids = np.repeat(np.arange(len(names)), sizes)
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])
    uniq, first, inverse = np.unique(slot_roots, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    by_first = np.argsort(first, kind="stable")
    rank[by_first] = np.arange(len(uniq))
    entry_rank = rank[inverse.reshape(-1)]
    order = np.argsort(entry_rank, kind="stable")
    run_ranks, run_axes = entry_rank[order], axis_ids[order]
    starts = np.flatnonzero(np.r_[True, (np.diff(run_ranks) != 0) | (np.diff(run_axes) != 0)])
    stops = np.r_[starts[1:], len(order)]
    return names, uniq[by_first], run_ranks[starts], run_axes[starts], starts, stops, positions[order]


def _fixed_roots(uf: UnionFind, roots: np.ndarray) -> dict[int, str]:
    """Reason of every fixed root: that of its slot fixed first."""
    if not uf.fixed:
        return {}
    slots = np.fromiter(uf.fixed, dtype=np.int64, count=len(uf.fixed))
    reasons = list(uf.fixed.values())
    fixed, first = np.unique(roots[slots], return_index=True)
    return {r: reasons[i] for r, i in zip(fixed.tolist(), first.tolist(), strict=True)}


def producer_label(axis: Axis) -> str:
    """How groups name a producer: the layer, or ``layer.param`` for a parameter used in forward."""
    name, role = axis
    if role.startswith("param:"):
        pname = role.split(":")[1]
        return f"{name}.{pname}" if name else pname
    return name


def _producers_of(uf: UnionFind, roots: np.ndarray) -> tuple[np.ndarray, list[tuple[str, ...]], dict[str, str]]:
    """``(code, sets, layer)``: the labels of the producers whose fresh slots joined root ``r`` are
    ``sets[code[r]]`` (sorted; ``code[r]`` is -1 for none), and ``layer`` the layer of every label."""
    code = np.full(len(roots), -1, dtype=np.int64)
    if not uf.produced:
        return code, [], {}
    labels = [producer_label(axis) for _, _, axis in uf.produced]
    layer = {label: axis[0] for label, (_, _, axis) in zip(labels, uf.produced, strict=True)}
    names = sorted(layer)
    lid = {label: i for i, label in enumerate(names)}
    starts = np.array([start for start, _, _ in uf.produced], dtype=np.int64)
    counts = np.array([count for _, count, _ in uf.produced], dtype=np.int64)
    offsets = np.r_[0, np.cumsum(counts)]
    slots = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - starts, counts)
    keys = distinct(roots[slots] * len(names) + np.repeat([lid[label] for label in labels], counts))
    key_roots, key_labels = keys // len(names), keys % len(names)  # by root, labels in sorted order
    first = np.r_[True, key_roots[1:] != key_roots[:-1]]
    last = np.r_[key_roots[1:] != key_roots[:-1], True]
    code[key_roots[first & last]] = key_labels[first & last]  # one label: its set is sets[label id]
    sets: list[tuple[str, ...]] = [(n,) for n in names]
    starts = np.flatnonzero(first)
    lengths = np.diff(np.r_[starts, len(keys)])
    several = np.flatnonzero(lengths > 1)  # roots joined by several producers (a depthwise conv's channels)
    for k in distinct(lengths[several]).tolist():  # the label lists of each length, deduplicated at once
        of_k = several[lengths[several] == k]
        table = key_labels[starts[of_k][:, None] + np.arange(k)]  # [n, k] label ids
        if len(names) ** k < 2 ** 62:  # a row as one integer: a sort of ints (rows by axis=0 sort as bytes, 5x slower)
            _, first, inverse = np.unique(table @ (len(names) ** np.arange(k - 1, -1, -1, dtype=np.int64)),
                                          return_index=True, return_inverse=True)
            rows = table[first]
        else:
            rows, inverse = np.unique(table, axis=0, return_inverse=True)
        code[key_roots[starts[of_k]]] = len(sets) + inverse.reshape(-1)
        sets += [tuple(names[i] for i in row) for row in rows.tolist()]
    return code, sets, layer


def _partition_of(slots: np.ndarray, g: int, roots: np.ndarray, fixed: dict[int, str], code: np.ndarray,
                  members: Callable[[int], set[int]]) -> tuple[int, list[list[int]]] | None:
    """(producer set code, partition) of one grouped-conv constraint, or None when it cannot hold.

    ``slots``: ``[C]`` channel slots of a grouped conv's input or output; ``g``: its groups;
    ``members(c)``: the free roots of producer set ``c``. It holds when every channel is its
    own free unit and the units are exactly one group's.
    """
    r = roots[slots]
    if len(distinct(r)) != len(r) or any(x in fixed for x in r.tolist()):
        return None
    codes = distinct(code[r])
    if len(codes) != 1 or codes[0] < 0:
        return None
    c = int(codes[0])
    if set(r.tolist()) != members(c):
        return None
    return c, [sorted(row) for row in r.reshape(g, -1).tolist()]


def _balanced(r: np.ndarray, g: int) -> bool:
    """Every root has as many channels in each of the ``g`` blocks: any removal keeps the blocks equal.

    (GLU's halves, united channel by channel, are one unit per pair.)
    """
    rows = np.sort(r.reshape(g, -1), axis=1)
    return len(distinct(r)) < len(r) and bool((rows == rows[0]).all())


def _finer(a: list[list[int]], b: list[list[int]]) -> list[list[int]] | None:
    """The partition of ``a`` and ``b`` that refines the other (equal removal there holds for both), or None."""
    if a == b or all(any(set(x) <= set(y) for y in b) for x in a):
        return a
    if all(any(set(y) <= set(x) for x in a) for y in b):
        return b
    return None


def _group_partitions(constraints: list[tuple[np.ndarray, int, str]], roots: np.ndarray, fixed: dict[int, str],
                      code: np.ndarray, sets: list[tuple[str, ...]],
                      in_order: np.ndarray) -> dict[tuple[str, ...], list[list[int]]]:
    """Partition of each group that reaches grouped convs; fixes (in ``fixed``) the roots of the others.

    A constraint fails when its channels are not exactly one group's free units, or when two
    grouped convs split one group in ways neither of which refines the other (the finer one
    is kept otherwise); fixing its roots may break others, so repeat. ``code`` / ``sets``: the
    producers of every root (see :func:`_producers_of`); ``in_order``: the roots.
    """
    codes = code[in_order]
    while True:
        found_members: dict[int, set[int]] = {}

        def members(c: int, found: dict[int, set[int]] = found_members) -> set[int]:
            if c not in found:
                found[c] = {x for x in in_order[codes == c].tolist() if x not in fixed}
            return found[c]

        partitions: dict[tuple[str, ...], list[list[int]]] = {}
        failed = None
        for slots, g, reason in constraints:
            r = roots[slots]
            if all(x in fixed for x in r.tolist()) or _balanced(r, g):
                continue
            found = _partition_of(slots, g, roots, fixed, code, members)
            if found is not None:
                p = sets[found[0]]
                finer = _finer(partitions.setdefault(p, found[1]), found[1])
                if finer is not None:
                    partitions[p] = finer
                    continue
            failed = (r, reason)
            break
        if failed is None:
            return partitions
        for x in distinct(failed[0]).tolist():
            fixed.setdefault(x, failed[1])


def assemble(builder) -> ChannelGraph:
    """Units and groups from the builder's union-find classes, plus the unused-module warnings."""
    uf = builder.uf
    roots = uf.roots()
    fixed_roots = _fixed_roots(uf, roots)
    code, sets, layer_of = _producers_of(uf, roots)
    names, order, run_root, run_axis, run_start, run_stop, positions = _runs(builder.axes, roots)
    partitions = _group_partitions(builder.grouped, roots, fixed_roots, code, sets, order)
    unit_code = code[order]  # every root, in the order of its first slot
    fixed_here = np.zeros(len(roots), dtype=bool)
    if fixed_roots:
        fixed_here[np.fromiter(fixed_roots, dtype=np.int64, count=len(fixed_roots))] = True
    fixed_here = fixed_here[order]
    keep = (unit_code >= 0) & ~fixed_here
    fixed_reasons: dict[str, str] = {}
    lost = np.flatnonzero((unit_code >= 0) & fixed_here)
    if len(lost):  # a producer of a fixed unit is fixed, for the reason of the first such unit
        _, at = np.unique(unit_code[lost], return_index=True)
        for i in lost[np.sort(at)].tolist():
            for p in sets[unit_code[i]]:
                fixed_reasons.setdefault(p, fixed_roots[int(order[i])])
    kept_code, kept_root = unit_code[keep], order[keep]
    _, at = np.unique(kept_code, return_index=True)
    by_first = kept_code[np.sort(at)].tolist()  # producer sets in the order of their first unit
    layers = {c: tuple(sorted({layer_of[p] for p in sets[c]})) for c in by_first}
    layer_codes: dict[tuple[str, ...], int] = {}
    set_code = np.zeros(len(sets), dtype=np.int64)
    for c in by_first:
        set_code[c] = layer_codes.setdefault(layers[c], len(layer_codes))
    unit_producers = [layers[c] for c in kept_code.tolist()]
    kept_runs = keep[run_root]
    new_index = np.cumsum(keep) - 1
    units = UnitTable(kept_root, unit_producers, names, new_index[run_root[kept_runs]], run_axis[kept_runs],
                      run_start[kept_runs], run_stop[kept_runs], positions,
                      producer_codes=(set_code[kept_code], [frozenset(p) for p in layer_codes]))
    perm = np.lexsort((kept_root, kept_code))  # by producer set, roots ascending
    sorted_code = kept_code[perm]
    bounds = np.r_[0, np.flatnonzero(sorted_code[1:] != sorted_code[:-1]) + 1, len(perm)]
    members = {int(sorted_code[a]): kept_root[perm[a:b]].tolist() for a, b in zip(bounds[:-1], bounds[1:])
               if b > a}
    groups = [Group(",".join(sets[c]), sets[c], members[c], partitions.get(sets[c])) for c in by_first]
    used = builder.used
    for name, module in builder.modules.items():
        if name and name not in used and any(True for _ in module.parameters(recurse=False)) and not any(
            name.startswith(k + ".") for k in used
        ):
            builder.warnings.append(f"module {name} has parameters but is not used by forward on the example inputs")
    for slots in builder.axes.values():
        slots.setflags(write=False)
    return ChannelGraph(builder.axes, units, groups, fixed_reasons, builder.warnings)
