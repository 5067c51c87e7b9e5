"""Text views of a :class:`~slimkit.measure.profiler.Profile`: per-layer table, summary, comparison.

>>> import torch
>>> from torch import nn
>>> from slimkit.measure import profile
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 2))
>>> print(format_layer_table(profile(model, torch.zeros(1, 1, 4, 4), latency=False)))
name   type     output shape  params  MACs  share %
-----  -------  ------------  ------  ----  -------
0      Conv2d   [1, 4, 2, 2]      40   144     81.8
1      ReLU     [1, 4, 2, 2]       0     0      0.0
2      Flatten  [1, 16]            0     0      0.0
3      Linear   [1, 2]            34    32     18.2
-----  -------  ------------  ------  ----  -------
total                             74   176    100.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from slimkit.measure.profiler import Profile


def human(value: float, unit: str = "") -> str:
    """``1814073344`` -> ``'1.81 G'``: three significant decimals with an SI prefix (K, M, G, T)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip() if isinstance(value, float) else f"{value} {unit}".rstrip()


def human_bytes(n: int) -> str:
    """Bytes in binary units: ``1724320`` -> ``'1.64 MiB'``."""
    value = float(n)
    for prefix in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or prefix == "GiB":
            return f"{n} B" if prefix == "B" else f"{value:.2f} {prefix}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _align(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool],
           footer: Sequence[Sequence[str]] = ()) -> str:
    """Columns padded to their widest cell; numbers right-aligned; a rule under the header and above a footer."""
    widths = [max(len(r[i]) for r in [header, *rows, *footer]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(header), rule, *(line(r) for r in rows)]
    if footer:
        out += [rule, *(line(r) for r in footer)]
    return "\n".join(out)


def format_layer_table(profile: Profile, *, hide_empty: bool = False) -> str:
    """An aligned text table of the profiled layers: name, type, output shape, params, MACs, share %.

    Rows are in call order, numbers exact with thousands separators, then a total row.
    ``hide_empty`` drops layers with neither parameters nor MACs (activations, pooling).
    """
    header = ("name", "type", "output shape", "params", "MACs", "share %")
    rows = [
        (layer.name, layer.type, str(list(layer.output_shape)) if layer.output_shape is not None else "-",
         f"{layer.params:,}", f"{layer.macs:,}", f"{100 * layer.share:.1f}")
        for layer in profile.layers
        if not (hide_empty and layer.params == 0 and layer.macs == 0)
    ]
    layer_params = sum(layer.params for layer in profile.layers)
    footer = [("total", "", "", f"{layer_params:,}", f"{profile.macs:,}", "100.0" if profile.macs else "0.0")]
    return _align(header, rows, (False, False, False, True, True, True), footer)


def format_summary(profile: Profile) -> str:
    """A few lines with every figure of ``profile`` and what it counts."""
    shapes = ", ".join(str(list(s)) for s in profile.input_shapes)
    lines = [
        f"input        {shapes} (batch {profile.batch_size})",
        f"params       {profile.params:,} ({human(profile.params)})",
        f"non-zeros    {profile.nonzeros:,} ({100 * profile.density:.2f}% of params)",
        f"MACs         {profile.macs:,} ({human(profile.macs)}MAC, {human(profile.flops)}FLOP) per batch",
        f"bytes        {profile.bytes:,} ({human_bytes(profile.bytes)}, fp32 state dict without masks)",
        f"activations  peak {human_bytes(profile.peak_activation_bytes)} ({profile.peak_activation_bytes:,} B) "
        f"at {profile.peak_activation_at}, alive at once, input included, per batch",
    ]
    if profile.energy is not None:
        e = profile.energy
        lines.append(f"energy       {e.total_uj:,.3f} uJ estimated (arithmetic {e.arithmetic_pj * 1e-6:,.3f}, "
                     f"weights {e.weight_pj * 1e-6:,.3f} from {e.weights_in.upper()}, activations "
                     f"{e.activation_pj * 1e-6:,.3f} from {e.activations_in.upper()}; Horowitz 2014 45 nm, "
                     f"SRAM {human_bytes(e.sram_bytes)}) per batch")
    if profile.latency_ms is None:
        lines.append("latency      not measured")
    else:
        lines += [
            f"latency      median {profile.latency_ms:.3f} ms, p99 {profile.latency_p99_ms:.3f} ms "
            f"per batch of {profile.batch_size}, {profile.threads} thread(s)",
            f"throughput   {profile.throughput:,.1f} samples/s",
        ]
    return "\n".join(lines)


def format_comparison(profiles: Mapping[str, Profile]) -> str:
    """One row per named profile (params, non-zeros, MACs, bytes, latency) with ratios to the first one.

    Ratios are ``first / this`` (so 4.0x means four times smaller or faster); "-" where a figure is missing.
    """
    if not profiles:
        return ""
    base = next(iter(profiles.values()))

    def ratio(a: float | None, b: float | None) -> str:
        if not (a and b):
            return "-"
        return f"{a / b:.2f}x" if a / b >= 0.1 else f"{a / b:.2g}x"

    header = ("model", "params", "non-zeros", "MACs", "bytes", "latency ms", "p99 ms",
              "size ratio", "MAC ratio", "speed-up")
    rows = []
    for name, p in profiles.items():
        rows.append((
            name, human(p.params), human(p.nonzeros), human(p.macs), human_bytes(p.bytes),
            f"{p.latency_ms:.3f}" if p.latency_ms is not None else "-",
            f"{p.latency_p99_ms:.3f}" if p.latency_p99_ms is not None else "-",
            ratio(base.bytes, p.bytes), ratio(base.macs, p.macs), ratio(base.latency_ms, p.latency_ms),
        ))
    return _align(header, rows, (False,) + (True,) * (len(header) - 1))
