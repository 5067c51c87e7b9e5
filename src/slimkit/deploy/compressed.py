"""Engine ``slimkit-compressed`` (family ``slimkit``): the model written as ``.slim`` and run from its records.

Pruned, weight-shared Linear/Conv2d layers compute from the stored b-bit indices and
codebooks (:mod:`slimkit.encode.runtime`); everything else runs in PyTorch eager.
"""

from __future__ import annotations

import copy

from slimkit.deploy.engines import EngineInput, register_engine
from slimkit.deploy.runners import Runner, TorchRunner


@register_engine("slimkit-compressed", family="slimkit", integer=False, runs="model")
def _slimkit_compressed(inp: EngineInput) -> Runner:
    """The model as .slim, run by slimkit's compressed-domain runtime (sparse kernels over indices + codebook)."""
    from slimkit.encode.container import save
    from slimkit.encode.runtime import load_compressed

    path = inp.out_dir / "model.compressed.slim"
    save(inp.model, path)
    runner = TorchRunner(load_compressed(path, copy.deepcopy(inp.model)))
    runner.path = path
    return runner
