"""Rank selection: fixed, fraction of full rank, energy, and analytic VBMF.

All functions work on singular values or on a 2-D matrix (a mode unfolding of a weight
tensor). The global-target search that trades rank against cost across a whole model
lives in :mod:`slimkit.decompose.core`; this module only answers "which rank for this
matrix".

>>> import torch
>>> energy_rank(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0.9)
2
>>> fraction_rank(64, 0.25), fraction_rank(3, 0.1)
(16, 1)
"""

from __future__ import annotations

import math

import numpy as np
import torch


def fraction_rank(full: int, fraction: float) -> int:
    """``ceil(fraction * full)``, at least 1: the rank kept for a fraction of full rank."""
    return max(1, min(full, math.ceil(fraction * full - 1e-9)))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold ``energy`` of sum(s^2) (at least 1).

    ``energy`` in (0, 1]; 1.0 keeps every non-zero singular value.
    """
    s2 = singular_values.detach().double().pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(s2, 0) / total
    rank = int((cumulative < energy - 1e-12).sum()) + 1
    return max(1, min(rank, int(s2.numel())))


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2: float, rows: int, cols: int, s: np.ndarray, residual: float, xubar: float) -> float:
    h = len(s)
    alpha = rows / cols
    x = s**2 / (cols * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return float(term1 + term2 + term3 + term4 + residual / (cols * sigma2) + (rows - h) * np.log(sigma2))


def vbmf_rank(matrix: torch.Tensor) -> int:
    """Rank estimated by analytic empirical variational Bayesian matrix factorization.

    Global analytic EVBMF solution with the noise variance estimated by a bounded 1-D
    search (Nakajima, Sugiyama, Babacan & Tomioka, "Global analytic solution of fully-
    observed variational Bayesian matrix factorization", JMLR 2013), as used by Kim et al.
    2016 on the mode-0 and mode-1 unfoldings of conv kernels. Returns at least 1.

    >>> g = torch.Generator().manual_seed(0)
    >>> low = torch.randn(60, 5, generator=g) @ torch.randn(5, 80, generator=g)
    >>> vbmf_rank(low + 0.01 * torch.randn(60, 80, generator=g))
    5
    """
    from scipy.optimize import minimize_scalar

    y = matrix.detach().double().cpu().numpy()
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    if not np.any(s > 0):
        return 1
    alpha = rows / cols
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    residual = 0.0  # H == L: every singular value is kept, nothing left over
    upper = float(np.sum(s**2) + residual) / (rows * cols)
    eh_ub = int(min(math.ceil(rows / (1 + alpha)) - 1, rows)) - 1
    tail = s[eh_ub + 1 :] if eh_ub + 1 < len(s) else s[-1:]
    lower = max(float(tail[0] ** 2) / (cols * xubar), float(np.mean(tail**2)) / cols)
    lower = max(lower, upper * 1e-12, 1e-300)
    if lower >= upper:
        sigma2 = upper
    else:
        result = minimize_scalar(
            _evb_objective, args=(rows, cols, s, residual, xubar), bounds=(lower, upper), method="bounded"
        )
        sigma2 = float(result.x)
    threshold = math.sqrt(cols * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return max(1, int(np.sum(s > threshold)))


def unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``weight.shape[mode]`` rows, all other axes as columns."""
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)
