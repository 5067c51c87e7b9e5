"""Fisher pruning of channels (Theis, Korshunova, Tejani & Huszar 2018, "Faster gaze prediction
with dense networks and Fisher pruning"), registered as the channel criterion ``fisher``.

A binary mask ``m_c`` multiplies channel ``c``'s activation ``a_nc`` (``[N, C, H, W]``).
Removing the channel (``m_c: 1 -> 0``) raises the loss by about ``0.5 * F_c``, with the Fisher
information of the mask as the Hessian:

    Delta_c = 1 / (2N) * sum_n g_nc ** 2,   g_nc = sum_{h,w} a_nchw * d l_n / d a_nchw

(``l_n``: the cross-entropy of sample ``n``, so ``g_nc = d l_n / d m_c``). The masks are
per-sample ones ``[N, C]`` on the outputs of the unit's BatchNorm layers (its producers when
it has none), so ``g_nc`` is read off as the mask's gradient; a unit that spans several
layers (a residual stream) sums the ``g_nc`` of all of them before squaring, as one shared
mask would. The paper also subtracts ``beta`` x the FLOPs a channel costs; slimkit's
``target: macs`` covers that trade-off instead. Pruning with knowledge transfer from a
teacher, as the paper trains, is the recipe ``fisher-kd`` (a ``structured`` stage with
``criterion: fisher`` whose fine-tune distills from the baseline).

>>> import torch
>>> from torch import nn
>>> from slimkit.prune.graph import build_graph
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
>>> x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
>>> g = build_graph(net, x[:1])
>>> scores = fisher(net, g, ScoreContext(batches=[(x, y)]))
>>> len(scores), all(v >= 0 for v in scores.values())
(4, True)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.prune.criteria import CRITERIA, DATA_CRITERIA, ScoreContext
from slimkit.prune.graph import ChannelGraph

_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)


def _mask_sites(model: nn.Module, graph: ChannelGraph) -> dict[int, list[tuple[str, Any]]]:
    """Per unit: ``(module name, channel indices)`` of the outputs its mask multiplies."""
    modules = dict(model.named_modules())
    sites: dict[int, list[tuple[str, Any]]] = {}
    for uid, unit in graph.units.items():
        outs = [(n, torch.tensor(idx.tolist())) for (n, role), idx in unit.members.items() if role == "out"]
        bns = [(n, idx) for n, idx in outs if isinstance(modules[n], nn.modules.batchnorm._BatchNorm)]
        sites[uid] = bns or [(n, idx) for n, idx in outs if n in unit.producers and isinstance(modules[n], _PRODUCERS)]
    return sites


def _batches(ctx: ScoreContext, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if ctx.batches is not None:
        batches = list(ctx.batches)
        if batches:
            return batches
    if ctx.example_inputs is None:
        raise ValueError("criterion fisher needs example inputs or batches of (inputs, targets)")
    x = ctx.example_inputs.to(next(model.parameters()).device)
    with torch.no_grad():
        return [(x, model(x).argmax(1))]


@CRITERIA.register("fisher")
def fisher(model: nn.Module, graph: ChannelGraph, ctx: ScoreContext) -> dict[int, float]:
    """Theis 2018's ``Delta_c = sum_n g_nc^2 / (2N)`` per unit (see the module docstring).

    Uses ``ctx.batches`` of (inputs, targets), else ``ctx.example_inputs`` with the model's
    own predictions as targets. The model's gradients and training mode are left as they were.
    """
    modules = dict(model.named_modules())
    sites = _mask_sites(model, graph)
    names = sorted({n for unit_sites in sites.values() for n, _ in unit_sites})
    was_training = model.training
    model.eval()
    batches = _batches(ctx, model)
    saved = {id(p): p.grad for p in model.parameters()}
    masks: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def run(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            mask = torch.ones(out.shape[0], out.shape[1], dtype=out.dtype, device=out.device, requires_grad=True)
            masks[name] = mask
            return out * mask.view(*mask.shape, *([1] * (out.dim() - 2)))
        return run

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    total: dict[int, float] = defaultdict(float)
    count = 0
    try:
        device = next(model.parameters()).device
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            masks.clear()
            loss = F.cross_entropy(model(x), y, reduction="sum")  # d(sum l_n)/d m[n] = d l_n / d m[n]
            grads = dict(zip(masks, torch.autograd.grad(loss, list(masks.values()), allow_unused=True), strict=True))
            for uid, unit_sites in sites.items():
                g = sum(grads[n][:, idx.to(grads[n].device)].sum(1) for n, idx in unit_sites
                        if grads.get(n) is not None)
                if isinstance(g, torch.Tensor):
                    total[uid] += float(g.double().pow(2).sum())
            count += len(x)
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = saved[id(p)]
        model.train(was_training)
    return {uid: (total[uid] / (2 * count) if sites[uid] else float("nan")) for uid in graph.units}


DATA_CRITERIA.add("fisher")
