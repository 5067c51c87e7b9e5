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
from slimkit.exceptions import ConfigError
from slimkit.stages import StageContext, StageOutput, register_stage


@register_stage("decompose", DecomposeConfig)
def decompose_stage(model: nn.Module, config: DecomposeConfig, ctx: StageContext) -> StageOutput:
    """Replace layers by low-rank chains (svd, tucker, cp, separable, channel, depthwise-separable)."""
    try:
        report = decompose_(model, ctx.example_inputs, config)
    except ConfigError as err:  # "decompose.layers: ..." names the recipe path it came from
        message = str(err)
        if message.startswith("decompose."):
            raise ConfigError(f"stages[{ctx.stage_index}].{message}") from None
        raise
    return StageOutput(model=model, details=report.to_dict(), phase="materialized")
