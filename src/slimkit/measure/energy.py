"""Energy per inference: an estimate from the 45 nm table, and RAPL counters where the machine has them.

The estimate uses the per-operation energies of Horowitz 2014 ("Computing's energy problem
(and what we can do about it)", ISSCC), 45 nm, as Han et al. 2016 ("Deep Compression")
quote them (:class:`EnergyTable`, picojoules):

- **arithmetic**: every multiply-accumulate that executes. A layer running in int8
  (a fake-quantized layer with 8-bit activations: ONNX Runtime executes it with int8 inputs
  and int32 accumulators) costs one int8 multiply + one int32 add; every other layer one
  fp32 multiply + one fp32 add. With ``skip_zeros`` only the MACs of non-zero weights
  execute (a sparse kernel, as Deep Compression's EIE assumes): ``macs * nonzeros / numel``
  of the layer's weight, masks applied.
- **weight traffic**: the model's real stored bytes read once per inference, in 32-bit
  words. They are read from on-chip SRAM when they fit in ``sram_bytes``, else from DRAM:
  Deep Compression's argument, that once the compressed weights fit on chip their traffic
  costs 5 pJ a word instead of 640.
- **activation traffic**: the network input read once, every conv/linear output written
  once and read once (4 bytes an element, 1 for int8 layers). Where they live follows from
  the measured peak activation memory: in SRAM when the peak fits in what the weights leave
  of ``sram_bytes`` (all of it when the weights are in DRAM), else in DRAM.

Bias additions, batch norm, activations and pooling are not counted (as in the MAC count).

>>> import torch
>>> from torch import nn
>>> from slimkit.measure import profile
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
>>> est = estimate_energy(model, profile(model, torch.zeros(1, 4), latency=False), sram_bytes=0)
>>> est.arithmetic_pj, est.weight_pj  # 8 fp32 MACs * (3.7 + 0.9); 32 B = 8 words from DRAM * 640
(36.8, 5120.0)
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from slimkit.exceptions import ConfigError


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation in picojoules (Horowitz 2014, 45 nm, as used by Han et al. 2016)."""

    fp32_mult: float = 3.7
    fp32_add: float = 0.9
    int32_add: float = 0.1
    int8_mult: float = 0.2
    int8_add: float = 0.03
    sram_read_32: float = 5.0
    dram_read_32: float = 640.0

    @property
    def fp32_mac(self) -> float:
        return self.fp32_mult + self.fp32_add

    @property
    def int8_mac(self) -> float:
        """int8 x int8 product accumulated in int32."""
        return self.int8_mult + self.int32_add


HOROWITZ_45NM = EnergyTable()

#: Default on-chip SRAM: 512 KiB, a large microcontroller / small accelerator buffer.
DEFAULT_SRAM_BYTES = 512 * 1024


@dataclass(frozen=True)
class EnergyEstimate:
    """Energy of one forward of the profiled batch, picojoules, by source, with the assumptions.

    ``macs_fp32`` / ``macs_int8``: MACs that execute at each precision; ``weight_bytes``: the
    stored bytes read; ``activation_bytes``: activation traffic; ``weights_in`` /
    ``activations_in``: ``"sram"`` or ``"dram"``; ``sram_bytes``: the SRAM assumed.
    """

    arithmetic_pj: float
    weight_pj: float
    activation_pj: float
    macs_fp32: int
    macs_int8: int
    weight_bytes: int
    activation_bytes: int
    peak_activation_bytes: int
    weights_in: str
    activations_in: str
    sram_bytes: int
    skip_zeros: bool

    @property
    def total_pj(self) -> float:
        return self.arithmetic_pj + self.weight_pj + self.activation_pj

    @property
    def total_mj(self) -> float:
        """Total in millijoules (1 mJ = 1e9 pJ)."""
        return self.total_pj * 1e-9

    @property
    def total_uj(self) -> float:
        """Total in microjoules (1 uJ = 1e6 pJ)."""
        return self.total_pj * 1e-6

    def assumptions(self) -> str:
        """One line saying what was counted where."""
        return (f"Horowitz 2014 45 nm; weights ({self.weight_bytes:,} B stored) in {self.weights_in.upper()}, "
                f"activations (peak {self.peak_activation_bytes:,} B) in {self.activations_in.upper()}, "
                f"SRAM {self.sram_bytes:,} B; {'zero weights skipped' if self.skip_zeros else 'dense arithmetic'}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(total_pj=self.total_pj, total_mj=self.total_mj, assumptions=self.assumptions())
        return data


def _words(nbytes: int) -> int:
    return math.ceil(nbytes / 4)


def _weight_density(module: nn.Module) -> float:
    weight = getattr(module, "weight", None)
    if weight is None or weight.numel() == 0:
        return 1.0
    nonzero = weight.detach() != 0
    mask = getattr(module, "weight_mask", None)
    if mask is not None and mask.shape == weight.shape:
        nonzero = nonzero & (mask != 0)
    return float(nonzero.sum()) / weight.numel()


def _is_int8(module: nn.Module) -> bool:
    from slimkit.quantize.fake import QuantMixin

    return isinstance(module, QuantMixin) and module.act_bits == 8 and module.bits <= 8


def model_weight_bytes(model: nn.Module) -> int:
    """Stored bytes of ``model``'s weights: :func:`slimkit.measure.storage.stored_bytes` (bit-packed
    where a layer is quantized or binary, by the rules those layers register; the fp32 state dict else)."""
    from slimkit.measure.storage import stored_bytes

    return stored_bytes(model)


def estimate_energy(model: nn.Module, profile: Any, *, weight_bytes: int | None = None,
                    sram_bytes: int = DEFAULT_SRAM_BYTES, skip_zeros: bool = True,
                    table: EnergyTable = HOROWITZ_45NM) -> EnergyEstimate:
    """Energy of one forward of the batch ``profile`` (a :class:`~slimkit.measure.Profile`) measured on.

    ``weight_bytes``: the stored bytes of the deployed weights (a stage's real artifact size);
    None: :func:`model_weight_bytes`. ``sram_bytes``: on-chip SRAM size, bytes (>= 0). See the
    module docstring for what is counted. ``model`` is not modified.
    """
    if isinstance(sram_bytes, bool) or not isinstance(sram_bytes, int) or sram_bytes < 0:
        raise ConfigError(f"sram_bytes must be an integer >= 0 (bytes of on-chip SRAM), got {sram_bytes!r}")
    modules = dict(model.named_modules())
    macs_fp32 = macs_int8 = 0
    act_bytes = sum(4 * math.prod(s) for s in profile.input_shapes)
    for layer in profile.layers:
        if layer.macs <= 0:
            continue
        module = modules.get(layer.name, model if layer.name == type(model).__name__ else None)
        density = _weight_density(module) if (skip_zeros and module is not None) else 1.0
        executed = int(round(layer.macs * density))
        int8 = module is not None and _is_int8(module)
        if int8:
            macs_int8 += executed
        else:
            macs_fp32 += executed
        if layer.output_shape is not None:
            act_bytes += 2 * math.prod(layer.output_shape) * (1 if int8 else 4)
    stored = model_weight_bytes(model) if weight_bytes is None else int(weight_bytes)
    weights_in = "sram" if stored <= sram_bytes else "dram"
    left = sram_bytes - stored if weights_in == "sram" else sram_bytes
    peak = int(profile.peak_activation_bytes)
    activations_in = "sram" if peak <= left else "dram"
    read = {"sram": table.sram_read_32, "dram": table.dram_read_32}
    return EnergyEstimate(
        arithmetic_pj=round(macs_fp32 * table.fp32_mac + macs_int8 * table.int8_mac, 6),
        weight_pj=round(_words(stored) * read[weights_in], 6),
        activation_pj=round(_words(act_bytes) * read[activations_in], 6),
        macs_fp32=macs_fp32, macs_int8=macs_int8, weight_bytes=stored, activation_bytes=act_bytes,
        peak_activation_bytes=peak, weights_in=weights_in, activations_in=activations_in,
        sram_bytes=sram_bytes, skip_zeros=skip_zeros,
    )


# ---------------------------------------------------------------- RAPL (measured, where exposed)

POWERCAP = Path("/sys/class/powercap")


def rapl_domains(root: Path = POWERCAP) -> dict[str, Path]:
    """Readable RAPL package counters: ``{name: path of energy_uj}`` (empty where none are exposed)."""
    found = {}
    if not root.is_dir():
        return found
    for zone in sorted(root.glob("intel-rapl:*")):
        counter = zone / "energy_uj"
        if ":" in zone.name.split("intel-rapl:", 1)[1]:
            continue  # sub-zones (core, uncore, dram) are inside their package's counter
        if counter.is_file() and os.access(counter, os.R_OK):
            name = (zone / "name").read_text().strip() if (zone / "name").is_file() else zone.name
            found[name] = counter
    return found


def rapl_energy_mj(fn, runs: int = 50, root: Path = POWERCAP) -> tuple[float | None, str]:
    """(millijoules per call of ``fn`` over ``runs`` calls, note) from the RAPL package counters.

    The whole package is measured: other processes on the machine add to it, so the figure
    is an upper bound. (None, why) where no readable counter exists.
    """
    domains = rapl_domains(root)
    if not domains:
        return None, f"no readable RAPL counter under {root}"
    maxima = {}
    for name, path in domains.items():
        limit = path.with_name("max_energy_range_uj")
        maxima[name] = int(limit.read_text()) if limit.is_file() else 2**63
    import time

    before = {name: int(path.read_text()) for name, path in domains.items()}
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    seconds = time.perf_counter() - start
    total_uj = 0
    for name, path in domains.items():
        delta = int(path.read_text()) - before[name]
        total_uj += delta if delta >= 0 else delta + maxima[name]  # the counter wrapped
    return total_uj / 1e3 / runs, (f"RAPL {', '.join(domains)} over {runs} runs ({seconds:.2f} s), whole package: "
                                   "other load on the machine is included")


def with_weight_bytes(estimate: EnergyEstimate, weight_bytes: int,
                      table: EnergyTable = HOROWITZ_45NM) -> EnergyEstimate:
    """``estimate`` with the weights stored in ``weight_bytes`` (e.g. a stage's real artifact, a
    Huffman-coded container): weight traffic and where weights and activations live recomputed."""
    weights_in = "sram" if weight_bytes <= estimate.sram_bytes else "dram"
    left = estimate.sram_bytes - weight_bytes if weights_in == "sram" else estimate.sram_bytes
    activations_in = "sram" if estimate.peak_activation_bytes <= left else "dram"
    read = {"sram": table.sram_read_32, "dram": table.dram_read_32}
    from dataclasses import replace

    return replace(estimate, weight_bytes=int(weight_bytes), weights_in=weights_in, activations_in=activations_in,
                   weight_pj=round(_words(weight_bytes) * read[weights_in], 6),
                   activation_pj=round(_words(estimate.activation_bytes) * read[activations_in], 6))
