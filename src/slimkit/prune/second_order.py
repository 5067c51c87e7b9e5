"""Second-order unstructured pruning: Optimal Brain Damage and layer-wise Optimal Brain Surgeon.

**OBD** (LeCun, Denker & Solla 1990, "Optimal Brain Damage"): with a quadratic model of the
loss around a trained minimum and the off-diagonal Hessian terms dropped, deleting weight
``i`` raises the loss by the saliency

    s_i = 0.5 * h_ii * w_i ** 2

where ``h_ii = d2 L / d w_i2``. :func:`hessian_diagonal` gives ``h_ii`` three ways:

- ``fisher`` (default): the empirical Fisher ``h_ii ~ (1/N) sum_n (d l_n / d w_i) ** 2``
  over ``N`` samples (per-sample gradients of the cross-entropy ``l_n``), the squared-gradient
  approximation of the Hessian at a minimum;
- ``exact``: the exact diagonal of the Hessian of the mean loss by double backward, one
  Hessian-vector product per weight (only for tiny models: at most ``EXACT_LIMIT`` weights);
- ``hutchinson``: the unbiased estimate ``diag(H) ~ mean_k z_k * (H z_k)`` with Rademacher
  probes ``z_k`` (Bekas, Kokiopoulou & Saad 2007), one Hessian-vector product per probe.

**L-OBS** (Dong, Chen & Pan 2017, "Learning to Prune Deep Neural Networks via Layer-wise
Optimal Brain Surgeon"): for one layer with inputs ``x`` (a Linear layer's input rows, or a
conv layer's unfolded patches, ``[M, fan_in]``) the layer-wise error of weights ``w'`` of an
output row is ``0.5 * (w' - w)^T H (w' - w)`` with ``H = (1/M) sum x x^T`` (plus
``damp * mean(diag H)`` on the diagonal). Deleting weight ``q`` costs

    L_q = w_q ** 2 / (2 * [H^-1]_qq)

(Hassibi & Stork 1993, "Second order derivatives for network pruning: Optimal Brain
Surgeon") and the surgeon's update of the other weights is ``dw = -(w_q / [H^-1]_qq) H^-1 e_q``.
Here every row loses its lowest-``L_q`` weights in ``rounds`` steps (kept fraction shrinking
geometrically); after each step the kept weights ``K`` of a row are set to the exact optimum
of the layer-wise error with all pruned weights at zero, ``w_K = H_KK^-1 H_K: w`` -- the
surgeon's update for removing the whole pruned set at once (Hassibi's multi-weight form),
measured against the *original* weights ``w`` so that errors do not accumulate. Each layer is
pruned independently from the inputs the unpruned model gives it, as in the paper.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
>>> x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
>>> s = obd_saliency(net, [(x, y)], ["0", "2"], hessian="fisher")
>>> s["0"].shape, bool((s["2"] >= 0).all())
(torch.Size([4, 6]), True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimkit.config import Config
from slimkit.exceptions import ConfigError
from slimkit.prune.common import Batch, Scope, inputs_of, size_of
from slimkit.prune.magnitude import MagnitudeConfig, apply_computed_masks, compute_masks, layer_targets, mask_report
from slimkit.prune.masks import PRUNABLE, MaskReport, mask_of, set_mask
from slimkit.selection import select_modules

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
#: the exact Hessian diagonal costs one backward pass per weight: refused above this many weights
EXACT_LIMIT = 20_000


class OBDConfig(Config):
    """Settings of the ``obd`` stage and of :func:`obd_prune_`.

    ``rounds``: prune -> fine-tune ``round_epochs`` -> recompute saliencies, the kept fraction
    shrinking geometrically (LeCun 1990's procedure repeats exactly this).
    """

    sparsity: float = Field(..., ge=0, lt=1, description="fraction of the selected weights to delete")
    scope: Scope = "global"
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    hessian: Literal["fisher", "exact", "hutchinson"] = "fisher"
    samples: int = Field(256, ge=1, description="training samples the Hessian diagonal is estimated on")
    probes: int = Field(16, ge=1, description="hutchinson: Rademacher probes")
    rounds: int = Field(1, ge=1)
    round_epochs: int = Field(1, ge=0, description="fine-tune epochs between rounds (not after the last)")
    seed: int = 0


class LOBSConfig(Config):
    """Settings of the ``lobs`` stage and of :func:`lobs_prune_` (layer-wise sparsity targets)."""

    sparsity: float = Field(..., ge=0, lt=1, description="fraction of each selected layer's weights to delete")
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    samples: int = Field(256, ge=1, description="training samples whose layer inputs give H")
    damp: float = Field(1e-2, gt=0, description="H + damp * mean(diag H) * I, keeps H invertible")
    rounds: int = Field(4, ge=1, description="pruning steps per layer, saliencies recomputed after each refit")


def _weights(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    modules = dict(model.named_modules())
    return [modules[n].weight for n in names]


def _eval_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction=reduction)


def _fisher_diagonal(model: nn.Module, batches: Batches, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``(1/N) sum_n (d l_n/d w) ** 2`` per layer, per-sample gradients by ``torch.func`` (loop fallback)."""
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())
    keys = [f"{n}.weight" if n else "weight" for n in names]
    fixed = {k: v.detach() for k, v in params.items() if k not in keys}
    buffers = dict(model.named_buffers())
    total = {k: torch.zeros_like(params[k]) for k in keys}
    count = 0

    def sample_loss(chosen: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, ({**fixed, **chosen}, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    device = next(model.parameters()).device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        chosen = {k: params[k].detach() for k in keys}
        try:
            grads = per_sample(chosen, x, y)
            for k in keys:
                total[k] += grads[k].pow(2).sum(0)
        except RuntimeError:  # an op vmap cannot batch: one backward pass per sample
            for i in range(len(x)):
                g = torch.autograd.grad(_eval_loss(model, x[i:i + 1], y[i:i + 1]), [params[k] for k in keys])
                for k, gk in zip(keys, g, strict=True):
                    total[k] += gk.pow(2)
        count += len(x)
    if count == 0:
        raise ConfigError("obd: no samples to estimate the Hessian diagonal on; give batches of (inputs, targets)")
    return {n: total[k] / count for n, k in zip(names, keys, strict=True)}


def _mean_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    n = sum(len(x) for x, _ in batches)
    device = next(model.parameters()).device
    return sum(_eval_loss(model, x.to(device), y.to(device), "sum") for x, y in batches) / n


def _exact_diagonal(model: nn.Module, batches: list, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Exact ``d2 L/d w_i2`` of the mean loss: the i-th entry of ``H e_i`` for every weight."""
    weights = _weights(model, names)
    size = sum(w.numel() for w in weights)
    if size > EXACT_LIMIT:
        raise ConfigError(f"obd.hessian: 'exact' needs one backward pass per weight and the selection has {size} "
                          f"weights (limit {EXACT_LIMIT}); use hessian: fisher or hutchinson")
    grads = torch.autograd.grad(_mean_loss(model, batches), weights, create_graph=True)
    out = {}
    for name, w, g in zip(names, weights, grads, strict=True):
        flat = g.reshape(-1)
        diag = torch.empty(flat.numel(), device=w.device)
        for i in range(flat.numel()):
            diag[i] = torch.autograd.grad(flat[i], w, retain_graph=True)[0].reshape(-1)[i]
        out[name] = diag.view_as(w)
    return out


def _hutchinson_diagonal(model: nn.Module, batches: list, names: Sequence[str], probes: int,
                         seed: int) -> dict[str, torch.Tensor]:
    """``mean_k z_k * (H z_k)`` with Rademacher ``z_k`` (an unbiased estimate of the diagonal)."""
    weights = _weights(model, names)
    grads = torch.autograd.grad(_mean_loss(model, batches), weights, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    total = [torch.zeros_like(w) for w in weights]
    for _ in range(probes):
        zs = [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights]
        hz = torch.autograd.grad(grads, weights, grad_outputs=zs, retain_graph=True)
        for t, z, h in zip(total, zs, hz, strict=True):
            t += z * h
    return {n: t / probes for n, t in zip(names, total, strict=True)}


def hessian_diagonal(model: nn.Module, batches: Batches, names: Sequence[str],
                     hessian: str = "fisher", probes: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal of the loss Hessian w.r.t. the weights of the layers ``names`` (shaped like them).

    ``batches``: (inputs, targets) the cross-entropy is taken over; the model is evaluated in
    eval mode (BatchNorm statistics fixed) and its gradients and mode are left as they were.
    """
    batches = list(batches)
    was_training = model.training
    model.eval()
    saved = {id(p): p.grad for p in model.parameters()}
    try:
        if hessian == "fisher":
            diag = _fisher_diagonal(model, batches, names)
        elif hessian == "exact":
            diag = _exact_diagonal(model, batches, names)
        elif hessian == "hutchinson":
            diag = _hutchinson_diagonal(model, batches, names, probes, seed)
        else:
            raise ConfigError(f"obd.hessian must be one of fisher, exact, hutchinson (got {hessian!r})")
    finally:
        for p in model.parameters():
            p.grad = saved[id(p)]
        model.train(was_training)
    return {n: d.detach() for n, d in diag.items()}


def obd_saliency(model: nn.Module, batches: Batches, names: Sequence[str], hessian: str = "fisher",
                 probes: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """OBD saliency ``0.5 * h_ii * w_i ** 2`` per weight of each layer in ``names``."""
    diag = hessian_diagonal(model, batches, names, hessian, probes, seed)
    modules = dict(model.named_modules())
    return {n: 0.5 * diag[n] * modules[n].weight.detach() ** 2 for n in names}


def _magnitude_config(cfg: OBDConfig | LOBSConfig, sparsity: float, scope: str) -> MagnitudeConfig:
    return MagnitudeConfig(sparsity=sparsity, scope=scope, layers=cfg.layers, ignore=cfg.ignore)


def _pairs(batches: Iterable[Batch] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` as a list of (inputs, targets); ConfigError when empty or when a batch has no targets."""
    out = list(batches or ())
    if not out or any(isinstance(b, torch.Tensor) for b in out):
        raise ConfigError("obd: the Hessian diagonal needs batches=[(inputs, targets), ...] of training samples")
    return [(x, y) for x, y in out]


def obd_prune_(model: nn.Module, example_inputs: Any, config: OBDConfig | dict[str, Any], *,
               batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> MaskReport:
    """Mask the lowest-saliency weights of ``model`` in place (one OBD step); returns a MaskReport.

    ``example_inputs``: one batch (a tensor or a tuple of tensors) the sizes are measured on.
    ``batches``: ``(inputs, targets)`` the Hessian diagonal is estimated on. Weights already
    masked have saliency 0 and stay pruned. Adds ``weight_mask`` buffers.
    """
    cfg = OBDConfig.coerce(config, where="obd")
    batches = _pairs(batches)
    before = size_of(model, example_inputs)
    mcfg = _magnitude_config(cfg, cfg.sparsity, cfg.scope)
    names = list(layer_targets(model, mcfg))
    scores = obd_saliency(model, batches, names, cfg.hessian, cfg.probes, cfg.seed)
    table = apply_computed_masks(model, compute_masks(model, mcfg, 1.0, scores=scores))
    return mask_report("obd_prune_", model, example_inputs, before, table)


# -- layer-wise OBS ---------------------------------------------------------------------


def _layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows ``[M, fan_in]``: Linear inputs, or a conv's unfolded patches."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)  # [N, C*kh*kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise AssertionError(type(module))


@torch.no_grad()
def layer_hessians(model: nn.Module, names: Sequence[str], inputs: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``H = (1/M) sum x x^T`` of every layer's input rows (``[fan_in, fan_in]``), float64."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    handles = []

    def hook(name: str):
        def run(module: nn.Module, args: tuple, _out: Any) -> None:
            rows = _layer_rows(module, args[0].detach()).double()
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] += rows.shape[0]
        return run

    for n in names:
        handles.append(modules[n].register_forward_hook(hook(n)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for x in inputs:
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (sums[n] / counts[n]).cpu() for n in names}


def _refit_rows(w0: torch.Tensor, mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row: kept weights ``w_K = H_KK^-1 H_K: w0_row``, pruned ones 0 (float64 ``[rows, fan_in]``)."""
    out = torch.zeros_like(w0)
    hw = w0 @ h  # row r: (H w0_r)^T, H symmetric
    for r in range(w0.shape[0]):
        keep = mask[r].nonzero().flatten()
        if keep.numel():
            out[r, keep] = torch.linalg.solve(h[keep][:, keep], hw[r, keep])
    return out


def lobs_layer(weight: torch.Tensor, h: torch.Tensor, sparsity: float, damp: float = 1e-2,
               rounds: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """L-OBS of one layer: (new weight, mask), both shaped like ``weight`` ``[out, ...]``.

    ``h``: ``[fan_in, fan_in]`` input covariance. Exactly ``round(sparsity * fan_in)`` weights
    are deleted from every output row (the layer's sparsity is exactly ``sparsity`` when it
    divides evenly), the lowest ``L_q = w_q^2 / (2 [H^-1]_qq)`` first.
    """
    shape = weight.shape
    w0 = weight.detach().reshape(shape[0], -1).double().cpu()
    fan_in = w0.shape[1]
    h = h.double() + damp * torch.diagonal(h).mean().clamp_min(1e-12) * torch.eye(fan_in, dtype=torch.float64)
    hinv_diag = torch.diagonal(torch.linalg.inv(h))
    w, mask = w0.clone(), torch.ones_like(w0)
    target = round(sparsity * fan_in)
    for r in range(1, rounds + 1):
        prune = round(fan_in * (1 - (1 - sparsity) ** (r / rounds))) if r < rounds else target
        if prune <= int((mask[0] == 0).sum()):
            continue
        saliency = (w ** 2 / (2 * hinv_diag)).masked_fill(mask == 0, -1.0)  # pruned ones stay pruned
        order = torch.argsort(saliency, dim=1, stable=True)
        mask = torch.ones_like(w0)
        mask.scatter_(1, order[:, :prune], 0.0)
        w = _refit_rows(w0, mask, h)
    return w.to(weight.dtype).view(shape), mask.to(weight.dtype).view(shape)


def lobs_prune_(model: nn.Module, example_inputs: Any, config: LOBSConfig | dict[str, Any], *,
                batches: Iterable[Batch]) -> MaskReport:
    """L-OBS on every selected Conv2d (``groups == 1``) / Linear layer of ``model``, in place.

    ``example_inputs``: one batch (a tensor or a tuple of tensors) the sizes are measured on.
    ``batches``: model inputs (or ``(inputs, targets)`` pairs; the targets are not used) whose
    layer inputs give each ``H``. Sets ``weight_mask`` buffers and the refitted weights; the
    report's ``skipped`` names the grouped convs, whose rows do not share one input covariance.
    """
    cfg = LOBSConfig.coerce(config, where="lobs")
    inputs = inputs_of(batches, "lobs")
    before = size_of(model, example_inputs)
    selected = select_modules(model, PRUNABLE, cfg.layers, cfg.ignore, what="lobs.layers")
    skipped = {n: "grouped or 1-d convolution" for n, m in selected.items()
               if not isinstance(m, (nn.Linear, nn.Conv2d)) or getattr(m, "groups", 1) != 1}
    names = [n for n in selected if n not in skipped]
    if not names:
        raise ConfigError(f"lobs.layers: every selected layer is skipped ({skipped}); select Linear or Conv2d layers")
    hessians = layer_hessians(model, names, inputs)
    masks = {}
    for n in names:
        m = selected[n]
        new_w, mask = lobs_layer(m.weight, hessians[n], cfg.sparsity, cfg.damp, cfg.rounds)
        with torch.no_grad():
            m.weight.copy_(new_w)
        earlier = mask_of(m)
        if earlier is not None:  # an earlier mask stays in force
            mask = mask * earlier
        set_mask(m, mask)
        masks[n] = mask
    table = apply_computed_masks(model, masks)
    return mask_report("lobs_prune_", model, example_inputs, before, table, skipped)
