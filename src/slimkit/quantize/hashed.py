"""HashedNets: every weight of a layer read from a small hashed parameter vector (Chen 2015).

Chen, Wilson, Tyree, Weinberger & Chen 2015, *Compressing Neural Networks with the Hashing
Trick* (ICML). A layer with ``n`` virtual weights keeps only ``K`` free parameters ``w``
(``K = ceil(ratio * n)``); virtual weight ``j`` (row-major position in the dense weight) is

    V_j = xi(j) * w[h(j)],      h(j) in {0..K-1},   xi(j) in {-1, +1}

with ``h`` and ``xi`` two hash functions of the position seeded per layer (the sign
factor is the paper's section 4.3 variant, which makes the hashed inner product unbiased).
The hashes are recomputed from the seed, never stored: a hashed layer is stored as its
``K`` float32 values plus one uint32 seed (plus its bias). Backpropagation through the
gather is the paper's gradient ``dL/dw_k = sum_{j: h(j)=k} xi(j) dL/dV_j``, so the layer
trains in place with any optimizer and needs no hooks.

The paper hashes fully connected layers; convolutions are hashed the same way over
their flattened ``[out, in/groups, kh, kw]`` weight. Converting a trained dense layer,
``init="project"`` starts from the least-squares projection of its weight onto the
hashed subspace, ``w_k = mean_{j: h(j)=k} xi(j) W_j`` (what minimizes ``||W - V||^2``);
``init="random"`` draws ``w`` like the paper's from-scratch training. A trained weight has
little structure the hash can use, so the projection keeps about ``ratio`` of each layer's
energy (``relative_sq_error`` ~ ``1 - ratio`` in the report): the converted network starts near
chance and needs training, and at these ratios training from scratch did better
(docs/sharing-methods.md).

The hash is splitmix64 (Steele, Lea & Flood 2014) of the position mixed with the seed,
computed with unsigned 64-bit integer arithmetic, so it is the same on every machine.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
>>> report = hash_weights_(model, torch.zeros(1, 64), {"linear_ratio": 0.125})
>>> type(model[0]).__name__, model[0].hashed_weight.numel(), report.layers["0"]["buckets"]
('HashedLinear', 256, 256)
>>> report.after.bytes  # 4 * (256 + 32 + 40 + 10) fp32 values and biases + two uint32 seeds
1360
>>> model(torch.zeros(3, 64)).shape
torch.Size([3, 10])
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from slimkit.config import Config
from slimkit.exceptions import ConfigError
from slimkit.manifest import register_module_spec
from slimkit.measure.storage import own_tensor_bytes, register_storage_rule
from slimkit.reports import ModelSize, Report
from slimkit.selection import matches, replace_module, select_modules

SEED_BYTES = 4  # one uint32 hash seed per hashed layer

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def hash_index_sign(numel: int, buckets: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, xi)`` for positions ``0..numel-1``: int64 buckets in ``[0, buckets)`` and float32 signs ``+-1``.

    ``h(j) = splitmix64(2 j + s) mod K`` and ``xi(j) = +1`` iff the top bit of
    ``splitmix64(2 j + 1 + s)`` is set, with ``s = splitmix64(seed)``: two independent hashes.
    """
    if buckets < 1:
        raise ConfigError(f"a hashed layer needs at least 1 bucket, got {buckets}")
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed], dtype=np.uint64))[0]
        pos = np.arange(numel, dtype=np.uint64) * np.uint64(2) + base
        index = (_splitmix64(pos) % np.uint64(buckets)).astype(np.int64)
        sign = np.where(_splitmix64(pos + np.uint64(1)) >> np.uint64(63), 1.0, -1.0).astype(np.float32)
    return torch.from_numpy(index), torch.from_numpy(sign)


class HashedMixin:
    """The hashed weight: parameter ``hashed_weight [K]``, non-persistent ``hash_index``/``hash_sign``."""

    def _init_hash(self, shape: tuple[int, ...], buckets: int, seed: int) -> None:
        self.weight_shape = tuple(int(s) for s in shape)
        self.buckets, self.seed = int(buckets), int(seed)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"hash seed must be a uint32 (0 <= seed < 2**32), got {seed}")
        index, sign = hash_index_sign(math.prod(self.weight_shape), self.buckets, self.seed)
        # derived from the seed: never saved (persistent=False), rebuilt by the constructor
        self.register_buffer("hash_index", index.view(self.weight_shape), persistent=False)
        self.register_buffer("hash_sign", sign.view(self.weight_shape), persistent=False)
        bound = 1.0 / math.sqrt(max(1, math.prod(self.weight_shape[1:])))
        self.hashed_weight = nn.Parameter(torch.empty(self.buckets).uniform_(-bound, bound))

    @property
    def weight(self) -> torch.Tensor:
        """The virtual dense weight ``xi * w[h]`` (differentiable in ``hashed_weight``)."""
        return self.hash_sign * self.hashed_weight[self.hash_index]

    @torch.no_grad()
    def project_(self, dense: torch.Tensor) -> None:
        """``w_k := mean_{h(j)=k} xi(j) W_j``: least-squares fit of ``dense`` (empty buckets get 0)."""
        signed = (dense.detach().to(self.hashed_weight) * self.hash_sign).flatten()
        index = self.hash_index.flatten()
        sums = torch.zeros(self.buckets, dtype=torch.float64).index_add_(0, index, signed.double())
        counts = torch.bincount(index, minlength=self.buckets).double()
        self.hashed_weight.copy_((sums / counts.clamp(min=1)).to(self.hashed_weight))

    def hash_args(self) -> dict[str, int]:
        return {"buckets": self.buckets, "seed": self.seed}


class HashedLinear(HashedMixin, nn.Module):
    """``y = x V^T + b`` with ``V [out, in]`` hashed from ``K`` values. Input ``[..., in]``, output ``[..., out]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, buckets: int = 1, seed: int = 0):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_hash((self.out_features, self.in_features), buckets, seed)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, buckets={self.buckets}, seed={self.seed}"


class HashedConv2d(HashedMixin, nn.Module):
    """2-D convolution whose ``[out, in/groups, kh, kw]`` weight is hashed from ``K`` values."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", buckets: int = 1, seed: int = 0):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        if padding_mode != "zeros":
            raise ConfigError(f"HashedConv2d supports padding_mode 'zeros' only, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self._init_hash((self.out_channels, self.in_channels // self.groups, *self.kernel_size), buckets, seed)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"buckets={self.buckets}, seed={self.seed}")


HASHED_LAYERS = (HashedLinear, HashedConv2d)


def hashed_layer_bytes(layer: HashedMixin) -> int:
    """Bytes of a hashed layer's own tensors as stored: its ``K`` fp32 values (+ bias) + one uint32
    seed; the hash index and signs are rebuilt from the seed, never stored. Its storage rule."""
    return own_tensor_bytes(layer) + SEED_BYTES


register_storage_rule(HashedMixin, hashed_layer_bytes)


def _conv_spec(m: nn.Module) -> dict[str, Any]:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=tuple(m.kernel_size),
                stride=tuple(m.stride), padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
                dilation=tuple(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)


register_module_spec(HashedLinear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                                  bias=m.bias is not None, **m.hash_args()))
register_module_spec(HashedConv2d, lambda m: {**_conv_spec(m), **m.hash_args()})


def _register_macs() -> None:
    from slimkit.measure.macs import conv_macs, linear_macs, register_mac_rule

    register_mac_rule(HashedConv2d, conv_macs)  # the virtual dense weight is multiplied in full
    register_mac_rule(HashedLinear, linear_macs)


_register_macs()


class HashConfig(Config):
    """Settings of the ``hash`` stage: free parameters per virtual weight, by layer type or glob.

    ``ratio`` = K / n: 0.125 keeps one stored float per 8 weights (4 bits per weight).
    """

    conv_ratio: float = Field(0.125, gt=0, le=1, description="K / weights for Conv2d layers")
    linear_ratio: float = Field(0.125, gt=0, le=1, description="K / weights for Linear layers")
    per_layer: dict[str, float] = Field(default_factory=dict, description="glob -> ratio, first match wins")
    init: Literal["project", "random"] = "project"
    layers: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    seed: int = Field(0, ge=0, lt=2**32)

    @field_validator("per_layer")
    @classmethod
    def _check_ratios(cls, value: dict[str, float]) -> dict[str, float]:
        for glob, ratio in value.items():
            if not 0 < float(ratio) <= 1:
                raise ValueError(f"per_layer[{glob!r}] must be a ratio in (0, 1], got {ratio}")
        return value

    def ratio_for(self, name: str, module: nn.Module) -> float:
        for glob, ratio in self.per_layer.items():
            if matches(name, (glob,)):
                return float(ratio)
        return self.linear_ratio if isinstance(module, nn.Linear) else self.conv_ratio


def layer_seed(seed: int, name: str) -> int:
    """Per-layer uint32 seed: ``crc32(name) xor seed`` (each layer its own hash functions)."""
    return (zlib.crc32(name.encode()) ^ int(seed)) & 0xFFFFFFFF


def hashed_layer(module: nn.Module, buckets: int, seed: int, init: str = "project") -> nn.Module:
    """A HashedLinear/HashedConv2d with the geometry and bias of a dense ``module``."""
    if isinstance(module, nn.Linear):
        layer = HashedLinear(module.in_features, module.out_features, module.bias is not None, buckets, seed)
    elif isinstance(module, nn.Conv2d):
        spec = _conv_spec(module)
        layer = HashedConv2d(**spec, buckets=buckets, seed=seed)
    else:
        raise ConfigError(f"HashedNets hashes Conv2d and Linear layers, not {type(module).__name__}")
    layer.to(module.weight.device)
    with torch.no_grad():
        if init == "project":
            layer.project_(module.weight)
        if module.bias is not None:
            layer.bias.copy_(module.bias)
    return layer


@dataclass(kw_only=True)
class HashReport(Report):
    """What :func:`hash_weights_` did: ``layers`` name -> ``{"weights", "buckets", "seed",
    "bits_per_weight", "relative_sq_error"}`` (names also in ``changed``) and the ``init`` used."""

    verb: str = "hash_weights_"
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    init: str = "project"


def hash_weights_(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
                  config: HashConfig | dict[str, Any] | None = None) -> HashReport:
    """Replace the selected Conv2d/Linear layers of ``model`` by hashed ones, in place; returns a :class:`HashReport`.

    ``example_inputs``: a tensor or a tuple of tensors the model accepts (the report's sizes).
    Layers with masks or codebooks (pruned or shared) are refused: hashing replaces their weight.
    """
    config = HashConfig.coerce(config, where="hash")
    modules = select_modules(model, (nn.Conv2d, nn.Linear), config.layers, config.ignore, what="hash.layers")
    for name, module in modules.items():
        taken = [b for b in ("weight_mask", "weight_codebook") if b in module._buffers]
        if taken:
            raise ConfigError(f"hash: layer {name!r} carries {taken[0]}; HashedNets replaces the weight, so hash "
                              "a dense layer (put hash before prune/share, or add the layer to hash.ignore)")
    report = HashReport(init=config.init, before=ModelSize.of(model, example_inputs))
    for name, module in modules.items():
        numel = module.weight.numel()
        buckets = max(1, math.ceil(config.ratio_for(name, module) * numel))
        seed = layer_seed(config.seed, name)
        layer = hashed_layer(module, buckets, seed, config.init)
        error = float((layer.weight.detach() - module.weight.detach()).pow(2).sum()
                      / module.weight.detach().pow(2).sum().clamp(min=1e-30))
        replace_module(model, name, layer)
        report.changed.append(name)
        report.layers[name] = {"weights": numel, "buckets": buckets, "seed": seed,
                               "bits_per_weight": round(32 * buckets / numel, 4), "relative_sq_error": round(error, 6)}
    report.after = ModelSize.of(model, example_inputs)
    return report


def hashed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The hashed layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HASHED_LAYERS)}
