"""``slimkit.kernels.conv2d``: one signature (``F.conv2d``'s, groups 1) over several convolution algorithms.

=============== ====================================== ============================================
algorithm       supports                               how
=============== ====================================== ============================================
``torch``       everything F.conv2d does                torch's own (oneDNN on x86 CPUs)
``direct``      any kernel, stride, padding             numba loops (:mod:`.direct`), the reference
``im2col``      any kernel, stride, padding             unfold + one GEMM per image, NCHW
``im2col_nhwc`` any kernel, stride, padding             channels-last patches + one GEMM
``winograd_f2`` 3x3, stride 1, any padding              F(2x2, 3x3) (:mod:`.winograd`)
``winograd_f4`` 3x3, stride 1, any padding              F(4x4, 3x3)
``fft``         any kernel, stride 1, any padding       rfft2, per-frequency complex GEMM (:mod:`.fft`)
``auto``        --                                      the fastest supported one for this shape, timed
                                                        once per shape and thread count on this machine
=============== ====================================== ============================================

Inference only: results never carry autograd history. Weight transforms (Winograd, FFT)
are computed once per weight tensor and cached until the weight changes (its version
counter moves) or is freed. An unsupported case raises one ValueError line that names it.

>>> import torch
>>> x, w = torch.randn(2, 5, 9, 9), torch.randn(7, 5, 3, 3)
>>> ref = torch.nn.functional.conv2d(x, w, padding=1)
>>> bool((conv2d(x, w, padding=1, algorithm="winograd_f2") - ref).abs().max() < 1e-4 * ref.abs().max())
True
>>> conv2d(x, w, stride=2, algorithm="winograd_f4")
Traceback (most recent call last):
...
slimkit.exceptions.ConfigError: conv2d: algorithm 'winograd_f4' does not support stride (2, 2) ...
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from slimkit.exceptions import ConfigError
from slimkit.kernels import fft as _fft
from slimkit.kernels import winograd as _wino
from slimkit.kernels.case import ConvCase, check
from slimkit.kernels.direct import conv2d_direct
from slimkit.kernels.im2col import conv2d_im2col, conv2d_im2col_nhwc
from slimkit.registry import Registry


@dataclass(frozen=True)
class Algorithm:
    """A convolution algorithm: what it cannot do, its weight preparation, the call, its multiplication count."""

    name: str
    unsupported: Callable[[ConvCase], str | None]  # a reason, or None when the case is supported
    run: Callable[[torch.Tensor, Any, ConvCase, int | None], torch.Tensor]  # (input, prepared weight, case, threads)
    multiplications: Callable[[ConvCase], dict[str, int]]
    prepare: Callable[[torch.Tensor, ConvCase], Any] | None = None  # weight -> cached transform
    prepare_key: Callable[[ConvCase], Any] = lambda case: None  # what the transform depends on besides the weight


ALGORITHMS: Registry[Algorithm] = Registry("convolution algorithm")


def _register(algo: Algorithm) -> None:
    ALGORITHMS.register(algo.name, algo)


def _direct_macs(case: ConvCase) -> dict[str, int]:
    return {"multiply_accumulate": case.macs}


def _winograd_unsupported(m: int):
    def reason(case: ConvCase) -> str | None:
        if (case.kh, case.kw) != (3, 3):
            return f"a {case.kh}x{case.kw} kernel (needs 3x3 kernels, stride 1)"
        if case.stride != (1, 1):
            return f"stride {case.stride} (needs 3x3 kernels, stride 1)"
        return None

    return reason


def _fft_unsupported(case: ConvCase) -> str | None:
    if case.stride != (1, 1):
        return f"stride {case.stride} (FFT convolution needs stride 1)"
    size = _fft.transform_bytes(case)
    if size > _fft.MAX_TRANSFORM_BYTES:
        return (f"a {case.h}x{case.w} input with {case.o}x{case.c} channels (its weight transform would take "
                f"{size / 2**20:.0f} MiB, over {_fft.MAX_TRANSFORM_BYTES // 2**20} MiB)")
    return None


_register(Algorithm("torch", lambda case: None,
                    lambda x, w, case, threads: F.conv2d(x, w, stride=case.stride, padding=case.padding),
                    _direct_macs))
_register(Algorithm("direct", lambda case: None, lambda x, w, case, threads: conv2d_direct(x, w, case, threads),
                    _direct_macs))
_register(Algorithm("im2col", lambda case: None, lambda x, w, case, threads: conv2d_im2col(x, w, case),
                    _direct_macs))
_register(Algorithm("im2col_nhwc", lambda case: None, lambda x, w, case, threads: conv2d_im2col_nhwc(x, w, case),
                    _direct_macs))
for _m in (2, 4):
    _register(Algorithm(f"winograd_f{_m}", _winograd_unsupported(_m),
                        lambda x, u, case, threads, m=_m: _wino.conv2d_winograd(x, u, case, m),
                        lambda case, m=_m: _wino.multiplications(case, m),
                        prepare=lambda w, case, m=_m: _wino.transform_weight(w, m)))
_register(Algorithm("fft", _fft_unsupported, lambda x, wf, case, threads: _fft.conv2d_fft(x, wf, case),
                    _fft.multiplications, prepare=lambda w, case: _fft.transform_weight(w, _fft.fft_size(case)),
                    prepare_key=_fft.fft_size))

AUTO_CANDIDATES = ("torch", "im2col", "im2col_nhwc", "winograd_f2", "winograd_f4", "fft")

# id(weight) -> (weakref to it, its version, {(algorithm, key): prepared}); entries go when the weight is freed
_prepared: dict[int, tuple[weakref.ref, int, dict]] = {}
_auto: dict[tuple, str] = {}


def prepared_weight(weight: torch.Tensor, algo: Algorithm, case: ConvCase) -> Any:
    """``algo.prepare(weight)``, computed once per weight tensor (and transform key) and cached."""
    if algo.prepare is None:
        return weight
    entry = _prepared.get(id(weight))
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        wid = id(weight)
        entry = (weakref.ref(weight, lambda _, wid=wid: _prepared.pop(wid, None)), weight._version, {})
        _prepared[wid] = entry
    key = (algo.name, algo.prepare_key(case))
    if key not in entry[2]:
        with torch.no_grad():
            entry[2][key] = algo.prepare(weight.detach(), case)
    return entry[2][key]


def supported(case: ConvCase, names=None) -> list[str]:
    """The algorithms (of ``names``, default all but ``direct``) that support ``case``."""
    return [n for n in (names or AUTO_CANDIDATES) if ALGORITHMS.get(n).unsupported(case) is None]


def check_supported(name: str, case: ConvCase) -> Algorithm:
    """The algorithm ``name``, or a one-line ConfigError (a ValueError) naming the unsupported case."""
    algo = ALGORITHMS.get(name)
    reason = algo.unsupported(case)
    if reason is not None:
        raise ConfigError(f"conv2d: algorithm {name!r} does not support {reason}; "
                          "use im2col, direct or torch for this layer")
    return algo


def _choose(input: torch.Tensor, weight: torch.Tensor, case: ConvCase, threads: int | None) -> str:
    from slimkit.kernels._threads import threads_for
    from slimkit.kernels.timing import interleaved_ms

    key = (case, threads_for(threads))
    if key not in _auto:
        runs = {}
        for name in supported(case):
            algo = ALGORITHMS.get(name)
            prepared = prepared_weight(weight, algo, case)
            runs[name] = lambda algo=algo, prepared=prepared: algo.run(input, prepared, case, threads)
        times = interleaved_ms(runs, repeats=3, warmup=1)
        _auto[key] = min(times, key=times.get)
    return _auto[key]


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, *,
           algorithm: str = "auto", threads: int | None = None) -> torch.Tensor:
    """2-D convolution (cross-correlation, zero padding, groups 1) computed by ``algorithm``.

    ``input``: float32 ``[N, C, H, W]``; ``weight``: ``[O, C, kh, kw]``; ``bias``: ``[O]`` or None;
    ``stride``/``padding``: int or (h, w). Returns ``[N, O, out_h, out_w]`` equal to
    ``F.conv2d(input, weight, bias, stride, padding)`` up to fp32 rounding (bounds per
    algorithm in docs/kernels.md). ``threads``: default ``torch.get_num_threads()``.
    """
    case = check(input, weight, bias, stride, padding)
    with torch.no_grad():
        if algorithm == "auto":
            algorithm = _choose(input, weight, case, threads)
        algo = check_supported(algorithm, case)
        out = algo.run(input, prepared_weight(weight, algo, case), case, threads)
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1)
    return out


def multiplications(case: ConvCase, algorithm: str) -> dict[str, int]:
    """Multiplications per stage that ``algorithm`` performs for ``case`` (see each module)."""
    return check_supported(algorithm, case).multiplications(case)
