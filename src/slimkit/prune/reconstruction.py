"""Channel pruning by next-layer reconstruction: ThiNet and LASSO selection, least-squares refit.

Channels (units of the channel graph, :mod:`slimkit.prune.graph`) are chosen from the
statistics of the layers that *consume* them, and those layers are then refitted, so that
the consumers' outputs stay close to the original model's.

For a group and each consumer ``k`` (a Conv2d with ``groups == 1`` or a Linear that reads the
group's channels), sample ``M`` input rows ``P_k`` (``[M, F]``: unfolded patches at
``positions`` random output locations per image, or a Linear's input rows) from the model
being pruned, and the target outputs ``T_k`` (``[M, out]``) of the *original* model at the
same places (He 2017: inputs from the pruned model, outputs of the original, so that errors
do not accumulate from layer to layer). Unit ``u`` contributes ``Z_ku = P_k[:, cols(u)] W_k[:, cols(u)]^T``.
Keeping the set ``S`` leaves the relative error, summed over the consumers,

    E(S) = sum_k || T_k - Z_k,rest - sum_{u in S} Z_ku ||^2 / ||T_k||^2

(``Z_k,rest``: the consumer's inputs outside the group). Everything is computed from the
Gram matrices ``P^T P`` and ``W^T W`` (``[F, F]``), never from the ``Z`` themselves.

- ``thinet`` (Luo, Wu & Lin 2017, "ThiNet: A Filter Level Pruning Method for Deep Neural
  Network Compression"): greedy: remove, one at a time, the unit whose removal raises
  ``E`` least (ThiNet's ``argmin ||sum_{j in T} x_j||^2`` when inputs equal the original's);
- ``lasso`` (He, Zhang & Sun 2017, "Channel Pruning for Accelerating Very Deep Neural
  Networks"): ``min_beta E(beta) + lam * ||beta||_1`` over channel coefficients ``beta``
  (``Z_u`` normalised to unit norm, the paper's ``||W_i||_F = 1``), solved by FISTA, with
  ``lam`` bisected until at most the wanted number of units have ``beta != 0``; the kept
  units are the largest ``|beta|``. Multi-branch groups (a residual stream read by several
  blocks) sum the error over every consumer, as the paper's multi-branch extension does;
- any channel criterion of :data:`slimkit.prune.criteria.CRITERIA` (``l1``, ``sparsity_gamma``,
  ...): keep its highest-scored units, for a comparison at the same channel count.

Refit (``refit: true``): every consumer's remaining weights are set to the least-squares
solution ``W_K^T = (P_K^T P_K + eps I)^-1 P_K^T T`` (``eps = ridge * mean diag``; exact with
``ridge: 0`` when ``P_K`` has full column rank), biases unchanged. Groups are pruned one after
another (the graph rebuilt after each), each keeping ``n - floor(ratio * n)`` of its ``n``
units (at least ``1 - max_layer_ratio``).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
>>> xs = [torch.randn(16, 1, 10, 10)]
>>> report = reconstruct_prune_(net, xs[0][:1], {"method": "thinet", "ratio": 0.5, "ignore": ["2"]}, batches=xs)
>>> net[0].out_channels, net[2].in_channels, report.groups[0]["error_refit"] <= report.groups[0]["error_selected"]
(4, 4, True)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from slimkit.config import Config
from slimkit.prune.common import Batch, inputs_of, size_of, trace_input
from slimkit.prune.criteria import CRITERIA, ScoreContext
from slimkit.prune.graph import ChannelGraph, Group, build_graph
from slimkit.prune.surgery import prune_units_, removals_for
from slimkit.registry import Registry
from slimkit.reports import Report
from slimkit.selection import classifier_name, matches


@dataclass
class Stats:
    """Second-order statistics of one group over its consumers (float64, units in ``ids`` order).

    ``G[u, v] = sum_k <Z_ku, Z_kv> / ||T_k||^2``, ``r[u] = sum_k <T_k - Z_k,rest, Z_ku> / ||T_k||^2``,
    ``base = sum_k ||T_k - Z_k,rest||^2 / ||T_k||^2``: ``E(S) = base - 2 r_S + G_SS``.
    """

    ids: list[int]
    G: torch.Tensor
    r: torch.Tensor
    base: float

    def error(self, keep: Sequence[int]) -> float:
        """``E(S)`` of the kept unit ids."""
        pos = torch.tensor([self.ids.index(u) for u in keep], dtype=torch.long)
        return float(self.base - 2 * self.r[pos].sum() + self.G[pos][:, pos].sum())


@dataclass(kw_only=True)
class ReconstructionReport(Report):
    """What :func:`reconstruct_prune_` did: ``groups`` has one row per pruned group.

    A row: ``group``, unit counts ``before`` / ``after``, its ``consumers``, and the relative
    reconstruction errors ``error_all`` (all units kept), ``error_selected`` (kept units, old
    weights) and, with ``refit``, ``error_refit`` (after the least-squares refit).
    """

    method: str
    ratio: float
    refit: bool
    groups: list[dict[str, Any]] = field(default_factory=list)


Selector = Callable[[Stats, int], list[int]]
SELECTORS: Registry[Selector] = Registry("reconstruction selector")


class ReconstructionConfig(Config):
    """Settings of :func:`reconstruct_prune_` and of the recipe stage ``reconstruct``."""

    method: str = "thinet"
    ratio: float = Field(0.5, ge=0, lt=1, description="fraction of each selected group's channel units to remove")
    layers: tuple[str, ...] = Field(("*",), description="a group is pruned when one of its producers matches")
    ignore: tuple[str, ...] | None = Field(None, description="default: the classifier")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1)
    positions: int = Field(10, ge=1, description="sampled output locations per image of a conv consumer")
    refit: bool = True
    ridge: float = Field(1e-3, ge=0, description="least-squares damping, relative to the mean diagonal")
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        if value.lower() not in SELECTORS.names():
            CRITERIA.get(value)  # UnknownNameError listing the criteria
        return value.lower()


@SELECTORS.register("thinet")
def thinet_select(stats: Stats, keep: int) -> list[int]:
    """Greedy removal (Luo 2017): drop the unit whose removal raises ``E`` least, until ``keep`` remain."""
    n = len(stats.ids)
    alive = torch.ones(n, dtype=torch.bool)
    g_s = stats.G.sum(1)  # (G 1_S)_u
    diag = torch.diagonal(stats.G)
    for _ in range(n - keep):
        # E(S \ {u}) - E(S) = 2 r_u - 2 (G 1_S)_u + G_uu
        delta = (2 * stats.r - 2 * g_s + diag).masked_fill(~alive, math.inf)
        u = int(torch.argmin(delta))
        alive[u] = False
        g_s -= stats.G[:, u]
    return [stats.ids[i] for i in alive.nonzero().flatten().tolist()]


def _fista(G: torch.Tensor, r: torch.Tensor, lam: float, lip: float, start: torch.Tensor | None = None,
           steps: int = 200, tol: float = 1e-6) -> torch.Tensor:
    """``argmin_b b^T G b - 2 r^T b + lam ||b||_1`` by FISTA (Beck & Teboulle 2009); ``lip = 2 max eig G``.

    Starts from ``start`` (a neighbouring ``lam``'s solution) and stops once no coefficient moves by ``tol``.
    """
    b = z = torch.zeros_like(r) if start is None else start.clone()
    t = 1.0
    for _ in range(steps):
        grad = 2 * (G @ z - r)
        v = z - grad / lip
        nb = torch.sign(v) * (v.abs() - lam / lip).clamp_min(0)
        nt = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = nb + (t - 1) / nt * (nb - b)
        done = float((nb - b).abs().max()) < tol
        b, t = nb, nt
        if done:
            break
    return b


@SELECTORS.register("lasso")
def lasso_select(stats: Stats, keep: int) -> list[int]:
    """He 2017: bisect ``lam`` until at most ``keep`` coefficients are non-zero; keep the largest ``|beta|``."""
    d = torch.diagonal(stats.G).clamp_min(1e-30).sqrt()
    G = stats.G / d[:, None] / d[None, :]
    r = stats.r / d
    lo, hi = 0.0, 2 * float(r.abs().max()) + 1e-12  # at hi every beta is 0
    lip = 2 * float(torch.linalg.eigvalsh(G).max().clamp_min(1e-12))
    best = dense = _fista(G, r, lo, lip)
    for _ in range(16):
        mid = (lo + hi) / 2
        beta = _fista(G, r, mid, lip, start=dense)
        if int((beta != 0).sum()) <= keep:
            hi, best = mid, beta
        else:
            lo, dense = mid, beta
    order = sorted(range(len(stats.ids)), key=lambda i: (-float(best[i].abs()), i))
    return sorted(stats.ids[i] for i in order[:keep])


# -- statistics -------------------------------------------------------------------------


def _consumers(graph: ChannelGraph, group: Group, modules: dict[str, nn.Module]) -> tuple[list[str], str | None]:
    """Consumer layers of the group's units, or a reason why the group cannot be reconstructed."""
    names = []
    for uid in group.units:
        for (name, role), _ in graph.units[uid].members.items():
            if role != "in":
                continue
            m = modules[name]
            if isinstance(m, nn.Conv2d) and m.groups == 1 or isinstance(m, nn.Linear):
                if name not in names:
                    names.append(name)
            else:
                return [], f"consumer {name} ({type(m).__name__}) cannot be refitted"
    if not names:
        return [], "no Conv2d/Linear consumer"
    return names, None


def _rows(module: nn.Module, x: torch.Tensor, positions: int, gen: torch.Generator) -> torch.Tensor:
    """Input rows ``[M, F]``: a Linear's inputs, or ``positions`` unfolded patches per image of a conv."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    n, f, length = cols.shape
    pick = torch.randint(0, length, (n, min(positions, length)), generator=gen).to(cols.device)
    return torch.gather(cols, 2, pick[:, None, :].expand(n, f, pick.shape[1])).transpose(1, 2).reshape(-1, f)


def _weight2d(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().reshape(module.weight.shape[0], -1).double().cpu()


@torch.no_grad()
def _capture(model: nn.Module, reference: nn.Module, names: list[str], inputs: Sequence[torch.Tensor],
             positions: int, seed: int, outputs: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Per consumer: ``Q = P^T P``, ``B = P^T T`` and ``||T||^2`` (``T`` from ``reference``).

    ``outputs[name]``: the reference's output channels the layer still has (earlier cuts).
    """
    mods, refs = dict(model.named_modules()), dict(reference.named_modules())
    def hook(store: dict, name: str, gen_seed: int):
        def run(m: nn.Module, args: tuple, _out: Any) -> None:
            gen = torch.Generator().manual_seed(gen_seed)
            store[name] = _rows(m, args[0].detach(), positions, gen).double()
        return run

    out: dict[str, list] = {n: [0, 0, 0] for n in names}
    device = next(model.parameters()).device
    reference.to(device)
    for b, x in enumerate(inputs):
        x = x.to(device)
        cur, ref = {}, {}
        handles = []
        for i, n in enumerate(names):
            s = seed * 7919 + b * 104729 + i
            handles.append(mods[n].register_forward_hook(hook(cur, n, s)))
            handles.append(refs[n].register_forward_hook(hook(ref, n, s)))
        try:
            model(x)
            reference(x)
        finally:
            for h in handles:
                h.remove()
        for n in names:
            m = mods[n]
            alive = torch.as_tensor(outputs[n], dtype=torch.long) if n in outputs else slice(None)
            t = ref[n].cpu() @ _weight2d(refs[n])[alive].T
            if refs[n].bias is not None:
                t = t + refs[n].bias.detach().double().cpu()[alive]
            if m.bias is not None:
                t = t - m.bias.detach().double().cpu()
            p = cur[n].cpu()
            acc = out[n]
            acc[0] = acc[0] + p.T @ p
            acc[1] = acc[1] + p.T @ t
            acc[2] += float((t * t).sum())
    return {n: (q, bt, tt) for n, (q, bt, tt) in out.items()}


def _columns(module: nn.Module, in_idx: np.ndarray) -> np.ndarray:
    """Columns of the ``[out, F]`` weight matrix that the input channels/features ``in_idx`` occupy."""
    if isinstance(module, nn.Linear):
        return in_idx
    k = int(np.prod(module.kernel_size))
    return (in_idx[:, None] * k + np.arange(k)[None, :]).reshape(-1)


def group_stats(model: nn.Module, graph: ChannelGraph, group: Group, consumers: list[str],
                captured: dict[str, tuple]) -> Stats:
    """The :class:`Stats` of ``group`` from the captured consumer statistics."""
    modules = dict(model.named_modules())
    n = len(group.units)
    G = torch.zeros(n, n, dtype=torch.float64)
    r = torch.zeros(n, dtype=torch.float64)
    base = 0.0
    for k in consumers:
        m = modules[k]
        q, b, tt = captured[k]
        w = _weight2d(m)  # [out, F]
        owner = torch.full((w.shape[1],), n, dtype=torch.long)  # n: columns outside the group ("rest")
        for i, uid in enumerate(group.units):
            idx = graph.units[uid].members.get((k, "in"))
            if idx is not None:
                owner[torch.as_tensor(_columns(m, np.array(idx)))] = i
        onehot = F.one_hot(owner, n + 1).double()  # [F, n+1]
        ge = onehot.T @ (q * (w.T @ w)) @ onehot  # <Z_a, Z_b> for a, b in units + rest
        re = onehot.T @ (b * w.T).sum(1)  # <T, Z_a>
        scale = 1.0 / max(tt, 1e-30)
        G += ge[:n, :n] * scale
        r += (re[:n] - ge[:n, n]) * scale
        base += (tt - 2 * re[n] + ge[n, n]) * scale
    return Stats(list(group.units), G, r, float(base))


def _refit(model: nn.Module, name: str, captured: tuple, kept_cols: np.ndarray, ridge: float) -> float:
    """Least-squares refit of consumer ``name`` on its kept columns; returns its relative residual."""
    m = dict(model.named_modules())[name]
    q, b, tt = captured
    keep = torch.as_tensor(kept_cols, dtype=torch.long)
    qk, bk = q[keep][:, keep], b[keep]
    eps = ridge * float(torch.diagonal(qk).mean()) if ridge > 0 else 0.0
    a = qk + eps * torch.eye(len(keep), dtype=torch.float64)
    try:
        x = torch.linalg.solve(a, bk)
    except RuntimeError:  # singular without damping: minimum-norm least squares
        x = torch.linalg.lstsq(a, bk, driver="gelsd").solution
    with torch.no_grad():
        m.weight.copy_(x.T.reshape(m.weight.shape).to(m.weight.dtype))
    residual = tt - 2 * float((x * bk).sum()) + float((x * (qk @ x)).sum())
    return max(residual, 0.0) / max(tt, 1e-30)


def _select(cfg: ReconstructionConfig, model: nn.Module, graph: ChannelGraph, group: Group, stats: Stats,
            keep: int, inputs: Sequence[torch.Tensor]) -> list[int]:
    if cfg.method in SELECTORS.names():
        return SELECTORS.get(cfg.method)(stats, keep)
    scores = CRITERIA.get(cfg.method)(model, graph, ScoreContext(inputs[0], None, cfg.seed))
    order = sorted(group.units, key=lambda u: (-scores[u], u))
    return sorted(order[:keep])


def reconstruct_prune_(model: nn.Module, example_inputs: Any, config: ReconstructionConfig | dict | None = None, *,
                       batches: Iterable[Batch]) -> ReconstructionReport:
    """Prune the channels of ``model`` group by group with reconstruction; returns a :class:`ReconstructionReport`.

    ``example_inputs``: one batch (a tensor or a tuple of tensors) to trace the model.
    ``batches``: model inputs (``[N, C, H, W]``, or ``(inputs, targets)`` pairs: the targets
    are not used) the statistics are sampled on. Per group the report gives the unit counts
    and the relative reconstruction error of the kept units before (``error_selected``) and
    after (``error_refit``) the least-squares refit, and the error of keeping all units
    (``error_all``, 0 for the first group).
    """
    cfg = ReconstructionConfig.coerce(config, where="reconstruct")
    inputs = inputs_of(batches, "reconstruct")
    example_inputs = trace_input(model, example_inputs)
    size_before = size_of(model, example_inputs)
    reference = copy.deepcopy(model).eval()
    was_training = model.training
    model.eval()
    ignore = cfg.ignore if cfg.ignore is not None else (classifier_name(model),)
    graph = build_graph(model, example_inputs)
    skipped: dict[str, str] = {}
    names = []
    for g in graph.groups:
        if not any(matches(p, cfg.layers) for p in g.producers):
            skipped[g.name] = "not selected by layers"
        elif any(matches(p, ignore) for p in g.producers):
            skipped[g.name] = "ignored"
        else:
            names.append(g.name)
    rows = []
    changed: dict[str, None] = {}  # edited layers, in order
    outputs: dict[str, np.ndarray] = {}  # layer -> its remaining output channels, as the reference numbers them
    for name in names:
        graph = build_graph(model, example_inputs)
        modules = dict(model.named_modules())
        group = next((g for g in graph.groups if g.name == name), None)
        if group is None:
            skipped[name] = "group changed by an earlier cut"
            continue
        if group.partitions:
            skipped[name] = "reaches a grouped convolution"
            continue
        consumers, reason = _consumers(graph, group, modules)
        if reason:
            skipped[name] = reason
            continue
        n = len(group.units)
        keep = max(n - int(math.floor(cfg.ratio * n + 1e-9)), max(1, math.ceil(n * (1 - cfg.max_layer_ratio) - 1e-9)))
        if keep >= n:
            continue
        captured = _capture(model, reference, consumers, inputs, cfg.positions, cfg.seed, outputs)
        stats = group_stats(model, graph, group, consumers, captured)
        kept = _select(cfg, model, graph, group, stats, keep, inputs)
        removed = [u for u in group.units if u not in set(kept)]
        row = {"group": name, "before": n, "after": len(kept), "consumers": consumers,
               "error_all": round(stats.error(group.units), 6), "error_selected": round(stats.error(kept), 6)}
        kept_cols = {}
        for k in consumers:
            m = modules[k]
            drop = set()
            for u in removed:
                idx = graph.units[u].members.get((k, "in"))
                if idx is not None:
                    drop.update(_columns(m, np.asarray(idx)).tolist())
            kept_cols[k] = np.array([c for c in range(_weight2d(m).shape[1]) if c not in drop])
        for (layer, role), drop in removals_for(graph, removed).items():
            if role == "out":
                before = outputs.get(layer, np.arange(modules[layer].weight.shape[0]))
                outputs[layer] = np.delete(before, drop)
        changed.update(dict.fromkeys(row["layer"] for row in prune_units_(model, graph, removed)))
        if cfg.refit:
            residuals = [_refit(model, k, captured[k], kept_cols[k], cfg.ridge) for k in consumers]
            row["error_refit"] = round(float(sum(residuals)), 6)
        rows.append(row)
    model.train(was_training)
    return ReconstructionReport(verb="reconstruct_prune_", changed=list(changed), skipped=skipped,
                                before=size_before, after=size_of(model, example_inputs), method=cfg.method,
                                ratio=cfg.ratio, refit=cfg.refit, groups=rows)
