"""Low-rank decomposition as physical layer replacement.

``decompose_(model, example_inputs, config)`` replaces Conv2d/Linear layers by short chains
of smaller plain layers (an ``nn.Sequential`` of Conv2d/Linear), in place, and returns a
:class:`DecomposeReport` (a :class:`slimkit.reports.Report`); it is
:func:`plan_decomposition` (ranks chosen, model untouched) then :func:`apply_decomposition`.
Methods (registry :data:`METHODS`): ``svd`` (Linear and 1x1 conv, Denton 2014),
``tucker`` (Tucker-2, Kim 2016), ``cp`` (Lebedev 2015), ``separable`` (kx1 then 1xk,
Jaderberg 2014), ``channel`` (kxk then 1x1, Zhang 2015) and ``depthwise-separable``
(depthwise kxk then pointwise 1x1, fitted in closed form). Rank rules: see
:class:`DecomposeConfig` and :mod:`slimkit.decompose.ranks`.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
>>> report = decompose_(model, torch.randn(1, 64), {"method": "svd", "rank": 8, "layers": ["1"]})
>>> model[1]
Sequential(
  (0): Linear(in_features=64, out_features=8, bias=False)
  (1): Linear(in_features=8, out_features=32, bias=True)
)
>>> report.layers[0].params_before, report.layers[0].params_after
(2080, 800)
"""

from slimkit.decompose.core import (
    DecomposeConfig,
    DecomposeReport,
    DecompositionPlan,
    LayerReport,
    apply_decomposition,
    chain_cost,
    decompose_,
    plan_decomposition,
)
from slimkit.decompose.methods import METHODS

__all__ = ["METHODS", "DecomposeConfig", "DecomposeReport", "DecompositionPlan", "LayerReport",
           "apply_decomposition", "chain_cost", "decompose_", "plan_decomposition"]
