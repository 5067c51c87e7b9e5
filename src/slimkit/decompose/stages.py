"""Recipe stage ``decompose``: :func:`slimkit.decompose.decompose_` with its config.

```yaml
stages:
  - decompose: {method: tucker, rank: vbmf, ignore: ["features.0"]}
    finetune: {epochs: 2, lr: 0.01}
```
"""

from __future__ import annotations

from torch import nn

from slimkit.decompose.core import DecomposeConfig, decompose_
from slimkit.stages import StageContext, StageOutput, register_stage


@register_stage("decompose", DecomposeConfig)
def decompose_stage(model: nn.Module, config: DecomposeConfig, ctx: StageContext) -> StageOutput:
    """Replace layers by low-rank chains (svd, tucker, cp, separable, channel, depthwise-separable)."""
    report = decompose_(model, ctx.example_inputs, config, where=f"stages[{ctx.stage_index}].decompose")
    return StageOutput(model=model, details=report.to_dict(), phase="materialized")
