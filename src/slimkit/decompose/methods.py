"""The factorizations: each turns one Conv2d/Linear into a plain ``nn.Sequential``.

A method is registered in :data:`METHODS` and answers four questions about a layer:
``reason(module)`` (why it cannot handle it, or None), ``full_ranks(module)`` (one entry
per rank axis), ``rank_matrices(module)`` (per axis, the matrices whose singular values
drive energy/VBMF rank choice) and ``build(module, ranks, config, name)`` (the fitted
replacement, its relative reconstruction error ``||W - W_r||_F / ||W||_F`` and
method-specific notes; ``config`` is the :class:`~slimkit.decompose.core.DecomposeConfig`
whose solver settings apply, ``name`` the layer's qualified name for error messages).
``skeleton(module, ranks)`` builds the same chain on the meta device, for cost curves.

Shapes: a conv weight is ``W[N, C, kh, kw]`` (N outputs, C inputs); a Linear weight is
``W[N, C]``. Factorizations run in float64 and are cast back to the layer's dtype.
Strides, padding (numbers or ``"same"``/``"valid"``), dilation, padding mode and bias are
carried over; only the last layer of a chain has a bias.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimkit.decompose.geometry import conv_padding, make_conv, split_geometry, weight64
from slimkit.decompose.ranks import unfold
from slimkit.registry import Registry

if TYPE_CHECKING:
    from slimkit.decompose.core import DecomposeConfig

#: fit(module, ranks, config or None, layer name) -> (chain weights, notes with "rel_error")
FitFn = Callable[[nn.Module, tuple[int, ...], "DecomposeConfig | None", str], tuple[list[torch.Tensor], dict[str, Any]]]


@dataclass
class Fit:
    """A fitted replacement: the chain, its relative error, and notes for the report."""

    module: nn.Sequential
    rel_error: float
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One decomposition method (see module docstring for the contract)."""

    name: str
    reason: Callable[[nn.Module], str | None]
    full_ranks: Callable[[nn.Module], tuple[int, ...]]
    rank_matrices: Callable[[nn.Module], list[list[torch.Tensor]]]
    skeleton: Callable[..., nn.Sequential]
    fit: FitFn
    axes: tuple[str, ...] = ("rank",)
    paper: str = ""

    def build(self, module: nn.Module, ranks: tuple[int, ...], config: DecomposeConfig | None = None,
              name: str = "") -> Fit:
        """Fit the factors (solver settings from ``config``; None: the defaults) and load them into a
        fresh chain on the layer's device and dtype. ``name``: the layer, for error messages."""
        weights, notes = self.fit(module, ranks, config, name)
        rel = notes.pop("rel_error")
        w = module.weight
        # built on the meta device (no wasted random init), then given real, empty storage
        chain = self.skeleton(module, ranks, device="meta", dtype=w.dtype).to_empty(device=w.device)
        convs = [m for m in chain if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            for layer, tensor in zip(convs, weights, strict=True):
                layer.weight.copy_(tensor.reshape(layer.weight.shape).to(w.dtype))
            if module.bias is not None:
                convs[-1].bias.copy_(module.bias)
        return Fit(chain, rel, notes)


METHODS: Registry[Method] = Registry("decomposition method")


# ---------------------------------------------------------------- dense kernel of a chain (for tests)


def compose_kernel(chain: nn.Sequential, shape: torch.Size) -> torch.Tensor:
    """The dense kernel of a chain of Linear/Conv2d layers, shape ``shape`` (no bias).

    Done by pushing an identity "image" of one-hot kernels through the chain with the
    strides, paddings and dilations removed (they are shared geometry, not weights).
    """
    layers = [m for m in chain if isinstance(m, (nn.Conv2d, nn.Linear))]
    if isinstance(layers[0], nn.Linear):
        out = torch.eye(shape[1], dtype=torch.float64)
        for layer in layers:
            out = out @ layer.weight.detach().double().cpu().T
        return out.T.reshape(shape)
    n, c, kh, kw = shape
    # Input: C * kh * kw one-hot images of size (kh, kw); the full chain (stride 1, no
    # padding, dilation 1) maps each to a 1x1 output = one column of the dense kernel.
    eye = torch.eye(c * kh * kw, dtype=torch.float64).reshape(c * kh * kw, c, kh, kw)
    x = eye
    for layer in layers:
        x = nn.functional.conv2d(x, layer.weight.detach().double().cpu(), groups=layer.groups)
    # x: [C*kh*kw, N, 1, 1]; correlation flips nothing, so column (c, y, x) is W[:, c, y, x].
    return x.reshape(c, kh, kw, n).permute(3, 0, 1, 2).contiguous()


def _tail(s: torch.Tensor, r: int) -> float:
    """Eckart-Young: relative Frobenius error of the best rank-r approximation."""
    s2 = s.pow(2)
    total = float(s2.sum())
    return math.sqrt(max(0.0, float(s2[r:].sum())) / total) if total > 0 else 0.0


def _sqrt_split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors ``left @ right`` of ``u diag(s) vh`` with the scale split evenly."""
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


# ---------------------------------------------------------------- common reasons


def _conv_reason(module: nn.Module, method: str, allow_1x1: bool = True) -> str | None:
    if isinstance(module, nn.Linear):
        return f"{method} handles Conv2d layers; a Linear layer takes method svd"
    if not isinstance(module, nn.Conv2d):
        return f"{method} handles Conv2d layers, not {type(module).__name__}"
    if module.groups > 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} conv (groups={module.groups}) is already factorized; {method} handles groups=1"
    if conv_padding(module) is None:
        return f"padding={module.padding!r} is asymmetric for this kernel; {method} needs symmetric padding"
    if not allow_1x1 and tuple(module.kernel_size) == (1, 1):
        return f"1x1 conv has no spatial extent; {method} needs a kxk kernel (use svd for 1x1 convs)"
    return None


# ---------------------------------------------------------------- svd (Denton 2014)


def _svd_reason(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return None
    reason = _conv_reason(module, "svd")
    if reason is None and tuple(module.kernel_size) != (1, 1):
        k = "x".join(map(str, module.kernel_size))
        return f"svd handles Linear and 1x1 conv; this conv is {k} (use tucker, cp, channel or separable)"
    return reason


def _matrix(module: nn.Module) -> torch.Tensor:
    w = weight64(module)
    return w.reshape(w.shape[0], -1)


def _svd_skeleton(module, ranks, **kw) -> nn.Sequential:
    (r,) = ranks
    if isinstance(module, nn.Linear):
        return nn.Sequential(nn.Linear(module.in_features, r, bias=False, **kw),
                             nn.Linear(r, module.out_features, bias=module.bias is not None, **kw))
    return _channel_skeleton(module, ranks, **kw)


def _svd_fit(module, ranks, config=None, name=""):
    (r,) = ranks
    u, s, vh = torch.linalg.svd(_matrix(module), full_matrices=False)
    left, right = _sqrt_split(u, s, vh, r)
    return [right, left], {"rel_error": _tail(s, r)}


METHODS.register("svd", Method(
    "svd", _svd_reason, lambda m: (min(_matrix(m).shape),), lambda m: [[_matrix(m)]],
    _svd_skeleton, _svd_fit, paper="Denton et al. 2014",
))


# ---------------------------------------------------------------- channel (Zhang 2015)


def _channel_skeleton(module, ranks, **kw) -> nn.Sequential:
    (r,) = ranks
    return nn.Sequential(
        make_conv(module.in_channels, r, module.kernel_size, module.stride, conv_padding(module), module.dilation,
              padding_mode=module.padding_mode, **kw),
        make_conv(r, module.out_channels, 1, bias=module.bias is not None, **kw),
    )


METHODS.register("channel", Method(
    "channel", lambda m: _conv_reason(m, "channel"), lambda m: (min(_matrix(m).shape),),
    lambda m: [[_matrix(m)]], _channel_skeleton, _svd_fit, paper="Zhang et al. 2015",
))


# ---------------------------------------------------------------- tucker-2 (Kim 2016)


def _tucker_full(module) -> tuple[int, int]:
    n, c, kh, kw = module.weight.shape
    return (min(c, n * kh * kw), min(n, c * kh * kw))


def _tucker_skeleton(module, ranks, **kw) -> nn.Sequential:
    r_in, r_out = ranks
    return nn.Sequential(
        make_conv(module.in_channels, r_in, 1, **kw),
        make_conv(r_in, r_out, module.kernel_size, module.stride, conv_padding(module), module.dilation,
              padding_mode=module.padding_mode, **kw),
        make_conv(r_out, module.out_channels, 1, bias=module.bias is not None, **kw),
    )


def _leading(matrix: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(matrix, full_matrices=False)[0][:, :r]


def _tucker_fit(module, ranks, config=None, name=""):
    """HOSVD initialisation, then ``iters`` HOOI sweeps (each never increases the error)."""
    r_in, r_out = ranks
    w = weight64(module)
    u_in = _leading(unfold(w, 1), r_in)  # [C, R1]
    u_out = _leading(unfold(w, 0), r_out)  # [N, R2]
    iters = config.tucker_iters if config is not None else 2
    full = (r_in, r_out) == _tucker_full(module)
    for _ in range(0 if full else iters):
        u_in = _leading(unfold(torch.einsum("ncyx,nr->rcyx", w, u_out), 1), r_in)
        u_out = _leading(unfold(torch.einsum("ncyx,cs->nsyx", w, u_in), 0), r_out)
    core = torch.einsum("ncyx,nr,cs->rsyx", w, u_out, u_in)  # [R2, R1, kh, kw]
    # Orthonormal factors: the fit is a projection, so ||W - W_hat||^2 = ||W||^2 - ||core||^2.
    w2 = float(w.pow(2).sum())
    rel = math.sqrt(max(0.0, w2 - float(core.pow(2).sum())) / w2) if w2 > 0 else 0.0
    return [u_in.T, core, u_out], {"rel_error": rel, "hooi_iterations": 0 if full else iters}


METHODS.register("tucker", Method(
    "tucker", lambda m: _conv_reason(m, "tucker", allow_1x1=False), _tucker_full,
    lambda m: [[unfold(weight64(m), 1)], [unfold(weight64(m), 0)]], _tucker_skeleton, _tucker_fit,
    axes=("input", "output"), paper="Kim et al. 2016",
))


# ---------------------------------------------------------------- separable (Jaderberg 2014, scheme 2)


def _separable_matrix(module) -> torch.Tensor:
    w = weight64(module)  # [N, C, kh, kw] -> rows (c, y), columns (n, x)
    n, c, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def _separable_skeleton(module, ranks, **kw) -> nn.Sequential:
    (r,) = ranks
    kh, kw_ = module.kernel_size
    vert, horiz = split_geometry(module)
    return nn.Sequential(
        make_conv(module.in_channels, r, (kh, 1), padding_mode=module.padding_mode, **vert, **kw),
        make_conv(r, module.out_channels, (1, kw_), padding_mode=module.padding_mode, bias=module.bias is not None,
              **horiz, **kw),
    )


def _separable_fit(module, ranks, config=None, name=""):
    (r,) = ranks
    n, c, kh, kw = module.weight.shape
    u, s, vh = torch.linalg.svd(_separable_matrix(module), full_matrices=False)
    left, right = _sqrt_split(u, s, vh, r)  # [C*kh, r], [r, N*kw]
    vertical = left.reshape(c, kh, r).permute(2, 0, 1)  # [r, C, kh] -> conv (r, C, kh, 1)
    horizontal = right.reshape(r, n, kw).permute(1, 0, 2)  # [N, r, kw] -> conv (N, r, 1, kw)
    return [vertical, horizontal], {"rel_error": _tail(s, r)}


METHODS.register("separable", Method(
    "separable", lambda m: _conv_reason(m, "separable", allow_1x1=False),
    lambda m: (min(_separable_matrix(m).shape),), lambda m: [[_separable_matrix(m)]],
    _separable_skeleton, _separable_fit, paper="Jaderberg et al. 2014 (scheme 2)",
))


# ---------------------------------------------------------------- depthwise-separable


def _per_channel(module) -> torch.Tensor:
    w = weight64(module)  # [N, C, kh, kw] -> C matrices [N, kh*kw]
    return w.permute(1, 0, 2, 3).reshape(w.shape[1], w.shape[0], -1)


def _dws_skeleton(module, ranks, **kw) -> nn.Sequential:
    (m,) = ranks
    c = module.in_channels
    return nn.Sequential(
        make_conv(c, c * m, module.kernel_size, module.stride, conv_padding(module), module.dilation, groups=c,
              padding_mode=module.padding_mode, **kw),
        make_conv(c * m, module.out_channels, 1, bias=module.bias is not None, **kw),
    )


def _dws_fit(module, ranks, config=None, name=""):
    """Per input channel c: ``W[:, c] ~ P_c D_c`` by truncated SVD (closed form, optimal)."""
    (m,) = ranks
    n, c, kh, kw = module.weight.shape
    u, s, vh = torch.linalg.svd(_per_channel(module), full_matrices=False)  # [C,N,q], [C,q], [C,q,k2]
    root = s[:, :m].sqrt()
    point = u[:, :, :m] * root[:, None, :]  # [C, N, m]
    depth = root[:, :, None] * vh[:, :m]  # [C, m, k2]
    depthwise = depth.reshape(c * m, 1, kh, kw)  # output channel c*m + j reads input channel c
    pointwise = point.permute(1, 0, 2).reshape(n, c * m)
    s2 = s.pow(2)
    total = float(s2.sum())
    rel = math.sqrt(float(s2[:, m:].sum()) / total) if total > 0 else 0.0
    return [depthwise, pointwise], {"rel_error": rel, "depth_multiplier": m}


METHODS.register("depthwise-separable", Method(
    "depthwise-separable", lambda m: _conv_reason(m, "depthwise-separable", allow_1x1=False),
    lambda m: (min(m.out_channels, math.prod(m.kernel_size)),), lambda m: [list(_per_channel(m))],
    _dws_skeleton, _dws_fit, axes=("depth_multiplier",),
    paper="closed-form fit of the MobileNet block (Howard et al. 2017)",
))


# ---------------------------------------------------------------- cp (Lebedev 2015): see cp.py


def _cp_register() -> None:
    from slimkit.decompose import cp

    METHODS.register("cp", Method(
        "cp", lambda m: _conv_reason(m, "cp", allow_1x1=False), cp.full_ranks,
        lambda m: [[unfold(weight64(m), 0), unfold(weight64(m), 1)]], cp.skeleton, cp.fit,
        paper="Lebedev et al. 2015",
    ))


_cp_register()
