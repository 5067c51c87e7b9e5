"""CP decomposition of a kxk conv: 1x1 (C->R), kx1 depthwise, 1xk depthwise, 1x1 (R->N).

Lebedev et al. 2015, "Speeding-up convolutional neural networks using fine-tuned
CP-decomposition". The 4-way kernel ``W[N, C, kh, kw] ~ sum_r l_r a_r (x) b_r (x) y_r (x) x_r``
is fitted by alternating least squares (:func:`als`: float64 torch, SVD initialisation, a
small ridge term against the diverging-component degeneracy CP-ALS is known for; or, with
``cp_solver: tensorly``, tensorly's ``parafac`` with the same settings).
A fit that produces non-finite numbers, no better than the zero tensor, or degenerate
components (weights far larger than the kernel itself, cancelling each other) raises a
ConfigError naming the layer: lower the rank or raise ``cp_max_iter``.

tensorly is imported lazily, only by the tensorly solver.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from slimkit.decompose.geometry import make_conv, split_geometry
from slimkit.exceptions import ConfigError


def full_ranks(module: nn.Conv2d) -> tuple[int]:
    """The largest rank allowed: min over the products of all-but-one dimensions.

    Every tensor's CP rank is at most this bound, so a rank above it is never useful.
    """
    n, c, kh, kw = module.weight.shape
    return (min(n * c, n * kh * kw, c * kh * kw),)


def skeleton(module: nn.Conv2d, ranks: tuple[int], **kw) -> nn.Sequential:
    """The chain for rank R (weights uninitialised)."""
    (r,) = ranks
    kh, kw_ = module.kernel_size
    vert, horiz = split_geometry(module)
    return nn.Sequential(
        make_conv(module.in_channels, r, 1, **kw),
        make_conv(r, r, (kh, 1), groups=r, padding_mode=module.padding_mode, **vert, **kw),
        make_conv(r, r, (1, kw_), groups=r, padding_mode=module.padding_mode, **horiz, **kw),
        make_conv(r, module.out_channels, 1, bias=module.bias is not None, **kw),
    )


def _svd_init(tensor: torch.Tensor, r: int, g: torch.Generator) -> list[torch.Tensor]:
    """Leading left singular vectors of each unfolding, padded with random columns."""
    from slimkit.decompose.ranks import unfold

    factors = []
    for mode in range(tensor.dim()):
        u = torch.linalg.svd(unfold(tensor, mode), full_matrices=False)[0][:, :r]
        if u.shape[1] < r:
            extra = torch.randn(u.shape[0], r - u.shape[1], generator=g, dtype=tensor.dtype)
            u = torch.cat([u, extra / extra.norm(dim=0, keepdim=True)], 1)
        factors.append(u)
    return factors


_MTTKRP = ("ncyx,cr,yr,xr->nr", "ncyx,nr,yr,xr->cr", "ncyx,nr,cr,xr->yr", "ncyx,nr,cr,yr->xr")


def als(tensor: torch.Tensor, r: int, max_iter: int, tol: float, ridge: float = 1e-10):
    """CP-ALS on a 4-way float64 tensor: (weights [R], factors [dim x R] x 4, errors per sweep).

    Each sweep solves the four linear least-squares problems in turn (MTTKRP against the
    Hadamard product of the other factors' Gram matrices, with a tiny ridge term), and
    normalises the columns into ``weights``. Stops when the relative error changes by less
    than ``tol`` between sweeps.
    """
    g = torch.Generator().manual_seed(0)
    factors = _svd_init(tensor, r, g)
    weights = torch.ones(r, dtype=tensor.dtype)
    norm2 = float(tensor.pow(2).sum())
    eye = torch.eye(r, dtype=tensor.dtype)
    errors: list[float] = []
    for _ in range(max_iter):
        for mode in range(4):
            others = [f for i, f in enumerate(factors) if i != mode]
            gram = (others[0].T @ others[0]) * (others[1].T @ others[1]) * (others[2].T @ others[2])
            mttkrp = torch.einsum(_MTTKRP[mode], tensor, *others)
            solved = torch.linalg.solve(gram + ridge * eye * gram.diagonal().mean().clamp_min(1e-30), mttkrp.T).T
            weights = solved.norm(dim=0).clamp_min(1e-300)
            factors[mode] = solved / weights
        # ||X - X_hat||^2 = ||X||^2 - 2 <X, X_hat> + ||X_hat||^2, all from small matrices
        inner = float((mttkrp * factors[3] * weights).sum())
        gram_all = (factors[0].T @ factors[0]) * (factors[1].T @ factors[1]) * (factors[2].T @ factors[2])
        gram_all = gram_all * (factors[3].T @ factors[3])
        model2 = float(weights @ gram_all @ weights)
        errors.append(math.sqrt(max(0.0, norm2 - 2 * inner + model2) / norm2) if norm2 > 0 else 0.0)
        if not math.isfinite(errors[-1]) or (len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol):
            break
    return weights, factors, errors


def _tensorly_als(tensor: torch.Tensor, r: int, max_iter: int, tol: float):
    import numpy as np
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tensorly: rank above a mode size at SVD init
        (weights, factors), errors = parafac(tensor.numpy(), rank=r, n_iter_max=max_iter, init="svd", tol=tol,
                                             normalize_factors=True, return_errors=True, l2_reg=1e-10,
                                             random_state=0)
    return (torch.from_numpy(np.asarray(weights)), [torch.from_numpy(np.asarray(f)) for f in factors],
            [float(e) for e in errors])


def fit(module: nn.Module, ranks: tuple[int], config=None, name: str = "") -> tuple[list[torch.Tensor], dict]:
    """CP-ALS factors as the four chain weights, plus notes (rel_error, iterations, converged).

    ``config``: a :class:`~slimkit.decompose.core.DecomposeConfig` (``cp_max_iter``, ``cp_tol``,
    ``cp_solver``; None: their defaults); ``name``: the layer, named in a failed fit's error.
    """
    (r,) = ranks
    max_iter, tol, solver = (300, 1e-7, "torch") if config is None else (config.cp_max_iter, config.cp_tol,
                                                                         config.cp_solver)
    layer = name or "conv"
    w = module.weight.detach().to(torch.float64).cpu()
    norm = float(w.norm()) or 1.0
    tensor = w / norm
    try:
        weights, (a, b, y, x), errors = (als if solver == "torch" else _tensorly_als)(tensor, r, max_iter, tol)
    except (RuntimeError, ValueError) as err:  # a singular system, or LinAlgError (a ValueError)
        raise ConfigError(f"{layer}: cp rank {r} fit failed ({type(err).__name__}); lower the rank "
                          "or use method tucker") from None
    finite = all(bool(torch.isfinite(t).all()) for t in (weights, a, b, y, x))
    approx = torch.einsum("r,nr,cr,yr,xr->ncyx", weights, a, b, y, x) if finite else None
    rel = float((approx - tensor).norm()) if finite else math.inf
    scale = float(weights.abs().max()) if finite else math.inf
    iterations = len(errors)
    converged = iterations < max_iter
    if not math.isfinite(rel) or rel >= 1.0 or scale > 1e4:
        why = "non-finite factors" if not math.isfinite(rel) else (
            f"relative error {rel:.3g} (no better than zero)" if rel >= 1.0 else "degenerate components "
            f"(weight {scale:.3g} x the kernel norm)")
        raise ConfigError(
            f"{layer}: cp rank {r} did not converge after {iterations} ALS iterations: {why}; "
            f"lower the rank, raise cp_max_iter (now {max_iter}) or use method tucker"
        )
    # Fold the weights (and the kernel norm) evenly into the two pointwise factors.
    root = (weights.abs() * norm).sqrt()
    first = (b * root).T  # [R, C]
    vertical, horizontal = y.T, x.T  # [R, kh], [R, kw]
    last = a * (root * weights.sign())  # [N, R]
    return [first, vertical, horizontal, last], {"rel_error": rel, "als_iterations": iterations,
                                                 "converged": converged}
