"""Re-exports of :mod:`slimkit.deploy.compare` and :mod:`slimkit.deploy.engines`."""

from slimkit.deploy.compare import choose_engine, compare_engines
from slimkit.deploy.engines import torch_x86_int8

__all__ = ["choose_engine", "compare_engines", "torch_x86_int8"]
