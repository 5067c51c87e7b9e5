"""Measurement: parameters, non-zeros, MACs/FLOPs, stored bytes, peak activation memory, latency, throughput.

>>> import torch
>>> from slimkit.measure import profile
>>> from slimkit.models import create_model
>>> p = profile(create_model("lenet-300-100", in_channels=1), torch.zeros(1, 1, 28, 28), runs=3)
>>> p.params, p.macs, p.flops
(266610, 266200, 532400)
>>> p.peak_activation_bytes  # fc1: its [1, 784] input and [1, 300] output, fp32
4336
>>> p.latency_ms > 0 and p.latency_p99_ms >= p.latency_ms
True

Submodules: :mod:`~slimkit.measure.macs` (hook-based MAC counting and what it counts),
:mod:`~slimkit.measure.size` (params, non-zeros), :mod:`~slimkit.measure.storage` (stored
bytes, with rules the compressed layers register), :mod:`~slimkit.measure.memory`
(peak activation memory: the RAM one forward needs besides the weights, by fx liveness),
:mod:`~slimkit.measure.latency` (the one timer, for models and engine callables),
:mod:`~slimkit.measure.table` (text tables for the CLI and reports).
"""

from slimkit.measure.latency import LatencyStats, measure_latency, time_callable
from slimkit.measure.macs import LayerProfile, count_macs, count_macs_by_shape, layer_profiles, register_mac_rule
from slimkit.measure.memory import MemoryProfile, peak_activation_bytes
from slimkit.measure.profiler import Profile, profile
from slimkit.measure.size import count_nonzeros, count_params
from slimkit.measure.storage import register_storage_rule, state_dict_bytes, stored_bytes
from slimkit.measure.table import format_comparison, format_layer_table, format_summary, human, human_bytes

__all__ = [
    "LatencyStats",
    "LayerProfile",
    "MemoryProfile",
    "Profile",
    "count_macs",
    "count_macs_by_shape",
    "count_nonzeros",
    "count_params",
    "format_comparison",
    "format_layer_table",
    "format_summary",
    "human",
    "human_bytes",
    "layer_profiles",
    "measure_latency",
    "peak_activation_bytes",
    "profile",
    "register_mac_rule",
    "register_storage_rule",
    "state_dict_bytes",
    "stored_bytes",
    "time_callable",
]
