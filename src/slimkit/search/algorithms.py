"""The two searches over per-layer choices: a NetAdapt-style greedy loop and an evolutionary search.

Both score a choice with the sensitivity table (the sum over knobs of the output KL of each
knob's setting alone: an additive proxy for the accuracy lost, the same reading HAQ and
HAWQ use; ties by the summed accuracy drop) and with the budget metric predicted for it
(``predict(choice)``: exact for size, MACs and energy, the latency table for latency).

- :func:`greedy_moves` proposes one NetAdapt step (Yang et al. 2018): from the current
  choice, the metric must fall by ``step`` (a fixed share of the baseline's value); every
  knob's next notch is ranked by added KL per unit of metric saved (the least sensitive
  change first) and the ``k``-th proposal starts from the ``k``-th best notch and adds the
  next best ones until the step is reached. The caller fine-tunes each proposal briefly
  (trials) and keeps the best.
- :func:`evolve` runs a seeded genetic search (uniform crossover, one-notch mutations, an
  elite half kept) over whole choices, infeasible ones penalised by their excess over the
  target, as in the evolutionary searches of once-for-all networks (Cai et al. 2020).
- :func:`back_off` takes the winner the other way: it undoes its most accuracy-costly notches
  one at a time while the *measured* metric stays within the target, so the model uses the
  budget it is given instead of the margin its coarse steps and predicted metric left.
- :func:`select_trial` picks the search's result among its fine-tuned trials: the most
  accurate on validation whose *measured* metric is within the target. A model the search
  only measured (a back-off step) is never chosen on its sensitivity score alone: it must
  win a trial, so the result is never a choice some measured-and-trialed one (a uniform
  ratio, say) dominates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from slimkit.search.space import Choice, Knob

Table = dict[str, dict[str, dict[str, float]]]


def score(knobs: Sequence[Knob], table: Table, choice: Choice) -> tuple[float, float]:
    """(summed KL, summed drop) of the settings in ``choice`` (identity settings add 0)."""
    kl = drop = 0.0
    for knob, index in zip(knobs, choice, strict=True):
        if index:
            cell = table[knob.id][str(knob.settings[index])]
            kl += cell["kl"]
            drop += max(cell["drop"], 0.0)
    return kl, drop


def _notch(choice: Choice, i: int) -> Choice:
    return tuple(c + 1 if j == i else c for j, c in enumerate(choice))


def greedy_moves(knobs: Sequence[Knob], table: Table, choice: Choice, predict: Callable[[Choice], float],
                 goal: float, k: int) -> list[Choice]:
    """Up to ``k`` distinct choices from ``choice`` whose predicted metric is at most ``goal`` (or as close as
    the knobs allow), each built from the least sensitive notches; see the module docstring."""
    now = predict(choice)
    base_kl, base_drop = score(knobs, table, choice)
    ranked = []
    for i, knob in enumerate(knobs):
        if choice[i] + 1 >= len(knob.settings):
            continue
        nxt = _notch(choice, i)
        saved = now - predict(nxt)
        if saved <= 0:
            continue
        kl, drop = score(knobs, table, nxt)
        ranked.append(((kl - base_kl) / saved, (drop - base_drop) / saved, i))
    ranked.sort()
    moves: list[Choice] = []
    for start in range(min(k, len(ranked))):
        move = _notch(choice, ranked[start][2])
        used = {ranked[start][2]}
        for _, _, i in ranked:
            if predict(move) <= goal:
                break
            if i in used or move[i] + 1 >= len(knobs[i].settings):
                continue
            move = _notch(move, i)
            used.add(i)
        if move not in moves:
            moves.append(move)
    return moves


def evolve(knobs: Sequence[Knob], table: Table, predict: Callable[[Choice], float], target: float, seed: int,
           population: int = 16, generations: int = 8, seeds: Sequence[Choice] = (), keep: int = 3) -> list[Choice]:
    """The ``keep`` best distinct feasible choices (predicted metric <= ``target``) by score, best first.

    ``seeds`` join the first population (e.g. the greedy loop's result). Deterministic for a ``seed``.
    """
    rng = np.random.default_rng(seed)
    sizes = [len(k.settings) for k in knobs]

    def fitness(choice: Choice) -> tuple[float, float]:
        kl, drop = score(knobs, table, choice)
        excess = max(predict(choice) / target - 1.0, 0.0)
        return kl + 1e3 * excess, drop + 1e3 * excess

    def random_choice() -> Choice:
        strength = rng.uniform(0.2, 0.9)
        return tuple(int(rng.integers(1, n)) if rng.random() < strength else 0 for n in sizes)

    pool = list(dict.fromkeys([*seeds, *(random_choice() for _ in range(population))]))[:population]
    while len(pool) < population:
        pool.append(random_choice())
    seen: dict[Choice, tuple[float, float]] = {}
    for _ in range(generations):
        for c in pool:
            if c not in seen:
                seen[c] = fitness(c)
        pool.sort(key=lambda c: seen[c])
        elite = pool[: max(2, population // 2)]
        children = []
        while len(elite) + len(children) < population:
            a, b = (elite[i] for i in rng.choice(len(elite), size=2, replace=False))
            child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
            for i, n in enumerate(sizes):
                if rng.random() < 1.5 / len(sizes):
                    child[i] = int(np.clip(child[i] + rng.choice((-1, 1)), 0, n - 1))
            children.append(tuple(child))
        pool = elite + children
    for c in pool:
        if c not in seen:
            seen[c] = fitness(c)
    feasible = sorted((c for c in seen if predict(c) <= target), key=lambda c: seen[c])
    return feasible[:keep]


def back_off(knobs: Sequence[Knob], table: Table, choice: Choice, measure: Callable[[Choice], float],
             target: float, predict: Callable[[Choice], float] | None = None, max_measurements: int = 12,
             slack: float = 0.15) -> tuple[Choice, list[dict]]:
    """Relax ``choice`` one notch at a time while its *measured* metric stays within ``target``.

    A searched winner usually lands below its budget (its steps are coarse, its metric
    predicted): the latency it leaves unused is accuracy given away. Each round ranks the
    notches that can be undone (a knob one setting back toward the identity) by the summed
    KL they remove, the most accuracy-costly first, skips those ``predict`` puts above
    ``target * (1 + slack)``, measures the others in that order (``measure(choice)``, end to
    end), and keeps the first whose measurement is within ``target``; it stops when no
    notch fits or after ``max_measurements`` measurements. Returns the relaxed choice
    (``choice`` itself when ``measure(choice)`` already exceeds ``target`` or nothing fits)
    and one record per measurement: ``{"choice", "knob", "measured", "accepted"}``.
    """
    steps: list[dict] = []
    if measure(choice) > target:
        return choice, steps
    current, spent = choice, 0
    while spent < max_measurements:
        kl_now = score(knobs, table, current)[0]
        undo = []
        for i, index in enumerate(current):
            if index:
                relaxed = tuple(c - 1 if j == i else c for j, c in enumerate(current))
                undo.append((kl_now - score(knobs, table, relaxed)[0], i, relaxed))
        undo.sort(key=lambda u: (-u[0], u[1]))
        accepted = None
        for _, i, relaxed in undo:
            if spent >= max_measurements:
                break
            if predict is not None and predict(relaxed) > target * (1 + slack):
                continue
            value = measure(relaxed)
            spent += 1
            steps.append({"choice": list(relaxed), "knob": knobs[i].id, "measured": value,
                          "accepted": value <= target})
            if value <= target:
                accepted = relaxed
                break
        if accepted is None:
            break
        current = accepted
    return current, steps


def select_trial(trials: Sequence[dict], target: float) -> dict:
    """The trial a search ends with: among those whose ``measured`` metric is at most ``target``, the highest
    ``val_accuracy`` (ties: the lower metric, then the earlier trial); when none fits, the lowest metric.

    ``trials``: dicts with at least ``val_accuracy`` (%) and ``measured`` (the budget metric, end to end).
    """
    if not trials:
        raise ValueError("select_trial: no trials")
    fits = [(i, t) for i, t in enumerate(trials) if t["measured"] <= target]
    if not fits:
        return min(trials, key=lambda t: t["measured"])
    return max(fits, key=lambda it: (it[1]["val_accuracy"], -it[1]["measured"], -it[0]))[1]


def pick_finalists(trials: Sequence[dict], target: float, count: int) -> list[dict]:
    """The trials a search fine-tunes again before it chooses: the ``count`` best by :func:`select_trial`'s order
    among those whose ``measured`` metric is at most ``target``, and the best ``uniform`` trial within it when
    it is not among them (so the choice is never one a trialed uniform ratio beats). Empty when none fits."""
    fits = [(i, t) for i, t in enumerate(trials) if t["measured"] <= target]
    ranked = [t for _, t in sorted(fits, key=lambda it: (-it[1]["val_accuracy"], it[1]["measured"], it[0]))]
    chosen = ranked[:count]
    uniform = next((t for t in ranked if t.get("source") == "uniform"), None)
    if uniform is not None and all(t is not uniform for t in chosen):
        chosen.append(uniform)
    return chosen
