"""Does this CPU's int8 dot product saturate? (decides ``reduce_range: auto``).

x86 CPUs without VNNI multiply uint8 activations by int8 weights with ``vpmaddubsw``, which
adds each *pair* of products into a saturating int16: ``255 * 127 * 2 = 64770`` does not
fit in 32767, so a full-range int8 weight grid can give wrong sums where two large
activations meet two large weights. ONNX Runtime's u8s8 kernels (and fbgemm's) use that
instruction on AVX2; VNNI (``vpdpbusd``, AVX512-VNNI or AVX-VNNI) accumulates in int32 and
does not saturate; ARM's ``sdot``/``udot`` neither. With 7-bit weights
(``255 * 63 * 2 = 32130``) no pair sum can overflow — ONNX Runtime's own quantizer calls
this ``reduce_range``.

>>> saturates, why = int8_dot_saturates()
>>> isinstance(saturates, bool) and bool(why)
True
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "avx10"}


def _linux_cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


@functools.lru_cache(maxsize=1)
def int8_dot_saturates() -> tuple[bool, str]:
    """(True if full-range int8 weights can overflow this CPU's int8 kernels, the reason in words)."""
    machine = platform.machine().lower()
    if machine not in _X86:
        return False, f"{machine or 'this CPU'} is not x86: its int8 dot products accumulate in 32 bits"
    flags = _linux_cpu_flags()
    if flags is None:
        return True, "x86 CPU whose flags could not be read: assuming no VNNI (int16 pair sums can saturate)"
    vnni = sorted(flags & _VNNI_FLAGS)
    if vnni:
        return False, f"this CPU has VNNI ({', '.join(vnni)}): int8 products accumulate in 32 bits"
    return True, "this x86 CPU has no VNNI: u8 x s8 pair sums saturate int16 with full-range int8 weights"
